"""cosyjax params -> upstream ``llm.pt`` / ``flow.pt`` / ``hift.pt`` state_dicts (the converter's inverse).

Each stage converter (``convert/llm.py``, ``flow.py``, ``hift.py``) is a table of
``Entry(path, keys, transform)``; exporting walks the same table and applies each transform's
inverse, so the two directions cannot drift apart:

| converter transform      | export                                                              |
|--------------------------|---------------------------------------------------------------------|
| identity                 | identity                                                            |
| linear_t   [in, out]     | transpose back to torch Linear [out, in]                            |
| conv1d_t   [k, in, out]  | transpose back to torch Conv1d [out, in, k]                         |
| conv1d_weight_norm_t     | ``parametrizations.weight.original0`` g [out, 1, 1] = per-row norm   |
|   (folded W)             | of W, ``original1`` v = W (see below)                               |
| hift ``_g_vector`` [out] | g [out, 1, 1] (the f0 predictor keeps g and v unfolded)              |

Keys the converter reads but cosyjax does not keep are regenerated so that upstream's
``load_state_dict(strict=True)`` accepts the files:

- ``llm.model.lm_head.weight``: with ``tie_word_embeddings`` it is the *same tensor* as
  ``embed_tokens`` (torch.save keeps the alias, as in the release); an untied head must be passed
  in (``lm_head=``), because CosyVoice3LM never uses it and cosyjax does not store it.
- ``decoder.estimator.rotary_embed.inv_freq``: x-transformers' formula, in torch, so it is bitwise
  the buffer upstream registers.

Weight norm.  A folded kernel W cannot be split back into the release's (g, v); any pair with
``g * v / ||v|| == W`` is the same model.  We write ``v = W`` and ``g`` = the row norms that torch's
own ``_weight_norm_interface`` computes for W, so upstream's parametrization (``torch._weight_norm``,
same kernel) rebuilds W bitwise, and converting the export again gives back exactly the JAX kernel.
The exported g/v tensors therefore differ from the release's (only their product is kept); a row
with W = 0 is written as g = 0, v = 1 (a zero norm would fold to NaN).

Hift keys are written in the plain form (no ``generator.`` prefix), which upstream's loader and our
converter both accept.  Float params of any dtype (bfloat16 conversions) are written as float32,
the release's dtype.  This module needs torch; the JAX runtime never imports it.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cosyjax.atomic import staged_dir
from cosyjax.checkpoint import CONVERTED_SUBDIR, ConvertedModel, structure_problems
from cosyjax.config import ModelConfig
from cosyjax.convert import LLM_FILES, STAGE_FILES, flow as flow_table, hift as hift_table, llm as llm_table
from cosyjax.convert.common import (ConversionError, Entry, conv1d_t, conv1d_weight_norm_t, flatten_params,
                                    identity, linear_t)

STAGES = ("llm", "flow", "hift")


# --------------------------------------------------------------------------------------------
# Inverse transforms (JAX layout -> torch layout); each returns one array per key of the entry
# --------------------------------------------------------------------------------------------
def _identity_inv(x: np.ndarray) -> tuple[np.ndarray]:
    return (x,)


def _linear_inv(kernel: np.ndarray) -> tuple[np.ndarray]:
    """Dense kernel [in, out] -> torch Linear weight [out, in]."""
    return (np.ascontiguousarray(kernel.T),)


def _conv1d_inv(kernel: np.ndarray) -> tuple[np.ndarray]:
    """Channels-last kernel [k, in, out] -> torch Conv1d weight [out, in, k]."""
    return (np.ascontiguousarray(np.transpose(kernel, (2, 1, 0))),)


def unfold_weight_norm(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torch weight W [out, ...] -> (g [out, 1, ...], v) with ``torch._weight_norm(v, g, 0) == W`` bitwise.

    ``g`` is the norm ``torch._weight_norm_interface`` itself computes for ``v = W``, so the fold
    divides by exactly the number it multiplies with (x / x == 1 in IEEE arithmetic).  A zero row
    is written as g = 0, v = 1 so that it folds to 0, not NaN.
    """
    import torch

    v = torch.from_numpy(np.array(weight, dtype=np.float32))
    zero_rows = v.reshape(v.shape[0], -1).abs().amax(dim=1) == 0
    if bool(zero_rows.any()):
        v[zero_rows] = 1.0
    ones = torch.ones((v.shape[0],) + (1,) * (v.ndim - 1), dtype=torch.float32)
    _, norms = torch._weight_norm_interface(v, ones, 0)  # the norms the fold will divide by
    g = norms.reshape(ones.shape).clone()
    g[zero_rows] = 0.0
    return g.numpy(), v.numpy()


