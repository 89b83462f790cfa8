"""Data parallelism on 8 simulated CPU devices: loss and gradients equal the single-device ones.

pytest's process has already initialised JAX with one CPU device, so the checks run in a subprocess
(this file run as a script) with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.  The worker
computes, on one global batch of 16 rows (2 per device):

- the single-device reference ``jax.jit(make_grad_fn(loss))`` on device 0;
- ``jit`` with the batch sharded over a 1-D mesh (``make_sharded_grad_fn``);
- ``pmap`` (``make_pmap_grad_fn``), for the flow with 2 accumulation steps per device;
- for the LLM: one full train step sharded and pmapped, against the optimizer applied to the
  single-device gradients;

for the real ``llm_loss`` (normalized by target tokens; weight_key "num_tokens" under pmap) and
``flow_loss`` (per-example draws keyed on the global example index; weight_key "num_frames").  It
prints the measured differences as JSON and the test checks them against the tolerances below.
The train steps' parameters are checked element by element against Adam's first-step error model
(``adam_first_step_bound``), and two sabotaged steps (an update from a perturbed gradient, a
0.1 % learning-rate error) must fail that check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

DEVICES = 8
GLOBAL_BATCH = 16
# Tolerances (float32; measured values in the comments, from the worker's JSON on a 2-core CPU):
LOSS_RTOL = 5e-6   # measured: <= 8.1e-7 (summation order only)
GRAD_RTOL = 1e-5   # max |g - g_ref| / max |g_ref| per leaf; measured: <= 1.2e-6
LR = 1e-3
B1, EPS = 0.9, 1e-8  # make_optimizer's Adam defaults
F32_EPS = 2.0 ** -24
# Relative roundings (units of u = 2^-24) in one float32 Adam update, each side: nu = (1 - b2) g g
# (2), sqrt (1, and half of nu's 2), / sqrt(1 - b2) (1, and 1 for the constant), + eps (1),
# m / denom (1), / (1 - b1) (1, and 1 for the constant), * -lr (1), and reading g back from mu (1).
ADAM_UPDATE_ROUNDINGS = 12
MOMENT_RTOL = 2 * GRAD_RTOL       # Adam's mu = 0.1 g, nu = 0.001 g^2 after one step; measured: <= 1.4e-6


def adam_first_step_bound(p_ref, p_dp, mu_ref, mu_dp):
    """Per-element bound on |p_dp - p_ref| after one Adam step from the same params (numpy, float64).

    The first bias-corrected Adam update is lr * phi(g), phi(g) = g / (|g| + eps), with g the
    gradient after clipping; each step's g is read back from its first moment, mu = (1 - b1) g (one
    rounding: g to u relative, which moves phi by at most u |phi|, counted in ADAM_UPDATE_ROUNDINGS).
    The two steps' updates then differ by lr |phi(g_dp) - phi(g_ref)| -- for same-sign g
    that is lr eps |dg| / ((|g_dp| + eps)(|g_ref| + eps)), large where |g| ~ eps: Adam's amplification
    of a gradient difference dg -- plus each update's float32 rounding, ADAM_UPDATE_ROUNDINGS u
    |lr phi|, plus the rounding of p + update on each side, one ulp of the new parameter in all.
    """
    def phi(mu):
        g = np.asarray(mu, np.float64) / np.float64(np.float32(1 - B1))
        return g / (np.abs(g) + EPS)

    phi_ref, phi_dp = phi(mu_ref), phi(mu_dp)
    magnitude = np.maximum(np.abs(np.asarray(p_ref)), np.abs(np.asarray(p_dp))).astype(np.float32)
    return (LR * np.abs(phi_dp - phi_ref) + ADAM_UPDATE_ROUNDINGS * (F32_EPS + 1e-6 * F32_EPS) * LR
            * (np.abs(phi_dp) + np.abs(phi_ref)) + np.spacing(magnitude).astype(np.float64))


def param_violations(s_ref, s_dp) -> dict:
    """Elements where two one-step train states' params differ by more than adam_first_step_bound."""
    import jax
    import optax

    def first_moments(state):
        adam = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(x, optax.ScaleByAdamState)]
        assert len(adam) == 1, "expected one Adam state in the optimizer"
        return adam[0].mu

    worst, count, total = 0.0, 0, 0
    for p_ref, p_dp, mu_ref, mu_dp in zip(*(jax.tree.leaves(t) for t in (
            s_ref.params, s_dp.params, first_moments(s_ref), first_moments(s_dp)))):
        p_ref, p_dp = np.asarray(p_ref), np.asarray(p_dp)
        ratio = np.abs(p_dp.astype(np.float64) - p_ref) / adam_first_step_bound(p_ref, p_dp, np.asarray(mu_ref),
                                                                               np.asarray(mu_dp))
        worst, count, total = max(worst, float(ratio.max())), count + int(np.sum(ratio > 1)), total + ratio.size
    return {"worst_err_over_bound": worst, "violations": count, "elements": total}


