"""The RAMba model: configuration, Hugging Face modules, Mamba-2 weight import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ramba.model.cache import RambaCache
from ramba.model.config import RambaConfig
from ramba.model.modeling import RambaForCausalLM, RambaModel

AutoConfig.register("ramba", RambaConfig, exist_ok=True)
AutoModel.register(RambaConfig, RambaModel, exist_ok=True)
AutoModelForCausalLM.register(RambaConfig, RambaForCausalLM, exist_ok=True)

__all__ = ["RambaConfig", "RambaModel", "RambaForCausalLM", "RambaCache"]
