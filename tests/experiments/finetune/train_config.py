import torch

from .data import classes, spatial_transforms, target_value_transforms, train_raw_value_transforms, val_raw_value_transforms
from .model import input_array_info, model, model_name, target_array_info

# Plain SGD with the gradient norm clipped to 1: one step moves the trainable weights by
# at most learning_rate in norm, which the tests check against the pretrained weights.
learning_rate = 1e-2
batch_size = 1
epochs = 1
iterations_per_epoch = 1
validation_batches = 0
max_grad_norm = 1.0
random_seed = 3
criterion = torch.nn.BCEWithLogitsLoss
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
