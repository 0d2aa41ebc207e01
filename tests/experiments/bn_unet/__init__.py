"""bn_unet: a BatchNorm + max-pool UNet from scratch, its architecture in a helper module (unet.py)."""
