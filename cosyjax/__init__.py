"""cosyjax: Fun-CosyVoice3-0.5B in JAX/Flax.

``from cosyjax import CosyVoice3`` (or ``AutoModel``) is the user-facing entry point.  Those names are
imported on first use (PEP 562), so ``import cosyjax`` stays light: it loads neither JAX nor torch.
"""

from __future__ import annotations

from cosyjax.checkpoint import ConvertedModel, load_converted, save_converted
from cosyjax.config import FlowConfig, HiftConfig, LLMConfig, ModelConfig, load_model_config

__version__ = "0.1.0"

_LAZY = {"AutoModel": "cosyjax.automodel", "CosyVoice3": "cosyjax.pipeline", "HubError": "cosyjax.pipeline",
         "TextError": "cosyjax.frontend.text"}

__all__ = [
    "AutoModel", "ConvertedModel", "CosyVoice3", "FlowConfig", "HiftConfig", "HubError", "LLMConfig", "ModelConfig",
    "TextError", "load_converted", "load_model_config", "save_converted",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cosyjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
