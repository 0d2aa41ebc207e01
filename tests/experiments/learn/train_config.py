import torch

from .model import model

learning_rate = 1e-2
batch_size = 2
epochs = 1
iterations_per_epoch = 150
validation_batches = 0
max_grad_norm = 100.0
random_seed = 5
criterion = torch.nn.BCEWithLogitsLoss
criterion_kwargs = {"reduction": "none"}
weight_loss = True
optimizer = torch.optim.RAdam(model.parameters(), lr=learning_rate, decoupled_weight_decay=True)
