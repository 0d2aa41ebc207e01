"""finetune: pretrained layers (one frozen, one trainable) plus a new head."""
