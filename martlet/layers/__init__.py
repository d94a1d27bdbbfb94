"""Building blocks of a transformer, each with a plain PyTorch path that runs anywhere."""
