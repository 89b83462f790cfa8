"""``jax.export`` of every stage program: serialized StableHLO with a manifest of shapes and dtypes.

``export_programs(model, out_dir, platforms=("cpu", "cuda", "tpu"))`` exports each program of
``CosyVoice3Model.program_specs`` (prefill and decode chunk of the LLM, the flow offline and
stream push, the cache growth, the HiFT offline and stream push: every bucket the model's
``Limits`` reach) for the given platforms and writes, atomically:

    OUT/manifest.json             one entry per program: file, function, platforms, argument and
                                  result shapes/dtypes (params summarised), the static arguments
    OUT/<nnn>-<function>.jaxexport  ``jax.export.Exported.serialize()`` bytes

Weights are arguments of every program, not constants in it: a program serves any checkpoint of the
same config and precision.  ``load_program(path)`` deserializes one (``.call(*args)`` runs it).
This is the first step towards serving without the Python model code.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from cosyjax.atomic import staged_dir

FORMAT = "cosyjax-programs/1"
PLATFORMS = ("cpu", "cuda", "tpu")


def _describe(tree: Any) -> list[dict[str, Any]]:
    return [{"shape": list(leaf.shape), "dtype": str(leaf.dtype)} for leaf in jax.tree.leaves(tree)]


def _static(static: dict[str, Any]) -> dict[str, str]:
    """Static arguments for the manifest: a config by its class name, the rest by repr."""
    return {k: (type(v).__name__ if k == "cfg" else repr(v)) for k, v in static.items()}


def export_programs(model: Any, out_dir: str, *, platforms: Sequence[str] = ("cpu",), offline: bool = True,
                    stream: bool = True, batch_sizes: Sequence[int] = (1,), overwrite: bool = False,
                    progress: bool = False) -> dict[str, Any]:
    """Export every program of ``model.program_specs(...)`` to ``out_dir``; returns the manifest.

    Raises ValueError for an unknown platform or an existing ``out_dir`` without ``overwrite``.
    """
    from tqdm.auto import tqdm

    platforms = tuple(platforms)
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
        raise ValueError(f"platforms: {', '.join(unknown) or 'none given'}; expected some of {', '.join(PLATFORMS)}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"{out_dir}: output exists (pass overwrite=True / --overwrite to replace it)")
    specs = model.program_specs(offline=offline, stream=stream, batch_sizes=batch_sizes)
    entries = []
    with staged_dir(out_dir) as tmp:
        for i, (fn, args, static) in enumerate(tqdm(specs, desc="exporting", disable=not progress)):
            exported = jax.export.export(fn, platforms=platforms)(*args, **static)
            name = f"{i:03d}-{fn.__name__}.jaxexport"
            data = exported.serialize()
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
            entries.append({"file": name, "function": f"{fn.__module__}.{fn.__name__}", "platforms": list(platforms),
                            "params": {"arrays": len(jax.tree.leaves(args[0])),
                                       "bytes": int(sum(np.prod(a.shape) * a.dtype.itemsize
                                                        for a in jax.tree.leaves(args[0])))},
                            "args": _describe(args[1:]), "results": _describe(exported.out_avals),
                            "static": _static(static), "bytes": len(data)})
        manifest = {"format": FORMAT, "platforms": list(platforms), "precision": model.policy.name,
                    "limits": {k: getattr(model.limits, k) for k in model.limits.__dataclass_fields__},
                    "cache_len": model.cache_len, "programs": entries}
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
    return manifest


def load_program(path: str) -> jax.export.Exported:
    """Deserialize one exported program (a ``.jaxexport`` file written by ``export_programs``)."""
    import cosyjax.hift.stream  # noqa: F401  (registers the pytree types the programs use)
    import cosyjax.llm.decode  # noqa: F401

    with open(path, "rb") as f:
        return jax.export.deserialize(bytearray(f.read()))


__all__ = ["FORMAT", "PLATFORMS", "export_programs", "load_program"]
