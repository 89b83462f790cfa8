"""Incremental flow streaming (cosyjax/flow/stream.py) against the re-run of the whole prefix.

Reference: ``flow_inference(..., streaming=True)`` on every prefix, which is what upstream's stream
does (re-run, keep the new frames); its own parity with upstream is in test_flow/test_check.  The
two differ by float32 summation order (incremental attention sums the cached keys in another
blocking than the full-length matmul), so the tolerance is the error model's
(``cosyjax.parity.error_model.probe_tolerance``: one-ulp weight probes of the re-run, x KAPPA).
"""

from __future__ import annotations

import numpy as np
import pytest

from cosyjax.flow import stream as stream_mod
from cosyjax.flow.flow import flow_inference
from cosyjax.flow.stream import cache_bytes_per_frame, flow_stream_init, flow_stream_push
from cosyjax.model import CosyVoice3Model
from cosyjax.parity.error_model import probe_tolerance

from conftest import cases_with_group



@pytest.fixture(scope="module", params=cases_with_group("flow")[:2], ids=lambda d: d.rsplit("/", 1)[-1])
def flow_model(request):
    from cosyjax.convert import convert_model
    from cosyjax.parity.case import load_case

    converted = convert_model(load_case(request.param).model_dir, progress=False)
    return converted


def _inputs(cfg, prompt_tokens, prompt_frames, n, seed):
    rng = np.random.default_rng(seed)
    pt = rng.integers(0, cfg.vocab_size, (1, prompt_tokens))
    feat = rng.standard_normal((1, prompt_frames, cfg.output_size)).astype(np.float32)
    emb = rng.standard_normal((1, cfg.spk_embed_dim)).astype(np.float32)
    tok = rng.integers(0, cfg.vocab_size, (1, n))
    return pt, feat, emb, tok


def _rerun(converted, tok, pt, feat, emb, finalize, params=None):
    cfg = converted.config.flow
    params = converted.params["flow"] if params is None else params
    return np.asarray(flow_inference(params, tok, pt, feat, emb, cfg=cfg, noise=converted.buffers["flow_rand_noise"],
                                     streaming=True, finalize=finalize))


def _tol(converted, tok, pt, feat, emb, finalize):
    """Tolerance between two float32 evaluations of the chunk-causal flow on these inputs."""
    return probe_tolerance(lambda p: _rerun(converted, tok, pt, feat, emb, finalize, p), converted.params["flow"])


def test_upstream_hops_equal_rerun_and_final_equals_chunk_causal_pass(flow_model):
    cfg = flow_model.config.flow
    params, noise = flow_model.params["flow"], flow_model.buffers["flow_rand_noise"]
    base = cfg.static_chunk_size // cfg.token_mel_ratio
    la = cfg.pre_lookahead_len
    p = base + 2  # not a multiple of the hop: the first hop is padded as upstream pads it
    pt, feat, emb, tok = _inputs(cfg, p, cfg.token_mel_ratio * p, 9 * base + la + 1, 0)
    state = flow_stream_init(cfg, pt, feat, emb)
    pad = -(-p // base) * base - p
    offset, hop, chunks = 0, base, []
    while offset + hop + (pad if offset == 0 else 0) + la <= tok.shape[1]:
        this = hop + (pad if offset == 0 else 0)
        need = offset + this + la
        mel, state = flow_stream_push(params, state, tok[:, :need], cfg=cfg, noise=noise, finalize=False)
        ref = _rerun(flow_model, tok[:, :need], pt, feat, emb, False)[:, cfg.token_mel_ratio * offset:]
        assert mel.shape == ref.shape == (1, cfg.token_mel_ratio * this, cfg.output_size)
        np.testing.assert_allclose(mel, ref, rtol=0, atol=_tol(flow_model, tok[:, :need], pt, feat, emb, False))
        assert state.frames % cfg.static_chunk_size == 0  # upstream's hops end on DiT chunks
        chunks.append(mel)
        offset += this
        hop = min(4 * base, 2 * hop)
    assert len(chunks) >= 3
    mel, state = flow_stream_push(params, state, tok, cfg=cfg, noise=noise, finalize=True)
    chunks.append(mel)
    whole = _rerun(flow_model, tok, pt, feat, emb, True)
    streamed = np.concatenate(chunks, axis=1)
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=_tol(flow_model, tok, pt, feat, emb, True))
    assert state.finished
    with pytest.raises(ValueError, match="already finalized"):
        flow_stream_push(params, state, tok, cfg=cfg, noise=noise, finalize=True)


@pytest.mark.parametrize("prompt_tokens,prompt_frames,hops", [(6, 9, [3, 4, 7, 2]), (5, 10, [1, 1, 13])])
def test_unaligned_pushes_recompute_the_open_chunk(flow_model, prompt_tokens, prompt_frames, hops):
    """Pushes that end inside a DiT chunk (and a prompt mel not 2x the prompt tokens, as in VC)."""
    cfg = flow_model.config.flow
    params, noise = flow_model.params["flow"], flow_model.buffers["flow_rand_noise"]
    la = cfg.pre_lookahead_len
    pt, feat, emb, tok = _inputs(cfg, prompt_tokens, prompt_frames, 40, 1)
    state = flow_stream_init(cfg, pt, feat, emb, capacity=1)  # forces the capacity to grow
    n = 0
    for h in hops:
        n += h
        mel, state = flow_stream_push(params, state, tok[:, :n + la], cfg=cfg, noise=noise, finalize=False, out_from=0)
        np.testing.assert_allclose(mel, _rerun(flow_model, tok[:, :n + la], pt, feat, emb, False), rtol=0,
                                   atol=_tol(flow_model, tok[:, :n + la], pt, feat, emb, False))
    mel, state = flow_stream_push(params, state, tok, cfg=cfg, noise=noise, finalize=True, out_from=0)
    np.testing.assert_allclose(mel, _rerun(flow_model, tok, pt, feat, emb, True), rtol=0,
                               atol=_tol(flow_model, tok, pt, feat, emb, True))
    assert state.capacity >= cfg.token_mel_ratio * (prompt_tokens + tok.shape[1])


