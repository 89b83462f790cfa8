"""A training run: ``cosyjax train`` (upstream's ``cosyvoice/bin/train.py`` for the llm and the flow).

One run directory ``RUN`` holds::

    RUN/run.json          the options and resolved train_conf / data conf (what was defaulted, and why)
    RUN/metrics.jsonl     one JSON object per logged step: {"step", "epoch", "loss", "grad_norm", "lr", ...}
                          and per evaluation {"step", "eval_loss", ...}
    RUN/tensorboard/      the same scalars for TensorBoard (tensorboardX)
    RUN/loss.png          the loss curve (train, and eval when there is a held-out list)
    RUN/checkpoints/      orbax train states step_XXXXXXXX (``cosyjax.train.checkpoint``), with the data
                          position (epoch, steps into it) and the eval loss in their metadata
    RUN/export/           at the end: upstream's llm.pt / flow.pt / hift.pt (+ the release's other files),
                          LoRA merged, optionally averaged over checkpoints (upstream's average_model.py)

Steps (one optimizer step = ``accum_grad`` batches from every data rank, as upstream's accumulation):

- data: ``cosyjax.train.data.Pipeline`` per data rank (``world = data_ranks``, default the process
  count; each process reads its ranks' shards); per step the ranks agree on one bucket shape, each
  pads its batches to it, and the global batch is assembled on a mesh over every process's devices
  (``jax.make_array_from_process_local_data``).  An epoch ends when any rank runs out (upstream's
  join), so every process runs the same number of steps;
- step: ``parallel.make_sharded_train_step`` (the step ``step.make_train_step`` jits) with upstream's
  optimizer from ``train_conf`` (``step.optimizer_from_train_conf``); bf16 compute over float32
  master weights by default on accelerators, float32 on CPU (``--compute-dtype``); micro-batches and
  ranks weighted by their target count (``num_tokens`` / ``num_frames``; DPO: ``num_rows``), which
  equals one step on the whole global batch;
- LoRA: the trained params are the adapters only, the base model a frozen argument (``lora``);
  DPO: the reference model is a frozen argument (``dpo``);
- resume: a run directory with checkpoints continues from the newest one: the state is restored and
  the data of the interrupted epoch regenerated and skipped, so the losses continue bit-identically.

Multi-host: ``init_distributed`` calls ``jax.distributed.initialize`` from the options or, when none
are given, from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` or torchrun's
``MASTER_ADDR`` / ``MASTER_PORT`` / ``WORLD_SIZE`` / ``RANK``.  Process 0 writes every file; resuming reads the run
directory on every process, so it must be on storage they all see (as upstream's ``model_dir``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.config import ModelConfig, read_yaml
from cosyjax.train import checkpoint as ckpt
from cosyjax.train.data import BatchShape, DataConfig, Pipeline, bucket_size, read_data_list
from cosyjax.train.parallel import data_sharding, make_mesh, make_sharded_train_step, replicated_sharding
from cosyjax.train.step import UPSTREAM_TRAIN_CONF, TrainState, optimizer_from_train_conf

log = logging.getLogger("cosyjax.train")

# train_conf keys of examples/libritts/cosyvoice3/conf/cosyvoice3.yaml beyond the optimizer's.
UPSTREAM_RUN_CONF = {"max_epoch": 200, "log_interval": 100, "save_per_step": -1}
WEIGHT_KEYS = {"llm": "num_tokens", "flow": "num_frames", "dpo": "num_rows"}
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


class TrainError(ValueError):
    """A training run that cannot start or continue: the message names the option, file or field."""


# --------------------------------------------------------------------------------------------
# Options and configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What ``cosyjax train`` was asked (see ``cosyjax train --help``)."""

    config: str
    data: str
    model: str
    out: str
    init: str | None = None
    cv_data: str | None = None
    tokenizer: str | None = None
    max_steps: int | None = None
    max_epochs: int | None = None
    seed: int = 0
    compute_dtype: str = "auto"
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None
    dpo: bool = False
    ref: str | None = None
    dpo_mask: str = "target"
    dpo_beta: float = 0.01
    save_every: int | None = None
    keep: int | None = 5
    log_every: int | None = None
    eval_every: int | None = None
    average: int = 0
    average_by: str = "eval_loss"
    export: bool = True
    data_ranks: int | None = None
    max_frames_in_batch: int | None = None
    min_length_bucket: int | None = None
    min_rows_bucket: int | None = None

    def check(self) -> None:
        if self.model not in ("llm", "flow"):
            raise TrainError(f"--model {self.model!r}: expected llm or flow")
        if self.dpo and self.model != "llm":
            raise TrainError("--dpo trains the LLM: use --model llm")
        if self.dpo and not self.ref:
            raise TrainError("--dpo needs --ref (the frozen reference model: a release or converted dir, or an llm.pt)")
        if self.ref and not self.dpo:
            raise TrainError("--ref is the DPO reference model; pass --dpo too")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise TrainError(f"--compute-dtype {self.compute_dtype!r}: expected one of {COMPUTE_DTYPES}")
        for name in ("max_steps", "max_epochs", "save_every", "log_every", "eval_every", "data_ranks", "lora_rank",
                     "max_frames_in_batch", "min_length_bucket", "min_rows_bucket"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainError(f"--{name.replace('_', '-')} {value}: expected >= 1")
        if self.average < 0:
            raise TrainError(f"--average {self.average}: expected >= 0")
        if self.average_by not in ("eval_loss", "latest"):
            raise TrainError(f"--average-by {self.average_by!r}: expected eval_loss or latest")
        for name in ("config", "data", "cv_data"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise TrainError(f"--{name.replace('_', '-')} {path}: file not found")


def train_conf_from_yaml(path: str) -> tuple[dict[str, Any], list[str]]:
    """The yaml's ``train_conf`` with upstream's cosyvoice3.yaml values for what it lacks; (conf, defaulted keys)."""
    tree = read_yaml(path)
    given = tree.get("train_conf") or {}
    if not isinstance(given, Mapping):
        raise TrainError(f"{path}: train_conf is not a mapping")
    upstream = {"optim": UPSTREAM_TRAIN_CONF["optim"], "optim_conf": {"lr": UPSTREAM_TRAIN_CONF["lr"]},
                "scheduler": UPSTREAM_TRAIN_CONF["scheduler"],
                "scheduler_conf": {"warmup_steps": UPSTREAM_TRAIN_CONF["warmup_steps"]},
                "grad_clip": UPSTREAM_TRAIN_CONF["grad_clip"], "accum_grad": UPSTREAM_TRAIN_CONF["accum_grad"],
                **UPSTREAM_RUN_CONF}
    conf, defaulted = {}, []
    for key, value in upstream.items():
        if key in given:
            conf[key] = dict(given[key]) if isinstance(value, dict) else given[key]
        else:
            conf[key] = value
            defaulted.append(key)
    for key in ("optim_conf", "scheduler_conf"):  # a yaml optim_conf without lr takes upstream's lr
        for sub, value in upstream[key].items():
            if sub not in conf[key]:
                conf[key][sub] = value
                defaulted.append(f"{key}.{sub}")
    unknown = sorted(set(given) - set(upstream))
    if unknown:
        log.info("train_conf keys not used by cosyjax train: %s", ", ".join(unknown))
    return conf, defaulted


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------
def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> tuple[int, int]:
    """Start JAX's multi-process runtime when asked (options, else the environment); (process index, count).

    Nothing is started for one process.  On CPU, cross-process collectives use gloo.
    """
    env = os.environ
    if coordinator is None and "JAX_COORDINATOR_ADDRESS" in env:
        coordinator = env["JAX_COORDINATOR_ADDRESS"]
        num_processes = num_processes or int(env.get("JAX_NUM_PROCESSES", "0")) or None
        process_id = process_id if process_id is not None else (
            int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None)
    elif coordinator is None and "MASTER_ADDR" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        coordinator = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}"
        num_processes, process_id = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
    if coordinator is None:
        if num_processes not in (None, 1):
            raise TrainError(f"--num-processes {num_processes} needs --coordinator (host:port of process 0)")
        return 0, 1
    if not _distributed_started():  # (asking jax.process_count() first would start the backend too early)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    return jax.process_index(), jax.process_count()


def _distributed_started() -> bool:
    from jax._src import distributed  # the public API has no query for it

    return distributed.global_state.client is not None


def _allgather_max(values: np.ndarray) -> np.ndarray:
    """Element-wise max of a small int vector over processes (host-side agreement)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.max(np.asarray(multihost_utils.process_allgather(values)), axis=0)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def global_put(tree: Any, sharding: jax.sharding.NamedSharding) -> Any:
    """Host arrays (the same on every process) -> global arrays with ``sharding`` (replicated)."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """Replicated global arrays -> numpy (this process's copy)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(get, tree)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def _is_release(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "cosyvoice3.yaml"))


def load_model(path: str, *, llm_file: str = "llm.pt") -> Any:
    """A ConvertedModel from a release directory (converted in memory: needs torch) or a converted one."""
    from cosyjax.checkpoint import load_converted

    if not os.path.isdir(path):
        raise TrainError(f"{path}: model directory not found")
    if _is_release(path):
        try:
            from cosyjax.convert import convert_model
        except ImportError as e:
            raise TrainError(f"{path} is a release (.pt files); reading it needs torch: pip install "
                             "'cosyjax[convert]', or pass a `cosyjax convert` output") from e
        return convert_model(path, llm_file=llm_file, progress=False)
    return load_converted(path)


def load_reference(path: str) -> Any:
    """DPO's reference LLM params: a release or converted dir, or an ``llm*.pt`` inside a release dir."""
    if os.path.isfile(path):
        if not path.endswith(".pt"):
            raise TrainError(f"--ref {path}: expected a directory or an .pt file of a release directory")
        return load_model(os.path.dirname(os.path.abspath(path)), llm_file=os.path.basename(path)).params["llm"]
    return load_model(path).params["llm"]


def random_model(config_path: str, seed: int) -> Any:
    """Random weights for the release the yaml belongs to (training from scratch)."""
    from cosyjax.checkpoint import ConvertedModel
    from cosyjax.config import load_model_config
    from cosyjax.flow.flow import param_shapes as flow_shapes
    from cosyjax.hift.generator import param_shapes as hift_shapes
    from cosyjax.llm.qwen2 import param_shapes as llm_shapes
    from cosyjax.train.step import random_params

    directory = os.path.dirname(os.path.abspath(config_path))
    if os.path.basename(config_path) != "cosyvoice3.yaml":
        raise TrainError(f"--config {config_path}: without --init the model is built from a release's "
                         "cosyvoice3.yaml (next to CosyVoice-BlankEN/); pass --init RELEASE_OR_CONVERTED")
    cfg = load_model_config(directory)
    params = {"llm": random_params(llm_shapes(cfg.llm), seed), "flow": random_params(flow_shapes(cfg.flow), seed),
              "hift": random_params(hift_shapes(cfg.hift), seed)}
    return ConvertedModel(config=cfg, params=params, buffers={}, source={"random": seed})


def find_tokenizer(options: RunOptions) -> str:
    candidates = [options.tokenizer] if options.tokenizer else []
    for base in (options.init, os.path.dirname(os.path.abspath(options.config))):
        if base and os.path.isdir(base):
            candidates.append(os.path.join(base, "CosyVoice-BlankEN"))
    for c in candidates:
        if c and os.path.isdir(c):
            return c
    raise TrainError("no text tokenizer: pass --tokenizer DIR (a release's CosyVoice-BlankEN/), or --init a release "
                     "directory, or a --config inside one")


def loss_function(options: RunOptions, cfg: ModelConfig, *, evaluation: bool = False) -> tuple[Callable, str, bool]:
    """(loss_fn(params, batch, rng[, frozen]), weight key, takes frozen) for the run's model.

    ``evaluation``: the flow without dropout and with its draws from a fixed key (``options.seed``),
    so an eval loss is a deterministic function of the params.
    """
    from cosyjax.train.losses import flow_loss, llm_loss

    if options.dpo:
        from cosyjax.train.dpo import dpo_loss

        def inner(p, b, r, frozen):
            return dpo_loss(p, frozen["ref"], b, cfg=cfg.llm, beta=options.dpo_beta, mask=options.dpo_mask,
                            lsm_weight=cfg.llm.lsm_weight, length_normalized=cfg.llm.length_normalized_loss)
        weight, frozen = WEIGHT_KEYS["dpo"], True
    elif options.model == "llm":
        def inner(p, b, r):
            return llm_loss(p, b, cfg=cfg.llm, lsm_weight=cfg.llm.lsm_weight,
                            length_normalized=cfg.llm.length_normalized_loss)
        weight, frozen = WEIGHT_KEYS["llm"], False
    else:
        def inner(p, b, r):
            key = jax.random.key(options.seed) if evaluation else r
            return flow_loss(p, b, key, cfg=cfg.flow, deterministic=evaluation)
        weight, frozen = WEIGHT_KEYS["flow"], False
    if options.lora_rank:
        from cosyjax.train.lora import lora_loss

        return lora_loss(inner, lora_config(options)), weight, True
    return inner, weight, frozen


def eval_function(options: RunOptions, cfg: ModelConfig) -> Callable:
    """(params, batch, frozen) -> (loss, aux) on a global batch (see ``loss_function(evaluation=True)``)."""
    fn, _, takes_frozen = loss_function(options, cfg, evaluation=True)
    return lambda p, b, frozen: fn(p, b, None, frozen) if takes_frozen else fn(p, b, None)


def lora_config(options: RunOptions) -> Any:
    from cosyjax.train.lora import LoraConfig

    return LoraConfig.for_model(options.model, options.lora_rank, options.lora_alpha, options.lora_targets)


# --------------------------------------------------------------------------------------------
# Batches for one step: every data rank of this process, padded to a shape agreed by all
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StepBatches:
    """This process's data ranks for one epoch, drawn ``accum`` batches per rank per step."""

    pipelines: Sequence[Pipeline]
    model_cfg: Any
    accum: int
    epoch: int

    def __post_init__(self):
        self._iters = [p.batches(self.epoch, self.model_cfg) for p in self.pipelines]

    def next(self) -> dict[str, np.ndarray] | None:
        """The local part of the next global batch, or None when the epoch ended on some rank."""
        drawn = []
        for it in self._iters:
            items = []
            for _ in range(self.accum):
                got = next(it, None)
                if got is None:
                    break
                items.append(got)
            drawn.append(items)
        complete = all(len(items) == self.accum for items in drawn)
        shape = BatchShape(0, 0)
        for items in drawn:
            for s, _ in items:
                shape = shape.union(s)
        agreed = _allgather_max(np.asarray([0 if complete else 1, shape.rows, shape.length], np.int64))
        if agreed[0]:
            return None
        shape = BatchShape(int(agreed[1]), int(agreed[2]))
        parts = []
        for pipeline, items in zip(self.pipelines, drawn):
            padded = [pipeline.pad(item, shape, self.model_cfg) for _, item in items]
            parts.append(interleave(padded))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def skip(self, steps: int) -> None:
        """Advance by ``steps`` optimizer steps without padding (resume)."""
        for _ in range(steps):
            for it in self._iters:
                for _ in range(self.accum):
                    next(it, None)


def interleave(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A batches of R rows -> one of A*R rows where row r*A + i is row r of batch i.

    ``step.split_micro_batches`` takes rows i, i+A, ... as micro-batch i, so micro-batch i is batch i.
    A DPO batch's halves (chosen, rejected) are interleaved half by half, so each micro-batch keeps them.
    """
    first = batches[0]
    out = {}
    for key in first:
        stacked = np.stack([b[key] for b in batches], axis=1)  # [R, A, ...]
        out[key] = stacked.reshape((-1,) + stacked.shape[2:])
    return out


# --------------------------------------------------------------------------------------------
# Metrics, plots, averaging, export
# --------------------------------------------------------------------------------------------
class MetricsWriter:
    """metrics.jsonl + TensorBoard on process 0 (a no-op elsewhere)."""

    def __init__(self, run_dir: str, active: bool):
        self.active = active
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if active:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                raise TrainError("TensorBoard logging needs tensorboardX: pip install 'cosyjax[train]'") from e
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, record: Mapping[str, Any], tag: str) -> None:
        if not self.active:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "epoch", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(f"{tag}/{key}", value, record["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(run_dir: str) -> str:
    """RUN/loss.png from metrics.jsonl (train loss per logged step, eval loss per evaluation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), lw=1, label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", lw=1, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(run_dir, "loss.png")
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def average_checkpoints(paths: Sequence[str], like: TrainState, effective: Callable[[Any], Any]) -> Any:
    """Mean of ``effective(state.params)`` over the checkpoints (upstream's average_model.py), float32.

    ``effective`` maps a state's params to the model params (LoRA: merged), so LoRA runs average the
    merged weights rather than the adapter factors.
    """
    if not paths:
        raise TrainError("no checkpoint to average")
    total = None
    for path in paths:
        state = ckpt.restore_train_state(path, like)
        params = to_host(effective(state.params))
        total = params if total is None else jax.tree.map(np.add, total, params)
    return jax.tree.map(lambda x: (x / len(paths)).astype(np.float32), total)


def pick_checkpoints(run_dir: str, num: int, by: str) -> list[str]:
    """The ``num`` checkpoints with the lowest eval loss (``--val_best``) or the newest ``num``."""
    steps = ckpt.checkpoint_steps(run_dir)
    if by == "eval_loss":
        scored = []
        for s in steps:
            meta = ckpt.read_metadata(ckpt.step_dir(run_dir, s))["metadata"]
            if meta.get("eval_loss") is not None:
                scored.append((meta["eval_loss"], s))
        if len(scored) < num:
            raise TrainError(f"--average {num} --average-by eval_loss: only {len(scored)} checkpoints have an eval "
                             "loss (pass --cv-data, or --average-by latest)")
        chosen = sorted(s for _, s in sorted(scored)[:num])
    else:
        if len(steps) < num:
            raise TrainError(f"--average {num}: only {len(steps)} checkpoints are kept (raise --keep)")
        chosen = steps[-num:]
    return [ckpt.step_dir(run_dir, s) for s in chosen]


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def prepare_params(options: RunOptions) -> tuple[Any, Any, dict[str, Any]]:
    """(model, trained params, frozen params): the stage's float32 params or LoRA adapters, and the frozen
    LoRA base (``"base"``) and DPO reference (``"ref"``)."""
    model = load_model(options.init) if options.init else random_model(options.config, options.seed)
    if model.config.mel is None:
        raise TrainError("the release yaml has no feat_extractor (the mel the flow is trained on)")
    base = jax.tree.map(lambda x: np.asarray(x, np.float32), model.params[options.model])
    frozen: dict[str, Any] = {}
    trainable = base
    if options.lora_rank:
        from cosyjax.train.lora import init_lora

        trainable = init_lora(base, lora_config(options), options.seed)
        frozen["base"] = base
    if options.dpo:
        frozen["ref"] = jax.tree.map(lambda x: np.asarray(x, np.float32), load_reference(options.ref))
    return model, trainable, frozen


def _compute_dtype(name: str) -> Any:
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return None if name == "float32" else jnp.bfloat16, name


def run(options: RunOptions, *, coordinator: str | None = None, num_processes: int | None = None,
        process_id: int | None = None) -> dict[str, Any]:
    """Train (or resume) as ``options`` says; returns a summary (final step and loss, paths, seconds)."""
    options.check()
    process, processes = init_distributed(coordinator, num_processes, process_id)
    lead = process == 0
    start_time = time.time()
    run_dir = os.path.abspath(options.out)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if lead:
        os.makedirs(run_dir, exist_ok=True)
    if options.export and importlib.util.find_spec("torch") is None:  # the export (cosyjax.convert) writes .pt files
        raise TrainError("exporting upstream .pt files needs torch: pip install 'cosyjax[convert]', or pass "
                         "--no-export")

    train_conf, conf_defaulted = train_conf_from_yaml(options.config)
    buckets = ("max_frames_in_batch", "min_length_bucket", "min_rows_bucket")
    overrides = {k: getattr(options, k) for k in buckets if getattr(options, k) is not None}
    data_conf = DataConfig.from_yaml(options.config, **overrides)
    if conf_defaulted:
        log.info("train_conf: %s not in %s: upstream's cosyvoice3.yaml values used (%s)", ", ".join(conf_defaulted),
                 options.config, json.dumps({k: train_conf[k.split('.')[0]] for k in conf_defaulted}))
    if data_conf.defaulted:
        log.info("data pipeline: %s not in %s: upstream's cosyvoice3.yaml values used", ", ".join(data_conf.defaulted),
                 options.config)
    optimizer, accum = optimizer_from_train_conf(train_conf)
    compute_dtype, compute_name = _compute_dtype(options.compute_dtype)

    model, trainable, frozen = prepare_params(options)
    cfg = model.config
    model_cfg = cfg.llm if options.model == "llm" else cfg.flow

    from cosyjax.frontend.tokenizer import CosyVoice3Tokenizer

    tokenizer = CosyVoice3Tokenizer(find_tokenizer(options))
    shards = read_data_list(options.data)
    ranks = options.data_ranks or processes
    if ranks % processes:
        raise TrainError(f"--data-ranks {ranks} must be a multiple of the {processes} processes")
    per_process = ranks // processes

    def pipelines(data_list: Sequence[str], train: bool) -> list[Pipeline]:
        return [Pipeline(data_list, options.model, data_conf, tokenizer, cfg.mel, cfg.flow.token_mel_ratio,
                         seed=options.seed, rank=r, world=ranks, train=train, dpo=options.dpo)
                for r in range(process * per_process, (process + 1) * per_process)]

    # every device must get whole rows: the local rows (ranks x accum x bucket rows) a multiple of them
    floor = bucket_size(-(-len(jax.local_devices()) // (per_process * accum)))
    data_conf = dataclasses.replace(data_conf, min_rows_bucket=max(data_conf.min_rows_bucket, floor))
    train_pipes = pipelines(shards, True)
    cv_pipes = pipelines(read_data_list(options.cv_data), False) if options.cv_data else []

    loss_fn, weight_key, with_frozen = loss_function(options, cfg)
    mesh = make_mesh(jax.devices())
    rep = replicated_sharding(mesh)
    step_fn = make_sharded_train_step(loss_fn, optimizer, mesh, compute_dtype=compute_dtype, accum_steps=accum,
                                      weight_key=weight_key, with_frozen=with_frozen)
    frozen_dev = global_put(frozen, rep) if with_frozen else None
    host_state = TrainState.create(trainable, optimizer, options.seed)
    host_state = jax.tree.map(np.asarray, host_state)
    epoch, skip = 0, 0
    latest = ckpt.latest_checkpoint(ckpt_dir)
    if latest is not None:
        meta = ckpt.read_metadata(latest)["metadata"]
        if meta.get("run") != _identity(options):
            raise TrainError(f"{latest}: made by another run ({meta.get('run')}); use another --out")
        host_state = jax.tree.map(np.asarray, ckpt.restore_train_state(latest, host_state))
        epoch, skip = int(meta["epoch"]), int(meta["steps_into_epoch"])
        log.info("resuming from %s (step %d, epoch %d, %d steps into it)", latest, int(host_state.step), epoch, skip)
    state = global_put(host_state, rep)
    max_epoch = options.max_epochs or int(train_conf["max_epoch"])
    log_every = options.log_every or int(train_conf["log_interval"])
    save_every = options.save_every or (int(train_conf["save_per_step"]) if int(train_conf["save_per_step"]) > 0 else 0)
    metrics = MetricsWriter(run_dir, lead)
    if lead:
        _write_run_json(run_dir, options, train_conf, conf_defaulted, data_conf, compute_name, accum, processes, ranks)

    local_devices = len(jax.local_devices())
    batch_sharding = data_sharding(mesh)

    def put_batch(local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        if local_devices != len(jax.devices()) or processes > 1:
            return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}
        return jax.device_put(dict(local), batch_sharding)

    eval_fn = jax.jit(eval_function(options, cfg), in_shardings=(rep, batch_sharding, rep))

    def evaluate(current) -> float | None:
        if not cv_pipes:
            return None
        batches = StepBatches(cv_pipes, model_cfg, 1, 0)
        total = weight = 0.0
        while (local := batches.next()) is not None:
            loss, aux = eval_fn(current.params, put_batch(local), frozen_dev)
            w = float(to_host(aux[weight_key]))
            total += float(to_host(loss)) * w
            weight += w
        return total / weight if weight else None

    # Every process takes the same decisions (evaluate, save) from these, never from files only process 0 writes.
    evaluated: dict[int, float | None] = {}
    saved = set(ckpt.checkpoint_steps(ckpt_dir)) if latest is not None else set()

    def evaluate_at(current, step: int, epoch_now: int) -> float | None:
        if step not in evaluated:
            evaluated[step] = evaluate(current)
            if evaluated[step] is not None:
                metrics.write({"step": step, "epoch": epoch_now, "eval_loss": evaluated[step]}, "cv")
        return evaluated[step]

    def save(current, step: int, epoch_now: int, steps_into: int) -> None:
        eval_loss = evaluate_at(current, step, epoch_now)  # each checkpoint knows its eval loss (--average-by)
        host = to_host(current)
        if lead:
            ckpt.save_checkpoint(ckpt_dir, host, keep=options.keep,
                                 metadata={"run": _identity(options), "epoch": epoch_now,
                                           "steps_into_epoch": steps_into, "eval_loss": eval_loss})
        saved.add(step)
        _barrier("checkpoint")

    step_now = int(host_state.step)
    steps_into = skip
    last: dict[str, Any] = {}
    done = options.max_steps is not None and step_now >= options.max_steps
    while not done and epoch < max_epoch:
        batches = StepBatches(train_pipes, model_cfg, accum, epoch)
        batches.skip(skip)
        steps_into = skip
        skip = 0
        while True:
            local = batches.next()
            if local is None:
                break
            args = (state, put_batch(local)) + ((frozen_dev,) if with_frozen else ())
            state, out = step_fn(*args)
            step_now += 1
            steps_into += 1
            if step_now % log_every == 0 or step_now == 1 or step_now == options.max_steps:
                host = {k: float(np.asarray(to_host(v))) for k, v in out.items()}
                last = {"step": step_now, "epoch": epoch, **host, "time": round(time.time() - start_time, 3)}
                metrics.write(last, "train")
                log.info("step %d epoch %d loss %.5f grad_norm %.4g lr %.3g", step_now, epoch, host["loss"],
                         host["grad_norm"], host["lr"])
            if options.eval_every is not None and step_now % options.eval_every == 0:
                evaluate_at(state, step_now, epoch)
            if save_every and step_now % save_every == 0:
                save(state, step_now, epoch, steps_into)
            if options.max_steps is not None and step_now >= options.max_steps:
                done = True
                break
        if not done:
            epoch += 1
            if not save_every:  # upstream's save_per_step -1: a checkpoint per epoch
                save(state, step_now, epoch, 0)
    final_eval = evaluate_at(state, step_now, epoch)
    if step_now not in saved:
        save(state, step_now, epoch, steps_into if done else 0)
    metrics.close()
    summary: dict[str, Any] = {"step": step_now, "loss": last.get("loss"), "eval_loss": final_eval,
                               "run_dir": run_dir, "seconds": round(time.time() - start_time, 2)}
    if lead:
        summary["plot"] = plot_losses(run_dir)
        if options.export:
            summary["export"] = export_run(options, model, host_state, ckpt_dir, run_dir)
    _barrier("done")
    return summary


def _identity(options: RunOptions) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed by this run."""
    return {"model": options.model, "lora_rank": options.lora_rank, "lora_alpha": options.lora_alpha,
            "lora_targets": list(options.lora_targets) if options.lora_targets else None, "dpo": options.dpo,
            "seed": options.seed}


def _write_run_json(run_dir: str, options: RunOptions, train_conf: Mapping[str, Any], conf_defaulted: Sequence[str],
                    data_conf: DataConfig, compute_name: str, accum: int, processes: int, ranks: int) -> None:
    record = {"options": dataclasses.asdict(options), "train_conf": dict(train_conf),
              "train_conf_defaulted_from_upstream": list(conf_defaulted),
              "data_conf": {k: v for k, v in dataclasses.asdict(data_conf).items() if k != "defaulted"},
              "data_conf_defaulted_from_upstream": list(data_conf.defaulted), "compute_dtype": compute_name,
              "accum_grad": accum, "processes": processes, "data_ranks": ranks,
              "devices": [str(d) for d in jax.devices()]}
    with open(os.path.join(run_dir, "run.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(os.path.join(run_dir, "run.json.tmp"), os.path.join(run_dir, "run.json"))


def export_run(options: RunOptions, model: Any, like: TrainState, ckpt_dir: str, run_dir: str) -> str:
    """RUN/export: the final (or averaged) params as upstream .pt files, LoRA merged."""
    from cosyjax.convert.export import export_to_dir

    if options.lora_rank:
        from cosyjax.train.lora import merge_lora

        base = model.params[options.model]

        def effective(params):
            return merge_lora(base, params, lora_config(options))
    else:
        def effective(params):
            return params
    paths = (pick_checkpoints(ckpt_dir, options.average, options.average_by) if options.average
             else [ckpt.latest_checkpoint(ckpt_dir)])
    params = average_checkpoints(paths, jax.tree.map(np.asarray, like), effective)
    tuned = dataclasses.replace(model, params={**model.params, options.model: params})
    # the release's yaml, tokenizer and ONNX files go beside the .pt files, so the export loads as a release;
    # a release beside --config only when it describes this model
    from cosyjax.config import load_model_config

    candidates = [options.init, os.path.dirname(os.path.abspath(options.config))]
    template = next((c for c in candidates if c and _is_release(c) and load_model_config(c) == model.config), None)
    out = export_to_dir(tuned, os.path.join(run_dir, "export"), template_dir=template, overwrite=True)
    with open(os.path.join(out, "EXPORT.json"), "w", encoding="utf-8") as f:
        json.dump({"checkpoints": [os.path.basename(p) for p in paths], "lora_merged": bool(options.lora_rank),
                   "stage": options.model}, f, indent=1)
    return out


def iter_losses(run_dir: str) -> Iterator[tuple[int, float]]:
    """(step, train loss) pairs of a run's metrics.jsonl."""
    for record in read_metrics(run_dir):
        if "loss" in record:
            yield record["step"], record["loss"]


__all__ = ["RunOptions", "TrainError", "average_checkpoints", "init_distributed", "iter_losses", "load_model",
           "plot_losses", "read_metrics", "run", "train_conf_from_yaml"]
