"""Train-state checkpoints with orbax: save mid-run, restore into a fresh ``TrainState``, resume exactly.

Layout of a checkpoint directory ``C``::

    C/meta.json   {"format": FORMAT, "step": int, "leaves": {"params/llm/...": [shape, dtype], ...},
                   "metadata": {...}}            (metadata: whatever the caller passes, e.g. configs)
    C/state/      orbax PyTree checkpoint of the state as a nested dict, one entry per leaf

The state is stored by leaf *path* (``step``, ``params/...``, ``opt_state/...``, ``rng``), not by
pickled Python structure, so restoring needs a template ``like`` (a ``TrainState`` built the same
way: same model, same optimizer) and a mismatch is reported as one error listing every missing
leaf, unexpected leaf and shape/dtype difference.  Restored leaves take the shardings of ``like``'s
(a replicated or pmap-replicated template restores replicated; an uncommitted one uncommitted).

Writes are atomic: everything goes to a sibling temp directory that is renamed into place
(``cosyjax.atomic.staged_dir``), so an interrupted save never leaves a half checkpoint.
``save_checkpoint(run_dir, state)`` keeps ``run_dir/step_00000100``-style subdirectories and prunes
old ones; ``latest_checkpoint(run_dir)`` finds the newest for resuming.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from typing import Any, Mapping

import jax
import numpy as np

from cosyjax.atomic import staged_dir
from cosyjax.checkpoint import structure_problems

FORMAT = "cosyjax-train-state-v1"
META_NAME = "meta.json"
STATE_DIR = "state"
STEP_DIR = re.compile(r"^step_(\d{8,})$")


class TrainCheckpointError(ValueError):
    """A train-state checkpoint is missing, of another format, or does not fit the template state."""


def _checkpointer() -> Any:
    """An orbax PyTree checkpointer for this process alone.

    Train states are saved as host numpy arrays by one process (multi-host runs: process 0) and read
    by every process on its own, so orbax's cross-process barriers must not wait for the others.
    """
    import orbax.checkpoint as ocp

    if jax.process_count() == 1:
        return ocp.PyTreeCheckpointer()
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                                 barrier_sync_key_prefix=f"process{me}")
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=options),
                            multiprocessing_options=options)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """``[(path, leaf)]`` of a pytree in flatten order; path parts are dict keys, field names, indices."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(_key_name(k) for k in path), leaf) for path, leaf in flat]


