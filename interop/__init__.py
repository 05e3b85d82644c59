"""PyTorch <-> jquant interop: checkpoints, layouts, qparams and the jquant-convert CLI."""
