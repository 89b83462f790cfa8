"""Shared converter machinery: load a ``.pt`` state_dict, apply a key table, check strictly.

A stage converter is a table of ``Entry(path, sources, transform)``: the JAX param path, the torch
key(s) it is made from, and a named transform.  ``apply_table`` fills a params pytree whose target
shapes come from ``jax.eval_shape`` of the Flax model, and fails with one error that lists every
missing key, unexpected key and shape mismatch.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from cosyjax.checkpoint import structure_problems


class ConversionError(ValueError):
    """A checkpoint cannot be converted: unreadable file, wrong keys or wrong shapes."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Load a torch ``state_dict`` file with ``weights_only=True`` into float32/int numpy arrays.

    Raises ``ConversionError`` naming the file for: a missing file, a truncated or non-zip file,
    a pickle that ``weights_only`` refuses, or content that is not a mapping of tensors.
    """
    import torch  # convert/ is the only place that needs torch

    if not os.path.isfile(path):
        raise ConversionError(f"{path}: checkpoint file not found")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"{path}: checkpoint file is empty")
    if not zipfile.is_zipfile(path):
        raise ConversionError(f"{path}: not a torch zip checkpoint (truncated or not saved by torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: refused by torch.load(weights_only=True): {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: cannot read checkpoint: {first}") from None
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state_dict (mapping of tensors), found {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: key {key!r} holds {type(value).__name__}, not a tensor")
        t = value.detach().cpu()
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.float()
        out[str(key)] = t.numpy()
    return out


# --------------------------------------------------------------------------------------------
# Named transforms (torch layout -> JAX layout)
# --------------------------------------------------------------------------------------------
def identity(x: np.ndarray) -> np.ndarray:
    """Same layout (embeddings, norms, biases, Snake alphas)."""
    return x


def linear_t(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax Dense kernel [in, out].

    A view, not a copy: a full-size shape check on zero-stride arrays then costs no memory, and the
    copy happens once, when the array is saved or put on a device.
    """
    return w.T


def conv1d_t(w: np.ndarray) -> np.ndarray:
    """torch Conv1d weight [out, in/groups, k] -> channels-last kernel [k, in/groups, out] (a view)."""
    return np.transpose(w, (2, 1, 0))


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """W = g * v / ||v|| with the norm over every axis but 0 (torch weight_norm, dim=0).

    Computed with torch's own ``_weight_norm`` so the folded weight is bitwise the one upstream's
    parametrization produces at run time (SPEC 10.7: fold in float32).
    """
    import torch

    return torch._weight_norm(torch.from_numpy(v), torch.from_numpy(g), 0).numpy()


def conv1d_weight_norm_t(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Weight-normed torch Conv1d (g, v) -> folded channels-last kernel [k, in, out]."""
    return conv1d_t(fold_weight_norm(g, v))


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
    """One param: ``path`` in the JAX tree, made by ``transform(*state_dict[k] for k in keys)``.

    ``alternatives`` lists other key tuples accepted for the same param (e.g. the legacy
    ``weight_g``/``weight_v`` weight-norm form); the first tuple whose keys are all present is used.
    """

    path: tuple[str, ...]
    keys: tuple[str, ...]
    transform: Callable[..., np.ndarray] = identity
    alternatives: tuple[tuple[str, ...], ...] = ()


def plain(path: Sequence[str], key: str, transform: Callable[[np.ndarray], np.ndarray] = identity) -> Entry:
    return Entry(tuple(path), (key,), transform)


def weight_normed(path: Sequence[str], module: str, transform: Callable[..., np.ndarray] = conv1d_weight_norm_t) -> Entry:
    """A weight-normed torch module's weight, in either the parametrizations or the legacy form."""
    return Entry(
        tuple(path),
        (f"{module}.parametrizations.weight.original0", f"{module}.parametrizations.weight.original1"),
        transform,
        alternatives=((f"{module}.weight_g", f"{module}.weight_v"),),
    )


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path, v in flat.items():
        node = root
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return root


def flatten_params(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    """Nested dict pytree -> {path tuple: leaf}."""
    return _flatten(tree)


def unflatten_params(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    return _unflatten(flat)


def apply_table(
    state_dict: Mapping[str, np.ndarray],
    table: Iterable[Entry],
    expected: Mapping[str, Any],
    *,
    source: str,
    consumed: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Build a params pytree from ``state_dict`` with ``table``; strict in both directions.

    Args:
      state_dict: torch key -> numpy array.
      table: the stage's entries.
      expected: pytree of ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape`` of the model's init).
      source: file name for error messages.
      consumed: torch keys that are read but map to no param (e.g. a tied lm_head), with the reason;
        the stage converter checks their values itself.

    Returns:
      Nested dict of float32 numpy arrays with exactly the structure of ``expected``.

    Raises:
      ConversionError listing every missing key, unexpected key, unfilled param and shape mismatch.
    """
    expected_flat = _flatten(expected)
    out: dict[tuple[str, ...], np.ndarray] = {}
    used: set[str] = set(consumed or {})
    missing: list[str] = []
    mismatched: list[str] = []
    unknown_paths: list[str] = []
    for entry in table:
        keys = next((alt for alt in (entry.keys,) + entry.alternatives if all(k in state_dict for k in alt)), None)
        if keys is None:
            missing.extend(k for k in entry.keys if k not in state_dict)
            continue
        used.update(keys)
        if entry.path not in expected_flat:
            unknown_paths.append("/".join(entry.path))
            continue
        arr = entry.transform(*(state_dict[k] for k in keys))
        want = tuple(expected_flat[entry.path].shape)
        if tuple(arr.shape) != want:
            found = " + ".join(f"{k} {tuple(state_dict[k].shape)}" for k in keys)
            mismatched.append(f"{found} -> {'/'.join(entry.path)} {tuple(arr.shape)}, expected {want}")
            continue
        out[entry.path] = np.asarray(arr, dtype=np.float32) if np.issubdtype(arr.dtype, np.floating) else arr
    unexpected = sorted(k for k in state_dict if k not in used)
    unfilled = sorted("/".join(p) for p in expected_flat if p not in out
                      and not any(p == e.path for e in table))
    problems = structure_problems(missing, unexpected, mismatched,
                                  names=("missing keys", "unexpected keys", "shape mismatches"))
    if unknown_paths:  # a table bug, not a checkpoint problem
        problems.append(f"table maps to params the model does not have: {', '.join(unknown_paths)}")
    if unfilled:
        problems.append(f"model params no key fills: {', '.join(unfilled)}")
    if problems:
        raise ConversionError(f"{source}: " + " | ".join(problems))
    return _unflatten(out)


def strip_prefix(state_dict: Mapping[str, np.ndarray], substring: str) -> dict[str, np.ndarray]:
    """Remove every occurrence of ``substring`` from the keys, as upstream does for hift's ``generator.``."""
    out: dict[str, np.ndarray] = {}
    for k, v in state_dict.items():
        nk = k.replace(substring, "")
        if nk in out:
            raise ConversionError(f"key {k!r} collides with another key after removing {substring!r}")
        out[nk] = v
    return out


def shape_only_state_dict(entries: Iterable[Sequence[Any]]) -> dict[str, np.ndarray]:
    """Zero-stride float32 arrays for ``[key, shape, dtype]`` manifest entries (no memory per element).

    Lets a table be checked against a full-size key/shape manifest without weights.
    """
    zero = np.zeros((), np.float32)
    return {str(k): np.broadcast_to(zero, tuple(shape)) for k, shape, *_ in entries}