def _nested(items: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path, leaf in items:
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = leaf
    return root


def _lookup(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _describe(leaf: Any) -> list[Any]:
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return [list(np.shape(leaf)), str(dtype)]


def save_train_state(path: str, state: Any, *, overwrite: bool = False,
                     metadata: Mapping[str, Any] | None = None) -> str:
    """Write ``state`` (a TrainState or any pytree of arrays) to ``path`` atomically; returns the absolute path.

    Args:
      metadata: JSON-serialisable extras stored in meta.json (``read_metadata``).
    Raises:
      TrainCheckpointError if ``path`` exists and ``overwrite`` is False (nothing is written).
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise TrainCheckpointError(f"{path}: checkpoint exists (pass overwrite=True to replace it)")
    items = [(p, np.asarray(jax.device_get(leaf))) for p, leaf in leaf_paths(state)]
    if not items:
        raise TrainCheckpointError("state has no array leaves")
    step = next((int(leaf.reshape(-1)[0]) for p, leaf in items if p == ("step",)), None)  # pmap: [D]
    meta = {"format": FORMAT, "step": step, "leaves": {"/".join(p): _describe(leaf) for p, leaf in items},
            "metadata": dict(metadata or {})}
    json.dumps(meta)  # fail on unserialisable metadata before writing anything
    with staged_dir(path) as tmp:
        _checkpointer().save(os.path.join(tmp, STATE_DIR), _nested(items))
        with open(os.path.join(tmp, META_NAME), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    return path


def read_metadata(path: str) -> dict[str, Any]:
    """meta.json of a checkpoint (format, step, leaves, metadata); TrainCheckpointError if it is not one."""
    meta_path = os.path.join(path, META_NAME)
    if not os.path.isdir(path):
        raise TrainCheckpointError(f"{path}: checkpoint directory not found")
    if not os.path.isfile(meta_path) or not os.path.isdir(os.path.join(path, STATE_DIR)):
        raise TrainCheckpointError(f"{path}: not a train-state checkpoint (needs {META_NAME} and {STATE_DIR}/)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TrainCheckpointError(f"{meta_path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise TrainCheckpointError(f"{meta_path}: format {found!r}, expected {FORMAT!r}")
    return meta


def restore_train_state(path: str, like: Any) -> Any:
    """Restore a checkpoint into the structure of ``like`` (e.g. a fresh ``TrainState.create(...)``).

    Args:
      path: a checkpoint directory (from ``save_train_state``), or a run directory of
        ``save_checkpoint`` (its latest step is used).
      like: template pytree with the same leaf paths, shapes and dtypes; its values are ignored, its
        shardings (for jax arrays) are used for the restored leaves.
    Raises:
      TrainCheckpointError for a missing/foreign checkpoint, or one listing every missing leaf,
      unexpected leaf and shape/dtype mismatch against ``like``.
    """
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, META_NAME)):
        latest = latest_checkpoint(path)
        if latest is not None:
            path = latest
    meta = read_metadata(path)
    saved = {k: (tuple(v[0]), v[1]) for k, v in meta["leaves"].items()}
    wanted = leaf_paths(like)
    want = {"/".join(p): (tuple(np.shape(leaf)), _describe(leaf)[1]) for p, leaf in wanted}
    missing = sorted(k for k in want if k not in saved)
    unexpected = sorted(k for k in saved if k not in want)
    mismatched = [f"{k}: saved {saved[k][0]} {saved[k][1]}, expected {want[k][0]} {want[k][1]}"
                  for k in want if k in saved and saved[k] != want[k]]
    problems = structure_problems(missing, unexpected, mismatched,
                                  names=("leaves missing from the checkpoint", "leaves the template does not have",
                                         "shape/dtype mismatches"))
    if problems:
        raise TrainCheckpointError(f"{path}: checkpoint does not fit the template state (another model or "
                                   f"optimizer?): " + " | ".join(problems))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # orbax warns that numpy leaves carry no sharding
        tree = _checkpointer().restore(os.path.join(os.path.abspath(path), STATE_DIR))
    leaves = []
    for p, leaf in wanted:
        value = np.asarray(_lookup(tree, p))
        # Committed only where the template is: a jitted step keys its cache on it, and an
        # uncommitted template restored as committed arrays would compile the step again.
        if isinstance(leaf, jax.Array) and leaf.committed:
            leaves.append(jax.device_put(value, leaf.sharding))
        else:
            leaves.append(jax.numpy.asarray(value))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"step_{step:08d}")


def checkpoint_steps(run_dir: str) -> list[int]:
    """Steps of the complete checkpoints under ``run_dir``, ascending (temp directories are ignored)."""
    if not os.path.isdir(run_dir):
        return []
    steps = []
    for name in os.listdir(run_dir):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(run_dir, name, META_NAME)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest ``run_dir/step_*`` checkpoint, or None."""
    steps = checkpoint_steps(run_dir)
    return step_dir(run_dir, steps[-1]) if steps else None


def save_checkpoint(run_dir: str, state: Any, *, keep: int | None = 3,
                    metadata: Mapping[str, Any] | None = None) -> str:
    """Save ``state`` as ``run_dir/step_{state.step:08d}`` (replacing one of the same step); keep the newest ``keep``.

    Returns the checkpoint's path.  ``keep=None`` keeps all.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep={keep} must be >= 1 (or None)")
    step = int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])  # pmap-replicated steps are [D]
    path = save_train_state(step_dir(run_dir, step), state, overwrite=True, metadata=metadata)
    if keep is not None:
        for old in checkpoint_steps(run_dir)[:-keep]:
            shutil.rmtree(step_dir(run_dir, old), ignore_errors=True)
    return path


__all__ = ["FORMAT", "TrainCheckpointError", "checkpoint_steps", "latest_checkpoint", "leaf_paths", "read_metadata",
           "restore_train_state", "save_checkpoint", "save_train_state", "step_dir"]
