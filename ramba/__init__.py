"""ramba: Mamba-2 with Hierarchical Sparse Attention for random access to long contexts."""
__version__ = "0.1.0"
