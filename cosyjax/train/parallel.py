"""Data parallelism for the train step: ``jit`` over a ``Mesh`` with shardings, or ``pmap``.

Both split the batch axis B over the devices and replicate the train state (params, optimizer state,
step, rng); the step itself is ``step.build_train_step``, the one ``make_train_step`` jits.

- ``make_sharded_train_step(loss_fn, optimizer, mesh)``: ``jax.jit`` with ``in_shardings`` (state
  replicated, batch ``NamedSharding(mesh, P("data"))``).  The program is the single-device program
  on the global batch; XLA partitions it and inserts the gradient all-reduce.  So the loss and the
  gradients are those of one device on the same global batch up to float summation order, for any
  loss (normalized by tokens, frames or rows).
- ``make_pmap_train_step(loss_fn, optimizer)``: ``jax.pmap`` of the step with ``axis_name``; each
  device computes its shard's loss and gradients and they are combined with ``psum``.  With
  ``weight_key`` (``"num_tokens"`` for llm_loss, ``"num_frames"`` for flow_loss) shards are weighted
  by that count, which gives the single-device loss on the global batch; with ``weight_key=None``
  every shard weighs the same, as upstream's DDP (mean of per-rank losses normalized per rank), which
  differs from the global-batch loss when the shards hold different counts.

Random draws: the step adds ``batch["example_index"]`` (the row's index in the *global* batch,
under pmap ``axis_index * local_B + row``) and gives every device the same rng, so a loss that keys
per-example draws on it (flow_loss) draws what one device would.  Dropout masks (flow_loss with
``deterministic=False``) depend on the local shape and are not shard-invariant; flow_loss folds the
shard's first ``example_index`` into its dropout key, so devices (and micro-batches) draw different
masks.

pmap's batch is ``[D, B/D, ...]`` (``split_for_pmap``): device d holds rows d*B/D ... (d+1)*B/D - 1,
the rows the mesh's ``P("data")`` sharding gives device d, so the two paths see the same split.

Legend: D devices, B global batch rows.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cosyjax.train.step import LossFn, TrainState, batch_size, build_train_step, make_grad_fn

DATA_AXIS = "data"
StepFn = Callable[[TrainState, Mapping[str, Any]], tuple[TrainState, dict[str, jax.Array]]]


# --------------------------------------------------------------------------------------------
# Mesh (jit + shardings)
# --------------------------------------------------------------------------------------------
def make_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) with the batch axis ``axis_name``."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: no devices")
    return Mesh(np.asarray(devices), (axis_name,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh's first axis, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Put a host batch on the mesh, rows split over the devices.

    Raises ValueError if B is not divisible by the number of devices (jit would pad nothing: every
    device must hold the same number of rows).
    """
    size = batch_size(batch)
    devices = mesh.devices.size
    if size % devices:
        raise ValueError(f"batch size {size} is not divisible by the {devices} devices of the mesh")
    return jax.device_put(dict(batch), data_sharding(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put a pytree (e.g. a TrainState) on every device of the mesh."""
    return jax.device_put(tree, replicated_sharding(mesh))


def make_sharded_grad_fn(loss_fn: LossFn, mesh: Mesh, *, compute_dtype: Any = None, accum_steps: int = 1,
                         weight_key: str | None = None) -> Callable[[Any, Mapping[str, jax.Array], jax.Array],
                                                                   tuple[jax.Array, Any, dict[str, jax.Array]]]:
    """Jitted ``(params, batch, rng) -> (loss, grads, aux)`` with the batch split over ``mesh``.

    Same numbers as ``jax.jit(make_grad_fn(...))`` on one device (for checks and research).
    """
    grad_fn = make_grad_fn(loss_fn, compute_dtype=compute_dtype, accum_steps=accum_steps, weight_key=weight_key)
    rep = replicated_sharding(mesh)
    return jax.jit(grad_fn, in_shardings=(rep, data_sharding(mesh), rep), out_shardings=rep)


def make_sharded_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                            compute_dtype: Any = None, accum_steps: int = 1, weight_key: str | None = None,
                            with_frozen: bool = False) -> StepFn:
    """``make_train_step`` over a mesh: state replicated (donated), batch split along B.

    Put the inputs in place first (``replicate(state, mesh)``, ``shard_batch(batch, mesh)``); host
    arrays are also accepted and placed by jit.  With ``accum_steps`` A, B/A should be a multiple of
    the device count so that every micro-batch is evenly split (otherwise XLA reshuffles rows; the
    result is the same).  ``with_frozen``: a third, replicated argument (``step.make_train_step``).
    """
    step = build_train_step(loss_fn, optimizer, compute_dtype=compute_dtype, accum_steps=accum_steps,
                            weight_key=weight_key, with_frozen=with_frozen)
    rep = replicated_sharding(mesh)
    shardings = (rep, data_sharding(mesh)) + ((rep,) if with_frozen else ())
    return jax.jit(step, in_shardings=shardings, out_shardings=(rep, rep), donate_argnums=0)


# --------------------------------------------------------------------------------------------
# pmap
# --------------------------------------------------------------------------------------------
def split_for_pmap(batch: Mapping[str, Any], num_devices: int) -> dict[str, np.ndarray]:
    """[B, ...] -> [D, B/D, ...]; device d gets rows d*B/D ... (d+1)*B/D - 1."""
    size = batch_size(batch)
    if size % num_devices:
        raise ValueError(f"batch size {size} is not divisible by {num_devices} devices")
    return {k: np.asarray(v).reshape((num_devices, size // num_devices) + tuple(v.shape[1:]))
            for k, v in batch.items()}


def replicate_for_pmap(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """A pytree with a leading device axis [D, ...], one copy per device (pmap's replicated layout)."""
    devices = list(jax.local_devices() if devices is None else devices)
    stacked = NamedSharding(Mesh(np.asarray(devices), ("devices",)), PartitionSpec("devices"))

    def put(x):
        x = np.asarray(x)  # a broadcast view: no host copy per device
        return jax.device_put(np.broadcast_to(x, (len(devices),) + x.shape), stacked)

    return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a pmap-replicated pytree (drops the leading device axis)."""
    return jax.tree.map(lambda x: x[0], tree)


def make_pmap_grad_fn(loss_fn: LossFn, *, compute_dtype: Any = None, accum_steps: int = 1,
                      weight_key: str | None = None, axis_name: str = DATA_AXIS,
                      devices: Sequence[jax.Device] | None = None) -> Callable:
    """pmapped ``(params [D,...], batch [D, B/D, ...], rng [D, 2]) -> (loss, grads, aux)``, each [D, ...]
    with identical rows (the combined result)."""
    grad_fn = make_grad_fn(loss_fn, compute_dtype=compute_dtype, accum_steps=accum_steps, weight_key=weight_key,
                           axis_name=axis_name)
    return jax.pmap(grad_fn, axis_name=axis_name, devices=devices)


def make_pmap_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, compute_dtype: Any = None,
                         accum_steps: int = 1, weight_key: str | None = None, axis_name: str = DATA_AXIS,
                         devices: Sequence[jax.Device] | None = None) -> StepFn:
    """``make_train_step`` under ``jax.pmap``.

    Args: as ``make_train_step``, plus ``axis_name`` and ``devices`` (default: all local devices).
      ``weight_key`` also weights the devices (see the module docstring).
    Returns:
      ``step(state, batch)`` with ``state = replicate_for_pmap(TrainState)`` (donated) and
      ``batch = split_for_pmap(batch, D)``; the new state stays replicated and every metric has a
      leading [D] axis of equal values (``unreplicate`` them).
    """
    step = build_train_step(loss_fn, optimizer, compute_dtype=compute_dtype, accum_steps=accum_steps,
                            weight_key=weight_key, axis_name=axis_name)
    return jax.pmap(step, axis_name=axis_name, devices=devices, donate_argnums=0)


__all__ = ["DATA_AXIS", "data_sharding", "make_mesh", "make_pmap_grad_fn", "make_pmap_train_step",
           "make_sharded_grad_fn", "make_sharded_train_step", "replicate", "replicate_for_pmap",
           "replicated_sharding", "shard_batch", "split_for_pmap", "unreplicate"]
