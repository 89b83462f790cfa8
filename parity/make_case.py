"""``cosyjax parity make-case``: the entry point, kept where callers import it.

The generator itself is the package ``cosyjax.parity.reference`` (one module per concern and per stage
group); this module hands on its public names.
"""

from cosyjax.parity.reference.config import MakeCaseError, load_case_config
from cosyjax.parity.reference.make import make_case
from cosyjax.parity.reference.release import build_models, load_weights, render_yaml, write_qwen_dir

__all__ = ["MakeCaseError", "build_models", "load_case_config", "load_weights", "make_case", "render_yaml",
           "write_qwen_dir"]
