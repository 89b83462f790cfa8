"""The precision policy (cosyjax/precision.py) and the accelerator code paths, checked on CPU.

- ``PrecisionPolicy.resolve``: float32 / bfloat16 / auto per backend.
- Blockwise attention (never holds [B, N, T, S] scores) equals the materialised one within float32
  rounding of the re-scaled sums, for GQA and for the DiT's chunk mask.
- The decode loop with a fixed trip count (the accelerator path) gives the same tokens, stop ids and
  state as the early-exit while loop.
- bf16 compute runs every stage with no float64 in the programs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyjax.flow.dit import attention_mask
from cosyjax.nn.attention import BLOCK, attention
from cosyjax.parity.error_model import EPS32
from cosyjax.precision import BFLOAT16, FLOAT32, Precision, PrecisionPolicy


def test_policy_resolution():
    assert PrecisionPolicy.resolve("float32", "gpu").flow == Precision("float32", "blockwise")
    assert PrecisionPolicy.resolve("auto", "cpu") == PrecisionPolicy.resolve("float32", "cpu")
    bf = PrecisionPolicy.resolve("auto", "tpu")
    assert bf.name == "bfloat16" and not bf.f0_float64 and bf.hift.attention == "blockwise"
    assert PrecisionPolicy.resolve(None, "cpu").name == "float32"
    with pytest.raises(ValueError, match="dtype='float16'"):
        PrecisionPolicy.resolve("float16")
    with pytest.raises(ValueError, match="attention='flash'"):
        Precision("float32", "flash")


def _qkv(rng, batch, length, keys, heads, kv_heads, dim):
    q = rng.standard_normal((batch, length, heads, dim)).astype(np.float32)
    k = rng.standard_normal((batch, keys, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((batch, keys, kv_heads, dim)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("heads,kv_heads,keys", [(6, 2, 300), (4, 4, BLOCK), (8, 1, 37)])
def test_blockwise_attention_equals_materialised(heads, kv_heads, keys):
    rng = np.random.default_rng(heads + keys)
    q, k, v = _qkv(rng, 2, 50, keys, heads, kv_heads, 16)
    # Padding keys hidden for row 1, a causal-like band for row 0: every query sees key 0.
    mask = np.ones((2, 50, keys), bool)
    mask[0] = np.arange(keys)[None, :] <= (np.arange(50)[:, None] * keys) // 50
    mask[1, :, keys // 2:] = False
    dense = np.asarray(attention(q, k, v, mask, scale=0.25, precision=FLOAT32))
    block = np.asarray(attention(q, k, v, mask, scale=0.25, precision=Precision("float32", "blockwise")))
    # Both are convex combinations of v's rows: the blockwise re-scaling adds a few float32 roundings
    # per block on top of the same products, relative to max |v|.
    blocks = -(-keys // BLOCK)
    bound = 8 * (blocks + 2) * EPS32 * np.abs(v).max()
    np.testing.assert_allclose(block, dense, rtol=0, atol=bound)
    # And hidden keys really are hidden: changing them changes nothing.
    v2 = v.copy()
    v2[1, keys // 2:] += 100.0
    np.testing.assert_array_equal(np.asarray(attention(q, k, v2, mask, scale=0.25, precision=FLOAT32))[1],
                                  dense[1])
    np.testing.assert_allclose(np.asarray(attention(q, k, v2, mask, scale=0.25,
                                                    precision=Precision("float32", "blockwise")))[1],
                               block[1], rtol=0, atol=bound)


def test_blockwise_dit_chunk_mask_through_the_flow():
    """The flow on the accelerator path (blockwise attention, streaming chunk mask) equals the CPU path."""
    from cosyjax.flow.flow import flow_inference
    from cosyjax.parity.error_model import probe_tolerance

    from test_flow_stream import _inputs
    from conftest import cases_with_group
    from cosyjax.convert import convert_model
    from cosyjax.parity.case import load_case

    converted = convert_model(load_case(cases_with_group("flow")[0]).model_dir, progress=False)
    cfg = converted.config.flow
    pt, feat, emb, tok = _inputs(cfg, 7, 14, 70, 3)

    def run(params, precision):
        return flow_inference(params, tok, pt, feat, emb, cfg=cfg, noise=converted.buffers["flow_rand_noise"],
                              streaming=True, finalize=True, precision=precision)

    dense = run(converted.params["flow"], FLOAT32)
    block = run(converted.params["flow"], Precision("float32", "blockwise"))
    tol = probe_tolerance(lambda p: run(p, FLOAT32), converted.params["flow"])
    np.testing.assert_allclose(block, dense, rtol=0, atol=tol)
    assert attention_mask(jnp.array([5]), 8, 4, True)[0, 0, 4] == False  # noqa: E712 (the mask is chunked)


def test_fixed_trip_decode_equals_while_loop():
    from cosyjax.config import LLMConfig
    from cosyjax.llm import decode, lm
    from cosyjax.llm.qwen2 import param_shapes
    from cosyjax.llm.sampling import SamplerSettings

    cfg = LLMConfig.tiny()
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.2, jnp.float32), param_shapes(cfg))
    requests = [lm.LMRequest((5, 6, 7)), lm.LMRequest((8, 9), (3,), (1, 2, 3))]
    keys = jnp.stack([jax.random.key(1), jax.random.key(2)])
    settings = SamplerSettings.from_config(cfg.sampling)
    out = {}
    for fixed in (False, True):
        state = lm.start(params, cfg, requests, keys, settings)
        tokens, counts = [], []
        while not np.asarray(state.done).all():
            state, chunk = decode.decode_chunk(params, state, cfg=cfg, settings=settings, num_steps=7,
                                               fixed_trip=fixed)
            tokens.append(np.asarray(chunk.tokens))
            counts.append(np.asarray(chunk.count))
        out[fixed] = (np.concatenate(tokens, 1), np.stack(counts), np.asarray(state.stop_token),
                      np.asarray(state.step), np.asarray(state.end_index), np.asarray(state.logits))
    a, b = out[False], out[True]
    for x, y in zip(a[:5], b[:5]):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a[5], b[5])


def test_bf16_policy_runs_every_stage_without_float64():
    """bf16 compute end to end (forced tokens: flow and HiFT); the flow program holds bf16 products and
    no float64 (TPUs lack it).  The vocoder's programs are checked in tests/test_hift.py."""
    from cosyjax.flow.flow import _flow_core
    from cosyjax.model import CosyVoice3Model
    from test_model import TTS_CASES, _codes, _load, _prompt

    case, converted = _load(TTS_CASES[0])
    m16 = CosyVoice3Model(converted, "bfloat16")
    assert m16.policy.flow.dtype == jnp.bfloat16 and not m16.f0_float64
    assert m16.params["flow"]["input_embedding"]["embedding"].dtype == jnp.bfloat16
    forced = _codes(converted, 30, 7)
    audio = np.concatenate([c["tts_speech"] for c in m16.tts(forced_tokens=forced, **_prompt(case))], axis=1)
    assert audio.shape[1] > 0 and np.isfinite(audio).all()
    fc = converted.config.flow
    text = _flow_core.lower(m16.params["flow"], np.zeros((1, 32), np.int32), np.array([20], np.int32),
                            np.zeros((1, 64, fc.output_size), np.float32), np.array([0], np.int32),
                            np.array([40], np.int32), np.zeros((1, fc.spk_embed_dim), np.float32),
                            np.zeros((1, 64, fc.output_size), np.float32), cfg=fc, streaming=False,
                            precision=BFLOAT16).as_text()
    assert "f64" not in text and "bf16" in text
