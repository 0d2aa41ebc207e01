"""Training settings of the setup_04_all baseline (values from the baseline's experiment file
and the toolbox's train.py defaults it relied on)."""

import torch

from .data import (
    classes,
    datasplit_path,
    force_all_classes,
    pad,
    spatial_transforms,
    target_value_transforms,
    train_raw_value_transforms,
    use_mutual_exclusion,
    val_raw_value_transforms,
    validation_prob,
    weighted_sampler,
)
from .model import input_array_info, model, model_name, pretrained_checkpoint, target_array_info

learning_rate = 1e-6
batch_size = 4
epochs = 1000
iterations_per_epoch = 1000
# The baseline validated on random batches for up to 60 s; a fixed number of batches
# makes the score comparable between runs and machines.
validation_batches = 8
max_grad_norm = 100.0
random_seed = 13

criterion = torch.nn.BCEWithLogitsLoss
criterion_kwargs = {"reduction": "none"}
# pos_weight per class = background/foreground voxel ratio from the training crops.
weight_loss = True
optimizer = torch.optim.RAdam(model.parameters(), lr=learning_rate, decoupled_weight_decay=True)
