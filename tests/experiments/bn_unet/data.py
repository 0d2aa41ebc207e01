import torch
import torchvision.transforms.v2 as T
from cellmap_data.transforms import Binarize, NaNtoNum

classes = ["ecs", "pm", "mito", "nuc", "cell"]
# No rotation: these tests are about the model contract, and rotated reads are slow.
spatial_transforms = {"mirror": {"axes": {"x": 0.5, "y": 0.5, "z": 0.1}}, "transpose": {"axes": ["x", "y", "z"]}}
train_raw_value_transforms = T.Compose([T.ToDtype(torch.float, scale=True), NaNtoNum({"nan": 0, "posinf": None, "neginf": None})])
val_raw_value_transforms = T.Compose([T.ToDtype(torch.float, scale=True), NaNtoNum({"nan": 0, "posinf": None, "neginf": None})])
target_value_transforms = T.Compose([T.ToDtype(torch.float), Binarize()])
# In-process loading keeps these tests quick.
num_workers = 0
