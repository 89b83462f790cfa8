"""``AutoModel(model_dir=...)``: upstream's ``cosyvoice.cli.cosyvoice.AutoModel`` for CosyVoice3 releases.

Upstream picks the class from the yaml a release holds (``cosyvoice.yaml`` -> CosyVoice,
``cosyvoice2.yaml`` -> CosyVoice2, ``cosyvoice3.yaml`` -> CosyVoice3) and downloads a ``model_dir``
that does not exist with ModelScope.  Here only CosyVoice3 releases load (the others raise
``TypeError``, as upstream does for a directory of no known type), and a missing ``model_dir`` is a
Hugging Face Hub id (``FunAudioLLM/Fun-CosyVoice3-0.5B-2512``), fetched by
:func:`cosyjax.pipeline.resolve_model_dir`.

Upstream's CosyVoice3 options are accepted so that its scripts run unchanged: ``fp16`` asks for
bfloat16 LLM weights and activations on an accelerator and, as upstream without CUDA, is turned off
with a warning on CPU (bfloat16 is slow on XLA:CPU); ``load_trt`` and ``load_vllm`` are ignored with
a warning (XLA compiles the model; there is no TensorRT or vLLM path); ``trt_concurrent`` only
matters with ``load_trt``.  Every other keyword goes to :class:`cosyjax.pipeline.CosyVoice3`
(``dtype``, ``converted_dir``, ``llm_file``, ``backend``, ...).
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

UPSTREAM_YAMLS = {"cosyvoice.yaml": "CosyVoice (v1)", "cosyvoice2.yaml": "CosyVoice2"}


def AutoModel(*, model_dir: str, load_trt: bool = False, load_vllm: bool = False, fp16: bool = False,  # noqa: N802
              trt_concurrent: int = 1, **kwargs: Any):
    """A :class:`cosyjax.pipeline.CosyVoice3` for a CosyVoice3 release directory or Hub id.

    Args:
      model_dir: release directory (holding ``cosyvoice3.yaml``) or Hugging Face Hub id.
      load_trt, load_vllm, trt_concurrent: upstream's accelerator options; ignored (warning).
      fp16: bfloat16 LLM on a GPU/TPU; ignored with a warning on CPU, as upstream without CUDA.
      **kwargs: passed to ``CosyVoice3`` (``dtype`` wins over ``fp16``).
    Returns:
      The loaded ``CosyVoice3``.
    Raises:
      TypeError: the directory is a CosyVoice / CosyVoice2 release, or of no known type.
      FileNotFoundError, HubError: see :func:`cosyjax.pipeline.resolve_model_dir`.
    """
    from cosyjax.pipeline import CosyVoice3, resolve_model_dir

    model_dir = resolve_model_dir(model_dir, cache_dir=kwargs.pop("cache_dir", None))
    if not os.path.isfile(os.path.join(model_dir, "cosyvoice3.yaml")):
        for name, kind in UPSTREAM_YAMLS.items():
            if os.path.isfile(os.path.join(model_dir, name)):
                raise TypeError(f"{model_dir} is a {kind} release ({name}); cosyjax runs CosyVoice3 releases "
                                "(cosyvoice3.yaml) only")
        raise TypeError(f"{model_dir}: no valid model type found (no cosyvoice3.yaml, cosyvoice2.yaml or "
                        "cosyvoice.yaml)")
    for name, value in (("load_trt", load_trt), ("load_vllm", load_vllm)):
        if value:
            log.warning("AutoModel(%s=True) is ignored: cosyjax compiles the model with XLA (no TensorRT/vLLM)", name)
    if fp16 and "dtype" not in kwargs:
        import jax

        platform = jax.devices(kwargs.get("backend"))[0].platform
        if platform == "cpu":
            log.warning("AutoModel(fp16=True) is ignored on CPU, as upstream does without CUDA (bfloat16 is slow "
                        "on XLA:CPU)")
        else:
            kwargs["dtype"] = "bfloat16"
    return CosyVoice3(model_dir, **kwargs)
