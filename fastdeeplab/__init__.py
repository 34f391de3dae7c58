"""fastdeeplab: a fast, drop-in DeepLabv3 for PyTorch."""
__version__ = "0.1.0"
