"""The train step: optimizer semantics against torch, bf16 compute, accumulation, skipping, lr report.

Also holds the tiny models and batches the other train tests import (``tiny_llm``, ``llm_batch``,
``tiny_flow``, ``flow_batch``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cosyjax.config import FlowConfig, LLMConfig
from cosyjax.train.losses import flow_loss, llm_loss, prepare_llm_batch, sample_flow_draws
from cosyjax.train.step import (
    UPSTREAM_TRAIN_CONF, TrainState, make_grad_fn, make_optimizer, make_train_step, optimizer_from_train_conf,
    random_params, split_micro_batches, warmup_lr)

MEL = 16


# ---------------------------------------------------------------- tiny models shared by the train tests
def tiny_llm_config() -> LLMConfig:
    return dataclasses.replace(LLMConfig.tiny(), hidden_size=32, llm_input_size=32, llm_output_size=32,
                               num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
                               vocab_size=64, speech_token_size=16)


def tiny_flow_config() -> FlowConfig:
    return dataclasses.replace(FlowConfig.tiny(), input_size=MEL, output_size=MEL, mel_dim=MEL, mu_dim=MEL,
                               spk_dim=MEL, spk_emb_dim=MEL, out_channels=MEL, spk_embed_dim=8, vocab_size=32,
                               dim=32, depth=1, heads=2, dim_head=16, pre_lookahead_channels=16,
                               static_chunk_size=4)


def tiny_llm(seed: int = 0):
    from cosyjax.llm.qwen2 import param_shapes

    cfg = tiny_llm_config()
    return cfg, random_params(param_shapes(cfg), seed)


def tiny_flow(seed: int = 0):
    from cosyjax.flow.flow import param_shapes

    cfg = tiny_flow_config()
    return cfg, random_params(param_shapes(cfg), seed)


def llm_batch(cfg: LLMConfig, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random unistream rows of different lengths, padded to 20 (one shape for every seed: one compile)."""
    rng = np.random.default_rng(seed)
    text = [rng.integers(0, cfg.vocab_size, n).tolist() for n in rng.integers(2, 7, size)]
    speech = [rng.integers(0, cfg.speech_token_size, n).tolist() for n in rng.integers(3, 12, size)]
    return prepare_llm_batch(cfg, text, speech, pad_to=20)  # rows: sos + text + task_id + speech <= 19


def flow_batch(cfg: FlowConfig, size: int, seed: int = 0, tokens: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    token_len = rng.integers(2, tokens + 1, size).astype(np.int32)
    frames = cfg.token_mel_ratio * tokens
    return {"speech_token": rng.integers(0, cfg.vocab_size, (size, tokens)).astype(np.int32),
            "speech_token_len": token_len,
            "speech_feat": rng.standard_normal((size, frames, cfg.output_size)).astype(np.float32),
            "speech_feat_len": (cfg.token_mel_ratio * token_len).astype(np.int32),
            "embedding": rng.standard_normal((size, cfg.spk_embed_dim)).astype(np.float32)}


def llm_loss_fn(cfg):
    return lambda params, batch, rng: llm_loss(params, batch, cfg=cfg)


def flow_loss_fn(cfg, streaming: bool | None = None):
    """flow_loss with its own draws; ``streaming`` fixes the per-batch attention draw (one DiT branch
    to compile instead of two), the per-example draws stay flow_loss's."""
    if streaming is None:
        return lambda params, batch, rng: flow_loss(params, batch, rng, cfg=cfg)

    def loss(params, batch, rng):
        draws = dataclasses.replace(sample_flow_draws(rng, batch, cfg=cfg), streaming=streaming)
        return flow_loss(params, batch, rng, cfg=cfg, draws=draws)

    return loss


def max_rel_diff(a, b) -> float:
    """max over leaves of max|a - b| / max|a| (a pytree of arrays)."""
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                                            / max(float(np.max(np.abs(np.asarray(x, np.float64)))), 1e-30)), a, b)
    return max(jax.tree.leaves(diffs))


