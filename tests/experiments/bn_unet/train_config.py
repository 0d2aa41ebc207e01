import torch

from .data import classes, spatial_transforms, target_value_transforms, train_raw_value_transforms, val_raw_value_transforms
from .model import input_array_info, model, model_name, target_array_info

learning_rate = 1e-3
batch_size = 2
epochs = 2
iterations_per_epoch = 2
validation_batches = 1
random_seed = 5
criterion = torch.nn.BCEWithLogitsLoss
criterion_kwargs = {"reduction": "none"}
optimizer = torch.optim.RAdam(model.parameters(), lr=learning_rate, decoupled_weight_decay=True)
