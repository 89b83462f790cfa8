"""A jitted train step: upstream's optimizer semantics in optax, bf16 compute, gradient accumulation.

What upstream does per optimizer step (``cosyvoice/utils/train_utils.py``, torch_ddp engine, with
``train_conf`` of ``examples/libritts/cosyvoice3/conf/cosyvoice3.yaml``: optim adam, lr 1e-5,
scheduler constantlr, warmup_steps 2500, grad_clip 5, accum_grad 2):

1. ``accum_grad`` micro-batches each run ``(loss / accum_grad).backward()``: the gradient is the *mean*
   of the micro-batch gradients, each micro-batch loss normalized on its own;
2. ``grad_norm = clip_grad_norm_(params, grad_clip)``: the total 2-norm of all gradients *before*
   clipping; gradients are multiplied by ``min(grad_clip / (grad_norm + 1e-6), 1)``;
3. if ``grad_norm`` is not finite the optimizer step is **skipped** (params and Adam moments
   unchanged, Adam's step count not advanced), but ``scheduler.step()`` still runs;
4. ``torch.optim.Adam`` (coupled L2 ``weight_decay``, 0 by default) or ``AdamW`` (decoupled decay,
   torch default 0.01), betas (0.9, 0.999), eps 1e-8 outside the square root;
5. learning rate: ``ConstantLR`` keeps ``lr`` (it takes no ``scheduler_conf``: the conf's
   ``warmup_steps`` is unused with constantlr), ``WarmupLR`` gives update k (0-based)
   ``lr * w^0.5 * min((k+1)^-0.5, (k+1) * w^-1.5)``: linear warm-up to ``lr`` at k+1 = w, then
   inverse square-root decay.

``make_optimizer`` builds exactly that chain in optax (defaults: upstream's SFT conf, adam +
constantlr, so a fine-tune here follows the same update rule as one with upstream's recipe;
``optim="adamw", scheduler="warmuplr"`` is the usual from-scratch choice and is one argument away).
It is wrapped in ``optax.inject_hyperparams`` so the learning rate used by each update is in the
optimizer state and reported.  Clipping (``clip_by_global_norm_torch``) and Adam
(``scale_by_adam_torch``) follow torch's formulas rather than optax's near-equivalents; against
``torch.optim`` + ``clip_grad_norm_`` the params agree to 3e-8 after 7 steps (tests/test_train_step.py).

``make_train_step`` is generic over ``loss_fn(params, batch, rng) -> (loss, aux)``:

- params in ``TrainState`` are float32 master weights; with ``compute_dtype=jnp.bfloat16`` the loss
  sees a bf16 copy, and the gradient (through the cast) and the update are float32;
- the batch is a dict of arrays with one leading batch axis B.  With ``accum_steps = A`` it is cut
  into A micro-batches of B/A rows, micro-batch i holding rows i, i+A, i+2A, ... (strided, so a
  batch sharded over devices along B splits into micro-batches that are still evenly sharded);
- ``batch["example_index"]`` (the row's index in the global batch) is added when absent, and every
  micro-batch gets the same per-step rng ``fold_in(state.rng, state.step)``: a loss that keys its
  per-example randomness on ``example_index`` (``flow_loss`` does) draws the same numbers however
  the batch is split over micro-batches or devices.  Randomness keyed on the rng alone would be the
  same in every micro-batch, so flow_loss also folds ``example_index[0]`` into its dropout key;
- ``with_frozen=True``: the step takes a third argument, a pytree of frozen arrays (a LoRA base model,
  DPO's reference model) handed to ``loss_fn(params, batch, rng, frozen)``: not differentiated, not in
  the optimizer state, not donated, cast to ``compute_dtype`` like the params;
- ``weight_key=None`` combines micro-batches as upstream (mean of their losses and gradients);
  ``weight_key="num_tokens"`` (llm_loss) / ``"num_frames"`` (flow_loss) weights each by that aux
  count instead, which for a loss normalized by that count equals one big-batch step exactly
  (up to float rounding).  Aux values are combined the same way: float values averaged with the
  loss weights, integer values (counts) summed.

Legend: B batch rows, A accumulation steps.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
LossFn = Callable[..., tuple[Array, Mapping[str, Array]]]  # (params, batch, rng[, frozen]) -> (loss, aux)

EXAMPLE_INDEX = "example_index"
# train_conf of examples/libritts/cosyvoice3/conf/cosyvoice3.yaml (the SFT recipe).
UPSTREAM_TRAIN_CONF = {"optim": "adam", "lr": 1e-5, "scheduler": "constantlr", "warmup_steps": 2500,
                       "grad_clip": 5.0, "accum_grad": 2}
OPTIMS = ("adam", "adamw")
SCHEDULERS = ("constantlr", "warmuplr")
TORCH_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6)
TORCH_ADAMW_WEIGHT_DECAY = 0.01  # torch.optim.AdamW default (upstream passes only lr)


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: a pytree (jit, shard and checkpoint it as one).

    Attributes:
      step: [] int32, optimizer steps taken (upstream's scheduler steps, skipped ones included).
      params: float32 master params.
      opt_state: the optimizer's state.
      rng: [2] uint32 base PRNG key; step s uses ``fold_in(rng, s)``, so a resumed run draws the same.
    """

    step: Array
    params: Any
    opt_state: Any
    rng: Array

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation, rng: int | Array) -> "TrainState":
        """Initial state: params cast to float32 master weights, step 0.

        Args:
          params: a param pytree (numpy or jax; any float dtype).
          optimizer: e.g. ``make_optimizer()``.
          rng: an int seed or a PRNG key (raw uint32 [2] or a typed key).
        """
        master = jax.tree.map(_to_float32, params)
        return cls(step=jnp.zeros((), jnp.int32), params=master, opt_state=optimizer.init(master),
                   rng=_raw_key(rng))


