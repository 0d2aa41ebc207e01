"""Post-processing of setup_04_all predictions (logits at 8 nm)."""

# Predictions are logits: 0.0 is probability 0.5 (the toolbox examples threshold logits
# at 0.5, i.e. probability 0.62).
threshold = 0.0
# Instance classes are labelled by 26-connected components (the challenge relabels the
# same way when scoring); the rest are written as 0/1 masks.
connectivity = 26
min_instance_size = 0
checkpoint = "best"