# ---------------------------------------------------------------- optimizer == torch
def _torch_run(optim: str, lr_at, grads_seq, params0, grad_clip, weight_decay=None):
    """torch: clip_grad_norm_ + skip non-finite + Adam/AdamW at the given per-step lr (upstream's loop)."""
    torch = pytest.importorskip("torch")
    ps = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params0]
    kwargs = {"lr": lr_at(0)} if weight_decay is None else {"lr": lr_at(0), "weight_decay": weight_decay}
    opt = (torch.optim.Adam if optim == "adam" else torch.optim.AdamW)(ps, **kwargs)
    norms = []
    for k, grads in enumerate(grads_seq):
        for group in opt.param_groups:
            group["lr"] = lr_at(k)
        for p, g in zip(ps, grads):
            p.grad = torch.from_numpy(g.copy())
        norm = torch.nn.utils.clip_grad_norm_(ps, grad_clip)
        norms.append(float(norm))
        if torch.isfinite(norm):
            opt.step()
        opt.zero_grad()
    return [p.detach().numpy() for p in ps], norms


@pytest.mark.parametrize("optim,scheduler", [("adam", "constantlr"), ("adamw", "warmuplr"), ("adam", "warmuplr")])
def test_optimizer_matches_torch(optim, scheduler):
    """Several steps with big (clipped), small and one infinite gradient: same params as torch's loop."""
    rng = np.random.default_rng(0)
    params0 = [rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal(7).astype(np.float32)]
    grads_seq = []
    for k in range(7):
        scale = 10.0 if k % 2 == 0 else 0.1
        grads = [scale * rng.standard_normal(p.shape).astype(np.float32) for p in params0]
        if k == 3:
            grads[1][2] = np.inf
        grads_seq.append(grads)
    lr, warmup = 0.05, 3
    schedule = warmup_lr(lr, warmup) if scheduler == "warmuplr" else optax.constant_schedule(lr)
    want, want_norms = _torch_run(optim, lambda k: float(schedule(k)), grads_seq, params0, grad_clip=5.0)

    tx = make_optimizer(optim=optim, lr=lr, scheduler=scheduler, warmup_steps=warmup, grad_clip=5.0)
    params = [jnp.asarray(p) for p in params0]
    state = tx.init(params)
    update = jax.jit(tx.update)
    lrs = []
    for grads in grads_seq:
        updates, state = update([jnp.asarray(g) for g in grads], state, params)
        params = optax.apply_updates(params, updates)
        lrs.append(float(state.hyperparams["learning_rate"]))
    for got, ref in zip(params, want):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-7)  # measured: 3e-8
    np.testing.assert_allclose(lrs, [float(schedule(k)) for k in range(7)], rtol=1e-7)
    assert not np.isfinite(want_norms[3])


def test_warmup_lr_is_upstreams_formula():
    """WarmupLR: linear to lr at n = w (update w-1), then lr * sqrt(w / n); first update already at n = 1."""
    schedule = warmup_lr(1.0, 4)
    got = [float(schedule(k)) for k in range(6)]
    np.testing.assert_allclose(got, [0.25, 0.5, 0.75, 1.0, (4 / 5) ** 0.5, (4 / 6) ** 0.5], rtol=1e-6)
    np.testing.assert_allclose(float(warmup_lr(2.0, 0)(3)), 2.0 / 2.0, rtol=1e-7)  # warmup 0: lr * n^-0.5


def test_optimizer_from_upstream_train_conf():
    conf = {"optim": "adam", "optim_conf": {"lr": 1e-5}, "scheduler": "constantlr",
            "scheduler_conf": {"warmup_steps": 2500}, "grad_clip": 5, "accum_grad": 2}
    tx, accum = optimizer_from_train_conf(conf)
    assert accum == UPSTREAM_TRAIN_CONF["accum_grad"] == 2
    state = tx.init({"w": jnp.ones(3)})
    _, state = tx.update({"w": jnp.ones(3)}, state)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="momentum"):
        optimizer_from_train_conf({"optim": "adam", "optim_conf": {"lr": 1.0, "momentum": 0.9}})
    with pytest.raises(ValueError, match="sgd"):
        make_optimizer(optim="sgd")
    with pytest.raises(ValueError, match="noam"):
        make_optimizer(scheduler="noam")


# ---------------------------------------------------------------- the step
@pytest.fixture(scope="module")
def llm_setup():
    cfg, params = tiny_llm()
    return cfg, params, llm_batch(cfg, 8)


@pytest.fixture(scope="module")
def big_batch_grads(llm_setup):
    """(loss, grads, aux) of llm_loss on the whole batch, one device, no accumulation."""
    cfg, params, batch = llm_setup
    return jax.jit(make_grad_fn(llm_loss_fn(cfg)))(params, batch, jax.random.PRNGKey(0))