def random_params(shapes: Any, seed: int) -> Any:
    """Numpy params for a ``param_shapes`` tree (no flax init to compile): norm weights 1, biases 0,
    kernels N(0, 1/fan_in), embeddings N(0, 1).  For training from scratch and tests."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name, dims = path[-1].key, tuple(shape.shape)
        if name == "weight":
            return np.ones(dims, np.float32)
        if name == "bias":
            return np.zeros(dims, np.float32)
        scale = 1.0 if name == "embedding" else float(np.prod(dims[:-1])) ** -0.5
        return (scale * rng.standard_normal(dims)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _to_float32(x: Any) -> Array:
    # Always a copy: the step donates the state, which must not free the caller's arrays.
    x = jnp.asarray(x)
    return jnp.array(x, dtype=jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, copy=True)


def _raw_key(rng: int | Array) -> Array:
    rng = jnp.asarray(rng)
    if rng.ndim == 0 and jnp.issubdtype(rng.dtype, jnp.integer):
        return jax.random.PRNGKey(int(rng))
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    if rng.dtype != jnp.uint32 or rng.shape != (2,):
        raise ValueError(f"rng must be an int seed or a PRNG key, found dtype {rng.dtype} shape {rng.shape}")
    return rng


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast the float leaves of a pytree to ``dtype`` (ints and bools unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# --------------------------------------------------------------------------------------------
# Optimizer (upstream semantics)
# --------------------------------------------------------------------------------------------
def warmup_lr(lr: float, warmup_steps: int) -> optax.Schedule:
    """Upstream ``WarmupLR``: update ``count`` (0-based) uses ``lr * w^0.5 * min(n^-0.5, n * w^-1.5)``, n = count + 1.

    torch's scheduler calls ``step()`` once at construction, so the first update already runs at n = 1.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")

    def schedule(count: Array) -> Array:
        n = jnp.asarray(count, jnp.float32) + 1.0
        if warmup_steps == 0:
            return lr * n ** -0.5
        return lr * warmup_steps ** 0.5 * jnp.minimum(n ** -0.5, n * warmup_steps ** -1.5)

    return schedule


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: scale by ``min(max_norm / (norm + 1e-6), 1)``.

    (optax's ``clip_by_global_norm`` scales by ``max_norm / norm`` without the 1e-6.)
    """
    def update(updates, state, params=None):
        del params
        norm = optax.global_norm(updates)
        coef = jnp.minimum(max_norm / (norm + TORCH_CLIP_EPS), 1.0)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Apply ``inner`` only when the incoming gradient norm is finite; else zero updates and keep its state.

    Upstream: ``if torch.isfinite(grad_norm): optimizer.step()``.  Unlike ``optax.apply_if_finite`` it
    never gives up and applies a non-finite update.
    """
    def update(updates, state, params=None):
        finite = jnp.isfinite(optax.global_norm(updates))
        new_updates, new_state = inner.update(updates, state, params)
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
        new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
        return new_updates, new_state

    return optax.GradientTransformation(inner.init, update)


def scale_by_adam_torch(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam's direction as ``torch.optim.Adam`` computes it: ``(m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

    optax's ``scale_by_adam`` evaluates ``1 - b2**t`` in float32, which cancels: 1 - 0.999 comes out
    1.3e-5 off, and that error reaches every update (measured: params 2e-6 away from torch after
    7 steps at lr 0.05).  torch computes the corrections in Python double; ``-expm1(t * log(b))``
    gets them to float32 rounding.
    """
    log_b1, log_b2 = math.log(b1), math.log(b2)

    def init(params):
        return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32), mu=jax.tree.map(jnp.zeros_like, params),
                                      nu=jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        t = count.astype(jnp.float32)
        correction1 = -jnp.expm1(t * log_b1)
        sqrt_correction2 = jnp.sqrt(-jnp.expm1(t * log_b2))
        direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) / sqrt_correction2 + eps) / correction1, mu, nu)
        return direction, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def _upstream_chain(learning_rate: float, *, optim: str, grad_clip: float | None, weight_decay: float,
                    b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    inner = []
    if grad_clip is not None:
        inner.append(clip_by_global_norm_torch(grad_clip))
    if optim == "adam" and weight_decay:
        inner.append(optax.add_decayed_weights(weight_decay))  # torch Adam: L2 added to the gradient
    inner.append(scale_by_adam_torch(b1=b1, b2=b2, eps=eps))
    if optim == "adamw" and weight_decay:
        inner.append(optax.add_decayed_weights(weight_decay))  # torch AdamW: p -= lr * wd * p
    # The learning rate sits outside the skip: the schedule advances on skipped steps, as upstream's.
    return optax.chain(skip_nonfinite(optax.chain(*inner)), optax.scale_by_learning_rate(learning_rate))


def make_optimizer(*, optim: str = "adam", lr: float = 1e-5, scheduler: str | optax.Schedule = "constantlr",
                   warmup_steps: int = 2500, grad_clip: float | None = 5.0, weight_decay: float | None = None,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
    """Upstream's optimizer step as one optax transformation (defaults: the cosyvoice3.yaml SFT conf).

    Args:
      optim: "adam" (torch.optim.Adam, upstream's conf) or "adamw" (torch.optim.AdamW).
      lr: base learning rate (upstream optim_conf.lr).
      scheduler: "constantlr" (upstream's conf; ``warmup_steps`` unused, as upstream), "warmuplr"
        (upstream WarmupLR), or any optax schedule ``count -> lr``.
      warmup_steps: WarmupLR's warm-up length.
      grad_clip: clip_grad_norm_ max norm (None: no clipping; non-finite steps are still skipped).
      weight_decay: None gives torch's default: 0 for adam, 0.01 for adamw.
    Returns:
      ``optax.inject_hyperparams`` transformation; ``state.hyperparams["learning_rate"]`` is the
      learning rate of the last update.
    """
    if optim not in OPTIMS:
        raise ValueError(f"optim={optim!r}; expected one of {OPTIMS}")
    if callable(scheduler):
        schedule = scheduler
    elif scheduler == "constantlr":
        schedule = optax.constant_schedule(lr)
    elif scheduler == "warmuplr":
        schedule = warmup_lr(lr, warmup_steps)
    else:
        raise ValueError(f"scheduler={scheduler!r}; expected one of {SCHEDULERS} or a callable schedule")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip={grad_clip} must be > 0 (or None)")
    if weight_decay is None:
        weight_decay = TORCH_ADAMW_WEIGHT_DECAY if optim == "adamw" else 0.0
    static = {"optim": optim, "grad_clip": grad_clip, "weight_decay": weight_decay, "b1": b1, "b2": b2, "eps": eps}
    return optax.inject_hyperparams(_upstream_chain, static_args=tuple(static))(learning_rate=schedule, **static)


def optimizer_from_train_conf(train_conf: Mapping[str, Any]) -> tuple[optax.GradientTransformationExtraArgs, int]:
    """An upstream yaml ``train_conf`` dict -> (optimizer, accum_steps).

    Reads optim, optim_conf (lr, weight_decay, betas, eps), scheduler, scheduler_conf.warmup_steps,
    grad_clip and accum_grad; other keys (max_epoch, log_interval, ...) are not the step's business.
    """
    optim_conf = dict(train_conf.get("optim_conf", {}))
    unknown = set(optim_conf) - {"lr", "weight_decay", "betas", "eps"}
    if unknown:
        raise ValueError(f"train_conf.optim_conf: unsupported keys {sorted(unknown)}")
    betas = optim_conf.get("betas", (0.9, 0.999))
    optimizer = make_optimizer(
        optim=train_conf.get("optim", "adam"), lr=float(optim_conf.get("lr", 1e-3)),
        scheduler=train_conf.get("scheduler", "constantlr"),
        warmup_steps=int(dict(train_conf.get("scheduler_conf") or {}).get("warmup_steps", 25000)),
        grad_clip=float(train_conf["grad_clip"]) if "grad_clip" in train_conf else None,
        weight_decay=optim_conf.get("weight_decay"), b1=float(betas[0]), b2=float(betas[1]),
        eps=float(optim_conf.get("eps", 1e-8)))
    return optimizer, int(train_conf.get("accum_grad", 1))


# --------------------------------------------------------------------------------------------
# Loss and gradients over micro-batches (and devices)
# --------------------------------------------------------------------------------------------
def batch_size(batch: Mapping[str, Any]) -> int:
    """The common leading dimension of every batch array; ValueError naming the odd one out."""
    if not isinstance(batch, Mapping) or not batch:
        raise ValueError("batch must be a non-empty dict of arrays with a leading batch axis")
    sizes = {k: (v.shape[0] if getattr(v, "ndim", 0) else None) for k, v in batch.items()}
    first = next(iter(sizes.values()))
    bad = [f"{k} {tuple(batch[k].shape)}" for k, b in sizes.items() if b is None or b != first]
    if bad:
        raise ValueError(f"batch arrays must share one leading batch axis (first is {first}); odd: {', '.join(bad)}")
    return int(first)


def split_micro_batches(batch: Mapping[str, Array], accum_steps: int) -> dict[str, Array]:
    """[B, ...] leaves -> [A, B/A, ...]; micro-batch i holds rows i, i+A, i+2A, ..."""
    size = batch_size(batch)
    if size % accum_steps:
        raise ValueError(f"batch size {size} is not divisible by accum_steps={accum_steps}")

    def split(x):
        x = x.reshape((size // accum_steps, accum_steps) + x.shape[1:])  # [B/A, A, ...]
        return jnp.swapaxes(x, 0, 1)  # [A, B/A, ...]

    return {k: split(v) for k, v in batch.items()}


def make_grad_fn(loss_fn: LossFn, *, compute_dtype: Any = None, accum_steps: int = 1, weight_key: str | None = None,
                 axis_name: str | None = None, with_frozen: bool = False
                 ) -> Callable[..., tuple[Array, Any, dict[str, Array]]]:
    """``(params, batch, rng[, frozen]) -> (loss, grads, aux)`` over A micro-batches (and the devices of ``axis_name``).

    The result is ``sum_i w_i * x_i / sum_i w_i`` for x = loss, grads and float aux values, with
    ``w_i = aux_i[weight_key]`` (1 when ``weight_key`` is None); integer aux values are summed.  With
    ``axis_name`` (inside pmap/shard_map) the sums run over every device's micro-batches too.
    Gradients are float32 (d loss / d master params) whatever ``compute_dtype``.
    """
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps={accum_steps!r} must be an int >= 1")

    def cast(tree):
        return cast_floating(tree, compute_dtype) if compute_dtype is not None else tree

    def one(params, micro, rng, frozen):
        def objective(p):
            args = (cast(p), micro, rng) + ((cast(frozen),) if with_frozen else ())
            loss, aux = loss_fn(*args)
            return jnp.asarray(loss, jnp.float32), aux

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
        if weight_key is not None and weight_key not in aux:
            raise ValueError(f"weight_key={weight_key!r} not in the loss's aux (keys: {sorted(aux)})")
        w = jnp.asarray(aux[weight_key], jnp.float32) if weight_key is not None else jnp.float32(1.0)
        aux_sums = {k: (w * jnp.asarray(v, jnp.float32) if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)
                        else jnp.asarray(v, jnp.int32)) for k, v in aux.items()}
        return {"w": w, "loss": w * loss, "grads": jax.tree.map(lambda g: w * g, grads), "aux": aux_sums}

    def grad_fn(params, batch, rng, frozen=None):
        frozen = jax.lax.stop_gradient(frozen)
        batch = dict(batch)
        local = batch_size(batch)
        if EXAMPLE_INDEX not in batch:
            offset = jax.lax.axis_index(axis_name) * local if axis_name is not None else 0
            batch[EXAMPLE_INDEX] = offset + jnp.arange(local, dtype=jnp.int32)
        if accum_steps == 1:
            sums = one(params, batch, rng, frozen)
        else:
            micro = split_micro_batches(batch, accum_steps)
            first = one(params, jax.tree.map(lambda x: x[0], micro), rng, frozen)

            def body(carry, mb):
                return jax.tree.map(jnp.add, carry, one(params, mb, rng, frozen)), None

            sums, _ = jax.lax.scan(body, first, jax.tree.map(lambda x: x[1:], micro))
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        total = sums["w"]
        aux = {k: (v / total if jnp.issubdtype(v.dtype, jnp.floating) else v) for k, v in sums["aux"].items()}
        return sums["loss"] / total, jax.tree.map(lambda g: g / total, sums["grads"]), aux

    return grad_fn


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------
def learning_rate(opt_state: Any) -> Array:
    """The learning rate of the last update, from an ``inject_hyperparams`` state (NaN if there is none)."""
    hyper = getattr(opt_state, "hyperparams", None)
    if isinstance(hyper, Mapping) and "learning_rate" in hyper:
        return jnp.asarray(hyper["learning_rate"], jnp.float32)
    return jnp.float32(jnp.nan)


def build_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, compute_dtype: Any = None,
                     accum_steps: int = 1, weight_key: str | None = None, axis_name: str | None = None,
                     with_frozen: bool = False) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """The un-jitted step ``(state, batch[, frozen]) -> (state, metrics)`` (``make_train_step`` jits it;
    ``parallel`` jits it with shardings or pmaps it with ``axis_name``)."""
    grad_fn = make_grad_fn(loss_fn, compute_dtype=compute_dtype, accum_steps=accum_steps, weight_key=weight_key,
                           axis_name=axis_name, with_frozen=with_frozen)

    def step(state: TrainState, batch: Mapping[str, Array], frozen: Any = None
             ) -> tuple[TrainState, dict[str, Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        loss, grads, aux = grad_fn(state.params, batch, rng, frozen)
        grad_norm = optax.global_norm(grads)  # clip_grad_norm_'s return value: before clipping
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": learning_rate(opt_state),
                   "skipped": ~jnp.isfinite(grad_norm), **aux}
        return new, metrics

    return step


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, compute_dtype: Any = None,
                    accum_steps: int = 1, weight_key: str | None = None, with_frozen: bool = False
                    ) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """Jitted ``step(state, batch) -> (new_state, metrics)``; ``state`` is donated (do not reuse it).

    Args:
      loss_fn: ``(params, batch, rng) -> (loss scalar, aux dict of scalars)``, e.g.
        ``lambda p, b, r: llm_loss(p, b, cfg=cfg)`` or ``lambda p, b, r: flow_loss(p, b, r, cfg=cfg)``.
      optimizer: an optax transformation (``make_optimizer()``); it receives float32 gradients.
      compute_dtype: e.g. ``jnp.bfloat16``: the loss runs on params cast to it (float32 masters kept).
      accum_steps: micro-batches per step (upstream accum_grad); B must be divisible by it.
      weight_key: aux count to weight micro-batches by (see the module docstring); None = upstream.
      with_frozen: ``step(state, batch, frozen)`` and ``loss_fn(params, batch, rng, frozen)`` (see the
        module docstring).
    Returns:
      ``step``; metrics: loss, grad_norm (before clipping), lr (of this update; NaN for an optimizer
      without ``inject_hyperparams``), skipped (the gradient norm is not finite: ``make_optimizer``'s
      transformation then leaves params and moments unchanged), and the loss's aux values
      (integer ones, e.g. token counts, as int32 sums).
    """
    step = build_train_step(loss_fn, optimizer, compute_dtype=compute_dtype, accum_steps=accum_steps,
                            weight_key=weight_key, with_frozen=with_frozen)
    return jax.jit(step, donate_argnums=0)


__all__ = ["TrainState", "UPSTREAM_TRAIN_CONF", "build_train_step", "cast_floating", "clip_by_global_norm_torch",
           "learning_rate", "make_grad_fn", "make_optimizer", "make_train_step", "optimizer_from_train_conf",
           "scale_by_adam_torch", "skip_nonfinite", "split_micro_batches", "warmup_lr"]
