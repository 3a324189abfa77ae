"""sparsefuse: dynamic sparse training for PyTorch."""