def test_step_trains_and_reports(llm_setup, big_batch_grads):
    cfg, params, batch = llm_setup
    tx = make_optimizer(lr=1e-2, scheduler="warmuplr", warmup_steps=3)
    state = TrainState.create(params, tx, 0)
    step = make_train_step(llm_loss_fn(cfg), tx)
    losses, lrs = [], []
    for k in range(6):
        state, metrics = step(state, batch)
        if k == 0:  # the first step's metrics are the plain loss and the pre-clip gradient norm
            np.testing.assert_allclose(float(metrics["loss"]), float(big_batch_grads[0]), rtol=1e-6)
            np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(big_batch_grads[1])),
                                       rtol=1e-6)
        losses.append(float(metrics["loss"]))
        lrs.append(float(metrics["lr"]))
        assert not bool(metrics["skipped"]) and np.isfinite(float(metrics["grad_norm"]))
    assert int(state.step) == 6
    assert losses[-1] < 0.7 * losses[0], losses
    np.testing.assert_allclose(lrs, [float(warmup_lr(1e-2, 3)(k)) for k in range(6)], rtol=1e-6)
    assert int(metrics["num_tokens"]) == int((batch["targets"] != -1).sum())
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    assert float(jnp.abs(params["llm_decoder"]["kernel"]).sum()) > 0  # the caller's params survive donation


def quadratic_loss(params, batch, rng):
    """A cheap stand-in loss (compiles in well under a second): per-row squared error, normalized by
    the number of valid rows, which is returned as the integer count "rows" with a float "mean_x"."""
    del rng
    valid = batch["valid"].astype(jnp.float32)  # [B]
    pred = batch["x"] @ params["w"] + params["b"]  # [B]
    rows = jnp.sum(valid)
    loss = jnp.sum(valid * (pred - batch["y"]) ** 2) / jnp.maximum(rows, 1.0)
    return loss, {"rows": rows.astype(jnp.int32), "mean_x": jnp.mean(batch["x"])}


def quadratic_setup(size: int = 8):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal(3).astype(np.float32), "b": np.zeros((), np.float32)}
    batch = {"x": rng.standard_normal((size, 3)).astype(np.float32), "y": rng.standard_normal(size).astype(np.float32),
             "valid": np.arange(size) % 3 != 1}  # unequal valid rows per micro-batch
    return params, batch


def test_nonfinite_gradient_skips_update_but_advances_schedule():
    params, batch = quadratic_setup()
    tx = make_optimizer(lr=1e-2, scheduler="warmuplr", warmup_steps=4)
    state = TrainState.create(params, tx, 0)
    bad = jax.random.fold_in(state.rng, 1)[0]  # step 1's rng

    def loss_fn(p, b, r):
        loss, aux = quadratic_loss(p, b, r)
        return loss * jnp.where(r[0] == bad, jnp.inf, 1.0), aux  # infinite on step 1 only

    step = make_train_step(loss_fn, tx)
    state, m0 = step(state, batch)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state.inner_state))
    state, m1 = step(state, batch)
    assert bool(m1["skipped"]) and not bool(m0["skipped"])
    after = jax.tree.map(np.asarray, (state.params, state.opt_state.inner_state))
    jax.tree.map(np.testing.assert_array_equal, before, after)  # params and Adam moments/count untouched
    state, m2 = step(state, batch)
    assert not bool(m2["skipped"])
    assert float(m2["lr"]) == pytest.approx(float(warmup_lr(1e-2, 4)(2)))  # the schedule moved on
    assert int(state.step) == 3


def test_accumulation_arithmetic():
    """Strided micro-batches; weight_key=None is upstream's mean of micro-batch losses, weight_key the
    big-batch loss; float aux averaged with the same weights, integer aux summed."""
    params, batch = quadratic_setup(8)
    rng = jax.random.PRNGKey(0)
    micro = split_micro_batches({k: jnp.asarray(v) for k, v in batch.items()}, 2)
    np.testing.assert_array_equal(micro["x"][1], batch["x"][1::2])  # micro-batch i = rows i, i+A, ...
    parts = [quadratic_loss(params, jax.tree.map(lambda x: x[i], micro), rng) for i in range(2)]
    big_loss, big_aux = quadratic_loss(params, batch, rng)
    loss, grads, aux = jax.jit(make_grad_fn(quadratic_loss, accum_steps=2))(params, batch, rng)
    np.testing.assert_allclose(float(loss), np.mean([float(p[0]) for p in parts]), rtol=1e-6)
    assert abs(float(loss) - float(big_loss)) > 1e-3  # 3 + 2 valid rows: not the big-batch loss
    assert int(aux["rows"]) == int(big_aux["rows"]) == 5
    np.testing.assert_allclose(float(aux["mean_x"]), float(big_aux["mean_x"]), rtol=1e-6)
    loss, grads, aux = jax.jit(make_grad_fn(quadratic_loss, accum_steps=2, weight_key="rows"))(params, batch, rng)
    want_grads = jax.grad(lambda p: quadratic_loss(p, batch, rng)[0])(params)
    np.testing.assert_allclose(float(loss), float(big_loss), rtol=1e-6)
    assert max_rel_diff(want_grads, grads) < 1e-6
    w = [float(p[1]["rows"]) for p in parts]
    np.testing.assert_allclose(float(aux["mean_x"]), np.average([float(p[1]["mean_x"]) for p in parts], weights=w),
                               rtol=1e-6)


