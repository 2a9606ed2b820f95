"""Compression passes on the PyTorch model, before quantization."""
