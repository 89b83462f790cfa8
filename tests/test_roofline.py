"""benchmarks/roofline.py at tiny dims: every stage program lowers from ShapeDtypeStructs and is counted.

What is checked: the loop-unrolling device counts every iteration (XLA's cost analysis counts a
loop body once), the Euler-step extrapolation equals a direct count, the roofline is
max(flops / peak, bytes / bandwidth) with the bf16 or float32 peak, and the table has a row per
program and dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from benchmarks import roofline
from benchmarks.workload import quick_config


def test_unrolled_scans_count_every_iteration():
    def f(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=10)[0]

    args = (jax.ShapeDtypeStruct((8, 32), jnp.float32), jax.ShapeDtypeStruct((32, 32), jnp.float32))
    once = jax.jit(f).lower(*args).cost_analysis()["flops"]
    with roofline.unrolled_scans():
        unrolled = jax.jit(f).lower(*args).cost_analysis()["flops"]
    assert unrolled == pytest.approx(10 * once, rel=0.01)
    assert once >= 2 * 8 * 32 * 32


@pytest.fixture(scope="module")
def rows():
    return roofline.run(quick_config(), ("float32", "bfloat16"), (1,), seconds=1.0, prefill_tokens=32, cache_len=256)


def test_every_program_is_counted(rows):
    assert [(r["dtype"], r["stage"]) for r in rows] == [(d, s) for d in ("float32", "bfloat16")
                                                        for s in ("llm", "llm", "flow", "hift")]
    for r in rows:
        assert r["flops"] > 0 and r["bytes"] > 0 and r["arg_bytes"] > 0, r
        peaks = roofline.PEAKS["H200"]
        want = max(r["flops"] / peaks[0][r["dtype"]], r["bytes"] / peaks[1])
        assert r["roofline"]["H200"]["seconds"] == pytest.approx(want)
    f32 = {r["program"]: r for r in rows if r["dtype"] == "float32"}
    bf16 = {r["program"]: r for r in rows if r["dtype"] == "bfloat16"}
    for name in (n for n in f32 if n.startswith("prefill")):  # the LLM's arguments are its weights
        assert bf16[name]["arg_bytes"] < 0.6 * f32[name]["arg_bytes"], name
    table = roofline.markdown(rows)
    assert table.count("\n| ") == len(rows) and "989 TFLOP/s bf16" in table


def test_flow_step_extrapolation_equals_a_direct_count():
    config = quick_config()
    config = dataclasses.replace(config, flow=dataclasses.replace(config.flow, n_timesteps=3))
    flow = next(p for p in roofline.programs(config, "float32", (1,), seconds=0.5, prefill_tokens=32, cache_len=256)
                if p.stage == "flow")
    extrapolated = roofline.cost(flow)
    direct = roofline.cost(dataclasses.replace(flow, steps=None))
    assert extrapolated["flops"] == pytest.approx(direct["flops"], rel=1e-3)