def test_accumulation_equals_one_big_batch(llm_setup, big_batch_grads):
    """weight_key="num_tokens": 4 micro-batches == one big-batch gradient (measured: loss 1e-7, grads 1.3e-6 rel)."""
    cfg, params, batch = llm_setup
    big = big_batch_grads
    acc = jax.jit(make_grad_fn(llm_loss_fn(cfg), accum_steps=4, weight_key="num_tokens"))(
        params, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(acc[0]), float(big[0]), rtol=1e-6)
    assert max_rel_diff(big[1], acc[1]) < 1e-5
    assert int(acc[2]["num_tokens"]) == int(big[2]["num_tokens"])
    np.testing.assert_allclose(float(acc[2]["acc"]), float(big[2]["acc"]), rtol=1e-6)


def test_bf16_compute_keeps_float32_masters(llm_setup, big_batch_grads):
    cfg, params, batch = llm_setup
    seen = {}

    def loss_fn(p, b, r):
        seen["dtype"] = p["llm_decoder"]["kernel"].dtype
        return llm_loss(p, b, cfg=cfg)

    tx = make_optimizer(lr=1e-2)
    state = TrainState.create(params, tx, 0)
    state, metrics = make_train_step(loss_fn, tx, compute_dtype=jnp.bfloat16)(state, batch)
    assert seen["dtype"] == jnp.bfloat16
    floats = [x for x in jax.tree.leaves((state.params, state.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    ref = float(big_batch_grads[0])
    assert abs(float(metrics["loss"]) - ref) < 0.02 * ref  # bf16 forward: same loss to ~1%
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(big_batch_grads[1])), rtol=0.1)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, params)
    assert max(jax.tree.leaves(moved)) > 0


def test_step_errors(llm_setup):
    cfg, params, batch = llm_setup
    tx = make_optimizer()
    with pytest.raises(ValueError, match="not divisible by accum_steps=3"):
        make_train_step(llm_loss_fn(cfg), tx, accum_steps=3)(TrainState.create(params, tx, 0), batch)
    with pytest.raises(ValueError, match="accum_steps"):
        make_train_step(llm_loss_fn(cfg), tx, accum_steps=0)
    with pytest.raises(ValueError, match="weight_key='frames' not in the loss's aux"):
        make_train_step(llm_loss_fn(cfg), tx, weight_key="frames")(TrainState.create(params, tx, 0), batch)
    with pytest.raises(ValueError, match="leading batch axis"):
        make_train_step(llm_loss_fn(cfg), tx)(TrainState.create(params, tx, 0),
                                              {**batch, "lengths": batch["lengths"][:3]})
    with pytest.raises(ValueError, match="rng must be"):
        TrainState.create(params, tx, jnp.zeros(3))


# ---------------------------------------------------------------- the example script
def test_example_finetune_tiny_runs_and_the_loss_falls(tmp_path):
    """examples/finetune_tiny.py with its defaults (300 steps): < 2 min on 2 CPU cores, loss falls, PNG saved."""
    import json
    import os
    import subprocess
    import sys
    import time

    pytest.importorskip("matplotlib")
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "finetune_tiny.py")
    start = time.time()
    proc = subprocess.run([sys.executable, script, "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    seconds = time.time() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["final_loss"] < 0.05 * result["first_loss"], result  # measured: 6.1 -> 0.011
    with open(result["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(result["checkpoint"], "meta.json")) as f:
        assert json.load(f)["step"] == 300
    assert seconds < 120, f"example took {seconds:.0f} s"
