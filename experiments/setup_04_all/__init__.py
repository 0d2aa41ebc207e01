"""setup_04_all: pretrained COSEM setup04 backbone (frozen) + new head for all 48 challenge classes."""
