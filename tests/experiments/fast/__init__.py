"""fast: a small network on the tiny crop, for tests of the training machinery (seconds, not minutes)."""
