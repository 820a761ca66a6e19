"""ramba: Mamba-2 with Hierarchical Sparse Attention for random access to long contexts.

``from ramba import RambaConfig, RambaForCausalLM`` loads the model lazily, so ``import ramba.ops``
stays light (no ``transformers`` import).
"""

__version__ = "0.1.0"
__all__ = ["RambaConfig", "RambaModel", "RambaForCausalLM", "RambaCache", "__version__"]


def __getattr__(name: str):
    if name in ("RambaConfig", "RambaModel", "RambaForCausalLM", "RambaCache"):
        import ramba.model

        return getattr(ramba.model, name)
    raise AttributeError(f"module 'ramba' has no attribute {name!r}")