def _conv1d_weight_norm_inv(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Folded channels-last kernel [k, in, out] -> (g [out, 1, 1], v [out, in, k])."""
    (weight,) = _conv1d_inv(kernel)
    return unfold_weight_norm(weight)


def _g_column(g: np.ndarray) -> tuple[np.ndarray]:
    """f0-predictor weight-norm g [out] -> [out, 1, 1]."""
    return (np.ascontiguousarray(g.reshape(g.shape[0], 1, 1)),)


INVERSES: dict[Callable[..., np.ndarray], Callable[[np.ndarray], tuple[np.ndarray, ...]]] = {
    identity: _identity_inv,
    linear_t: _linear_inv,
    conv1d_t: _conv1d_inv,
    conv1d_weight_norm_t: _conv1d_weight_norm_inv,
    hift_table._g_vector: _g_column,
}


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------
def _float32(x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16":
        return np.asarray(arr, dtype=np.float32)
    return arr


def _check_structure(params: Mapping[str, Any], expected: Mapping[str, Any], source: str) -> dict[tuple, Any]:
    """Flatten ``params`` and check it has exactly the paths and shapes of ``expected``; one error lists all."""
    if not isinstance(params, Mapping):
        raise ConversionError(f"{source}: params must be a nested dict of arrays, found {type(params).__name__}")
    flat = flatten_params(params)
    want = flatten_params(expected)
    missing = sorted("/".join(p) for p in want if p not in flat)
    unexpected = sorted("/".join(p) for p in flat if p not in want)
    mismatched = [f"{'/'.join(p)} {tuple(np.shape(flat[p]))}, expected {tuple(want[p].shape)}"
                  for p in want if p in flat and tuple(np.shape(flat[p])) != tuple(want[p].shape)]
    problems = structure_problems(missing, unexpected, mismatched,
                                  names=("missing params", "unexpected params", "shape mismatches"))
    if problems:
        raise ConversionError(f"{source}: " + " | ".join(problems))
    return flat


def _apply_inverse(flat: Mapping[tuple, Any], table: Sequence[Entry], source: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for entry in table:
        inverse = INVERSES.get(entry.transform)
        if inverse is None:  # a new converter transform without an inverse: a bug here, not bad params
            raise ConversionError(f"{source}: no inverse for transform {entry.transform.__name__} "
                                  f"({'/'.join(entry.path)})")
        arrays = inverse(_float32(flat[entry.path]))
        for key, arr in zip(entry.keys, arrays, strict=True):
            out[key] = arr
    return out


def export_llm(params: Mapping[str, Any], cfg, *, lm_head: Any = None) -> dict[str, np.ndarray]:
    """CosyVoice3LM params -> llm.pt state_dict (numpy float32, tensors in the release's layout).

    Args:
      params: the converted llm param tree (ConvertedModel.params["llm"] or a fine-tuned copy).
      cfg: LLMConfig.
      lm_head: [vocab, hidden] Qwen lm_head, for an untied config only (CosyVoice3LM never uses it,
        but upstream's strict load needs the key); refused when the config ties it to embed_tokens.

    Returns:
      {torch key: array}.  With tie_word_embeddings the lm_head entry *is* the embed_tokens array.
    """
    from cosyjax.llm.qwen2 import param_shapes

    flat = _check_structure(params, param_shapes(cfg), "llm params")
    sd = _apply_inverse(flat, llm_table.param_table(cfg), "llm params")
    embed = sd[llm_table.PREFIX + "embed_tokens.weight"]
    if cfg.tie_word_embeddings:
        if lm_head is not None:
            raise ConversionError("llm: lm_head given but tie_word_embeddings is true (the head is embed_tokens)")
        sd[llm_table.LM_HEAD] = embed
    else:
        if lm_head is None:
            raise ConversionError(f"llm: the config unties the Qwen lm_head, which cosyjax does not keep; pass "
                                  f"lm_head= (the original {llm_table.LM_HEAD}) so upstream's strict load works")
        head = _float32(lm_head)
        if head.shape != embed.shape:
            raise ConversionError(f"llm: lm_head has shape {head.shape}, expected {embed.shape}")
        sd[llm_table.LM_HEAD] = head
    return sd


def rotary_inv_freq_torch(dim: int, base: float = 10000.0) -> np.ndarray:
    """x-transformers ``RotaryEmbedding(dim).inv_freq`` computed as it does (torch, float32)."""
    import torch

    return (1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))).numpy()


def export_flow(params: Mapping[str, Any], cfg) -> dict[str, np.ndarray]:
    """Flow params -> flow.pt state_dict (numpy float32), with the rotary ``inv_freq`` buffer."""
    from cosyjax.flow.flow import param_shapes

    flat = _check_structure(params, param_shapes(cfg), "flow params")
    sd = _apply_inverse(flat, flow_table.param_table(cfg), "flow params")
    sd[flow_table.INV_FREQ_KEY] = rotary_inv_freq_torch(cfg.dim_head)
    return sd


def export_hift(params: Mapping[str, Any], cfg) -> dict[str, np.ndarray]:
    """HiFT params -> hift.pt state_dict (numpy float32), weight-normed convs as (original0, original1)."""
    from cosyjax.hift.generator import param_shapes

    flat = _check_structure(params, param_shapes(cfg), "hift params")
    return _apply_inverse(flat, hift_table.param_table(cfg), "hift params")


def _model_parts(model: ConvertedModel | Mapping[str, Any], config: ModelConfig | None
                 ) -> tuple[Mapping[str, Any], ModelConfig]:
    if isinstance(model, ConvertedModel):
        if config is not None and config != model.config:
            raise ValueError("config given differs from the ConvertedModel's config")
        return model.params, model.config
    if config is None:
        raise ValueError("export of a bare params dict needs config= (a ModelConfig)")
    if not isinstance(model, Mapping):
        raise ConversionError(f"expected a ConvertedModel or a {{'llm', 'flow', 'hift'}} params dict, "
                              f"found {type(model).__name__}")
    return model, config


def export_state_dicts(model: ConvertedModel | Mapping[str, Any], *, config: ModelConfig | None = None,
                       stages: Sequence[str] = STAGES, lm_head: Any = None) -> dict[str, dict[str, np.ndarray]]:
    """Converted (or fine-tuned) params -> {"llm": sd, "flow": sd, "hift": sd} of numpy arrays.

    Args:
      model: a ConvertedModel, or a params dict {"llm", "flow", "hift"} (then ``config`` is needed).
        To export a fine-tuned stage: ``dataclasses.replace(converted, params={**converted.params,
        "llm": state.params})``.
      stages: which stages to export.
      lm_head: only for an untied LLM config (see ``export_llm``).

    Raises:
      ConversionError naming every missing/unexpected param and shape mismatch of a stage.
    """
    params, cfg = _model_parts(model, config)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; expected a subset of {STAGES}")
    absent = [s for s in stages if s not in params]
    if absent:
        raise ConversionError(f"params have no {', '.join(absent)} stage (found {sorted(params)})")
    out = {}
    for stage in stages:
        if stage == "llm":
            out[stage] = export_llm(params[stage], cfg.llm, lm_head=lm_head)
        elif stage == "flow":
            out[stage] = export_flow(params[stage], cfg.flow)
        else:
            out[stage] = export_hift(params[stage], cfg.hift)
    return out


def to_torch(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """numpy state_dict -> torch tensors; keys that share one numpy array share one tensor (tied lm_head)."""
    import torch

    made: dict[int, Any] = {}
    out = {}
    for key, arr in state_dict.items():
        if id(arr) not in made:
            # a copy only where needed: device_get arrays are read-only, transposes are views
            made[id(arr)] = torch.from_numpy(np.require(arr, requirements=("C_CONTIGUOUS", "WRITEABLE")))
        out[key] = made[id(arr)]
    return out


def export_to_dir(model: ConvertedModel | Mapping[str, Any], out_dir: str, *, config: ModelConfig | None = None,
                  template_dir: str | None = None, overwrite: bool = False, lm_head: Any = None) -> str:
    """Write llm.pt, flow.pt and hift.pt (torch.save) to ``out_dir`` atomically; returns its absolute path.

    Args:
      model: a ConvertedModel or a params dict (with ``config``), as for ``export_state_dicts``.
      template_dir: a release directory whose other files (cosyvoice3.yaml, CosyVoice-BlankEN/, the
        ONNX frontend models) are copied alongside, so ``out_dir`` loads in upstream's
        ``AutoModel`` as it is; its llm.rl.pt and its ``.cosyjax`` conversion cache are not copied.
        Without it only the three .pt files are written.
      overwrite: replace an existing ``out_dir``.

    Raises:
      FileExistsError if ``out_dir`` exists and ``overwrite`` is False (checked before any work);
      ConversionError for params of the wrong structure.  Nothing is written on failure.
    """
    import torch

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: output exists (pass overwrite=True to replace it)")
    if template_dir is not None and not os.path.isdir(template_dir):
        raise FileNotFoundError(f"{template_dir}: template release directory not found")
    state_dicts = export_state_dicts(model, config=config, lm_head=lm_head)
    with staged_dir(out_dir) as tmp:
        if template_dir is not None:
            # not the template's own weights (an llm.rl.pt beside the exported llm.pt would be the old LLM),
            # nor its convert-on-first-use cache
            skip = set(STAGE_FILES.values()) | set(LLM_FILES) | {CONVERTED_SUBDIR}
            shutil.copytree(template_dir, tmp, dirs_exist_ok=True,
                            ignore=lambda d, names: [n for n in names if os.path.samefile(d, template_dir)
                                                     and n in skip])
        for stage, sd in state_dicts.items():
            torch.save(to_torch(sd), os.path.join(tmp, STAGE_FILES[stage]))
    return out_dir


__all__ = ["export_state_dicts", "export_to_dir", "export_llm", "export_flow", "export_hift", "unfold_weight_norm",
           "to_torch", "INVERSES"]