def test_work_per_push_is_bounded(flow_model, monkeypatch):
    """Every push integrates one bucket of new frames, however long the stream already is."""
    cfg = flow_model.config.flow
    params, noise = flow_model.params["flow"], flow_model.buffers["flow_rand_noise"]
    chunk, ratio, la = cfg.static_chunk_size, cfg.token_mel_ratio, cfg.pre_lookahead_len
    base = chunk // ratio
    pt, feat, emb, tok = _inputs(cfg, base, chunk, 12 * base + la, 2)
    seen = []
    core = stream_mod._push_core

    def spy(params, cache, tokens, token_mask, embedding, feat_, noise_, *args, **kwargs):
        seen.append(feat_.shape[1])
        return core(params, cache, tokens, token_mask, embedding, feat_, noise_, *args, **kwargs)

    monkeypatch.setattr(stream_mod, "_push_core", spy)
    state = flow_stream_init(cfg, pt, feat, emb)
    for k in range(1, 12):
        flow_stream_push(params, state, tok[:, :k * base + la], cfg=cfg, noise=noise, finalize=False)
    assert seen[0] == 2 * chunk  # prompt chunk + first hop
    assert seen[1:] == [chunk] * 10


def test_bad_pushes(flow_model):
    cfg = flow_model.config.flow
    params, noise = flow_model.params["flow"], flow_model.buffers["flow_rand_noise"]
    pt, feat, emb, tok = _inputs(cfg, 4, 8, 30, 3)
    state = flow_stream_init(cfg, pt, feat, emb)
    flow_stream_push(params, state, tok[:, :20], cfg=cfg, noise=noise, finalize=False)
    with pytest.raises(ValueError, match="must extend"):
        flow_stream_push(params, state, tok[:, :10], cfg=cfg, noise=noise, finalize=False)
    with pytest.raises(ValueError, match="ids must lie"):
        flow_stream_push(params, state, np.full((1, 25), cfg.vocab_size), cfg=cfg, noise=noise, finalize=False)
    with pytest.raises(ValueError, match="out_from"):
        flow_stream_push(params, state, tok[:, :25], cfg=cfg, noise=noise, finalize=False, out_from=-1)
    with pytest.raises(ValueError, match="prompt_feat"):
        flow_stream_init(cfg, pt, feat[:, :, :3], emb)
    with pytest.raises(ValueError, match="embedding"):
        flow_stream_init(cfg, pt, feat, emb[:, :3])
    assert cache_bytes_per_frame(cfg) == 2 * cfg.n_timesteps * cfg.depth * 2 * cfg.heads * cfg.dim_head * 4


def test_model_stream_flow_carry_matches_rerun_and_chunk_causal_final(flow_model):
    """CosyVoice3Model: carried flow == re-run flow (upstream's stream); with the corrected final
    chunk the stream equals the vocoder on one chunk-causal flow pass over all tokens."""
    from cosyjax.hift.generator import hift_inference

    converted = flow_model
    cfg = converted.config.flow
    base = cfg.static_chunk_size // cfg.token_mel_ratio
    pt, feat, emb, tok = _inputs(cfg, base + 1, cfg.token_mel_ratio * (base + 1), 6 * base, 4)
    prompt = dict(flow_prompt_speech_tokens=pt[0], prompt_feat=feat[0], embedding=emb[0])

    def speech(m):
        chunks = [c["tts_speech"] for c in m.tts(forced_tokens=tok[0], stream=True, **prompt)]
        return np.concatenate(chunks, axis=1), len(chunks)

    def offline_audio(params):  # the vocoder on one chunk-causal flow pass over all tokens
        mel = _rerun(converted, tok, pt, feat, emb, True, params["flow"])
        return hift_inference(params["hift"], mel, cfg=converted.config.hift, finalize=True)

    # Flow and vocoder rounding through the whole chain (the f0 predictor is float64 on every path).
    tol = probe_tolerance(offline_audio, {"flow": converted.params["flow"], "hift": converted.params["hift"]},
                          skip=lambda path: path.startswith("hift/f0_predictor"))
    carried, n = speech(CosyVoice3Model(converted, silent_filter=False))
    rerun, n2 = speech(CosyVoice3Model(converted, silent_filter=False, flow_carry=False))
    assert n == n2 >= 3 and carried.shape == rerun.shape
    np.testing.assert_allclose(carried, rerun, rtol=0, atol=tol)

    causal, _ = speech(CosyVoice3Model(converted, silent_filter=False, final_full_attention=False))
    offline = np.asarray(offline_audio(converted.params))
    assert causal.shape == offline.shape
    np.testing.assert_allclose(causal, offline, rtol=0, atol=tol)
    assert np.abs(causal - carried).max() > 100 * tol  # the upstream final chunk (full attention) differs
