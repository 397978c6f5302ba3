"""PyTorch side of vitserve: ViT and MAE definitions, checkpoints, data and training."""