def _worker(stage: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from cosyjax.train.parallel import (
        make_mesh, make_pmap_grad_fn, make_pmap_train_step, make_sharded_grad_fn, make_sharded_train_step,
        replicate, replicate_for_pmap, shard_batch, split_for_pmap, unreplicate)
    from cosyjax.train.step import TrainState, make_grad_fn, make_optimizer
    from test_train_step import (
        flow_batch, flow_loss_fn, llm_batch, llm_loss_fn, max_rel_diff, tiny_flow, tiny_llm)

    assert jax.device_count() == DEVICES, jax.devices()
    mesh = make_mesh()
    rng = jax.random.PRNGKey(7)
    out = {}

    def compare(name, ref, got):
        out[name] = {"loss_rel": abs(float(got[0]) - float(ref[0])) / abs(float(ref[0])),
                     "grad_rel": max_rel_diff(ref[1], got[1]),
                     "aux_equal": all(np.allclose(np.asarray(ref[2][k]), np.asarray(got[2][k]), rtol=1e-6)
                                      for k in ref[2])}

    make_model, make_batch, make_loss, weight_key = {
        "llm": (tiny_llm, llm_batch, llm_loss_fn, "num_tokens"),
        "flow": (tiny_flow, flow_batch, flow_loss_fn, "num_frames")}[stage]
    cfg, params = make_model()
    batch = make_batch(cfg, GLOBAL_BATCH, seed=1)
    loss = make_loss(cfg)
    ref = jax.jit(make_grad_fn(loss))(params, batch, rng)  # one device (uncommitted inputs: the default)
    sharded = make_sharded_grad_fn(loss, mesh)(replicate(params, mesh), shard_batch(batch, mesh),
                                               replicate(rng, mesh))
    compare("jit_sharded", ref, sharded)
    # flow: also 2 accumulation steps per device (micro-batches of 1 row) in the same program
    accum = 2 if stage == "flow" else 1
    pmapped = make_pmap_grad_fn(loss, weight_key=weight_key, accum_steps=accum)(
        replicate_for_pmap(params), split_for_pmap(batch, DEVICES), replicate_for_pmap(rng))
    compare("pmap", ref, unreplicate(pmapped))
    rows = np.asarray(pmapped[0])
    out["pmap_rows_equal"] = bool(np.all(rows == rows[0]))
    if stage == "llm":
        tx = make_optimizer(lr=LR)
        # one-device reference step from the reference gradients (no second compile of the loss)
        s0 = TrainState.create(params, tx, 3)
        updates, opt_state = tx.update(ref[1], s0.opt_state, s0.params)
        s1 = s0.replace(params=optax.apply_updates(s0.params, updates), opt_state=opt_state)
        m1 = {"loss": ref[0], "grad_norm": optax.global_norm(ref[1])}
        s2, m2 = make_sharded_train_step(loss, tx, mesh)(replicate(TrainState.create(params, tx, 3), mesh),
                                                          shard_batch(batch, mesh))
        s3, m3 = make_pmap_train_step(loss, tx, weight_key=weight_key)(
            replicate_for_pmap(TrainState.create(params, tx, 3)), split_for_pmap(batch, DEVICES))
        s3, m3 = unreplicate(s3), unreplicate(m3)
        for name, state_dp, metrics_dp in (("step_sharded", s2, m2), ("step_pmap", s3, m3)):
            out[name] = {
                "loss_rel": abs(float(metrics_dp["loss"]) - float(m1["loss"])) / float(m1["loss"]),
                "grad_norm_rel": abs(float(metrics_dp["grad_norm"]) - float(m1["grad_norm"])) / float(m1["grad_norm"]),
                "params": param_violations(s1, state_dp),
                "adam_moments_rel": max_rel_diff(
                    [x for x in jax.tree.leaves(s1.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)],
                    [x for x in jax.tree.leaves(state_dp.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]),
                "step": int(state_dp.step)}
        out["sharded_state_is_replicated"] = all(x.sharding.is_fully_replicated for x in jax.tree.leaves(s2.params))
        # The check can fail: a step whose update came from a gradient other than the one in its
        # moments (the smallest-|g| entry of each leaf moved by eps), and a step with lr 0.1 % off.
        perturbed = jax.tree.map(lambda g: g.ravel().at[jnp.argmin(jnp.abs(g))].add(EPS).reshape(g.shape), ref[1])
        bad_updates, _ = tx.update(perturbed, s0.opt_state, s0.params)
        out["sabotaged_gradient"] = param_violations(s1, s1.replace(params=optax.apply_updates(s0.params, bad_updates)))
        out["sabotaged_lr"] = param_violations(s1, s1.replace(params=optax.apply_updates(
            s0.params, jax.tree.map(lambda u: u * 1.001, updates))))
    return out


def _run_worker(stage: str) -> dict:
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip()}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), stage], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))  # the measured differences (pytest -s shows them)
    for name in ("jit_sharded", "pmap"):
        r = result[name]
        assert r["loss_rel"] <= LOSS_RTOL, (name, r)
        assert r["grad_rel"] <= GRAD_RTOL, (name, r)
        assert r["aux_equal"], (name, r)
    assert result["pmap_rows_equal"]
    return result


def test_llm_data_parallel_equals_single_device():
    """llm_loss: sharded jit, pmap (weight_key num_tokens) and full train steps on 8 devices."""
    result = _run_worker("llm")
    for name in ("step_sharded", "step_pmap"):
        r = result[name]
        assert r["step"] == 1
        assert r["loss_rel"] <= LOSS_RTOL and r["grad_norm_rel"] <= GRAD_RTOL, (name, r)
        assert r["params"]["violations"] == 0, (name, r["params"])
        assert r["adam_moments_rel"] <= MOMENT_RTOL, (name, r)
    assert result["sharded_state_is_replicated"]
    for name in ("sabotaged_gradient", "sabotaged_lr"):
        assert result[name]["violations"] > 0, (name, result[name])


def test_flow_data_parallel_equals_single_device():
    """flow_loss (draws keyed on the global example index): sharded jit, and pmap with 2 accumulation steps."""
    _run_worker("flow")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(_worker(sys.argv[1])))
