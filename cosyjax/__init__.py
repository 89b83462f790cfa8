"""cosyjax: Fun-CosyVoice3-0.5B in JAX/Flax."""

from cosyjax.checkpoint import ConvertedModel, load_converted, save_converted
from cosyjax.config import FlowConfig, HiftConfig, LLMConfig, ModelConfig, load_model_config

__version__ = "0.1.0"

__all__ = [
    "ConvertedModel", "FlowConfig", "HiftConfig", "LLMConfig", "ModelConfig",
    "load_converted", "load_model_config", "save_converted",
]
