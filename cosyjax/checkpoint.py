"""Converted-model directories: an orbax checkpoint of the params plus a JSON config.

Layout of a converted directory ``O``::

    O/config.json     {"format": FORMAT, "dtype": ..., "model": ModelConfig.to_dict(), "source": {...}}
    O/params/         orbax PyTree checkpoint of {"params": {"llm", "flow", "hift"}, "buffers": {...}}

``save_converted`` writes everything into a sibling temp directory and renames it into place at the
end, so a failure never leaves a half-written ``O``.  Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Mapping

import numpy as np

from cosyjax.atomic import staged_dir
from cosyjax.config import ModelConfig

FORMAT = "cosyjax-converted-v1"
CONFIG_NAME = "config.json"
PARAMS_DIR = "params"
DTYPES = ("float32", "bfloat16")
CONVERTED_SUBDIR = ".cosyjax"  # convert-on-first-use cache inside a release directory (cosyjax.pipeline)


def structure_problems(missing: list[str], unexpected: list[str], mismatched: list[str], *,
                       names: tuple[str, str, str]) -> list[str]:
    """The non-empty parts of a comparison of two structures, one message each, e.g.
    ``["missing keys: a, b", "shape mismatches: x (1,), expected (2,); y ..."]``; ``names`` labels the
    three lists."""
    parts = zip(names, (missing, unexpected, mismatched), (", ", ", ", "; "))
    return [f"{name}: {sep.join(items)}" for name, items, sep in parts if items]


class CheckpointError(ValueError):
    """A converted directory is missing, incomplete or of another format."""


@dataclasses.dataclass(frozen=True)
class ConvertedModel:
    """Everything the JAX runtime needs, as numpy arrays (put on device by the caller).

    Attributes:
      config: the release's stage configs.
      params: {"llm": ..., "flow": ..., "hift": ...} Flax param trees.
      buffers: non-parameter state the reference creates at construction time, e.g.
        ``flow_rand_noise`` [1, mel_bins, frames] (CausalConditionalCFM's seeded noise).
      dtype: "float32" or "bfloat16" (storage dtype of the float params; buffers stay float32).
      source: where the weights came from (file names, sha256), for provenance.
    """

    config: ModelConfig
    params: Mapping[str, Any]
    buffers: Mapping[str, np.ndarray]
    dtype: str = "float32"
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# Param subtrees kept in float32 in a bfloat16 conversion.  The NSF source integrates f0 into a phase
# of thousands of radians, so bf16 f0-predictor weights turn into audible phase drift (tiny-a: audio
# SNR 10 dB against the float32 reference with them in bf16); they are a few hundred kB at full size.
FLOAT32_ONLY = (("hift", "f0_predictor"), ("hift", "m_source"))


def cast_params(tree: Any, dtype: str, path: tuple[str, ...] = ()) -> Any:
    """Cast the float leaves of a params tree to ``dtype`` ("float32" or "bfloat16"), as numpy.

    ``path`` is the tree's position under the top level (e.g. ``("hift",)``), so subtrees listed in
    ``FLOAT32_ONLY`` stay float32 in a bfloat16 cast.
    """
    if isinstance(tree, Mapping):
        return {k: cast_params(v, dtype, path + (k,)) for k, v in tree.items()}
    arr = np.asarray(tree)
    if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"):
        return arr
    keep = any(path[:len(prefix)] == prefix for prefix in FLOAT32_ONLY)
    if dtype == "bfloat16" and not keep:
        import ml_dtypes

        return arr.astype(ml_dtypes.bfloat16)
    return arr.astype(np.float32)


def save_converted(out_dir: str, model: ConvertedModel, *, overwrite: bool = False) -> str:
    """Write ``model`` to ``out_dir`` atomically (temp dir + rename).

    Raises CheckpointError if ``out_dir`` exists and ``overwrite`` is False.
    """
    import orbax.checkpoint as ocp

    if model.dtype not in DTYPES:
        raise CheckpointError(f"dtype {model.dtype!r} not in {DTYPES}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise CheckpointError(f"{out_dir}: output exists (pass --overwrite / overwrite=True to replace it)")
    with staged_dir(out_dir) as tmp:
        tree = {"params": cast_params(model.params, model.dtype), "buffers": cast_params(model.buffers, "float32")}
        ckpt = ocp.PyTreeCheckpointer()
        ckpt.save(os.path.join(tmp, PARAMS_DIR), tree)
        meta = {"format": FORMAT, "dtype": model.dtype, "model": model.config.to_dict(), "source": dict(model.source)}
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    return out_dir


def load_converted(path: str) -> ConvertedModel:
    """Load a directory written by ``cosyjax convert`` / ``save_converted``.

    Returns:
      ConvertedModel with numpy params (float32 or bfloat16 as converted).
    """
    import orbax.checkpoint as ocp

    cfg_path = os.path.join(path, CONFIG_NAME)
    params_path = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: converted model directory not found (run `cosyjax convert` first)")
    if not os.path.isfile(cfg_path) or not os.path.isdir(params_path):
        raise CheckpointError(f"{path}: not a converted model (needs {CONFIG_NAME} and {PARAMS_DIR}/)")
    with open(cfg_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    ckpt = ocp.PyTreeCheckpointer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # orbax warns that numpy leaves carry no sharding
        tree = ckpt.restore(os.path.abspath(params_path))
    tree = _to_numpy(tree)
    return ConvertedModel(
        config=ModelConfig.from_dict(meta["model"]),
        params=tree["params"],
        buffers=tree.get("buffers", {}),
        dtype=meta["dtype"],
        source=meta.get("source", {}),
    )


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)
