"""Carried-state HiFT streaming (cosyjax/hift/stream.py): stream == offline == upstream-style rerun.

The chunkings run on small random-weight configs (two upsample stages, a strided source conv, two
STFT geometries) so they compile in seconds; the reference cases check the real layout against
upstream's audio.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest

from cosyjax.config import load_model_config
from cosyjax.convert.common import load_state_dict
from cosyjax.convert.hift import convert
from cosyjax.hift import stream
from cosyjax.hift.generator import hift_inference, hift_stream_step, output_samples, param_shapes
from cosyjax.hift.source import HiftNoise
from cosyjax.hift.stream import hift_stream_init, hift_stream_push, stream_plan
from cosyjax.parity.case import load_case
from cosyjax.parity.error_model import probe_tolerance

from conftest import cases_with_group

HIFT_CASES = cases_with_group("hift")
# The first case runs by default; the others (same code path, another ~30 s of compiles each) are slow.
CASE_PARAMS = [pytest.param(d, id=os.path.basename(d), marks=() if i == 0 else pytest.mark.slow)
               for i, d in enumerate(HIFT_CASES)]


def _tol(params, fn) -> float:
    """Error-model tolerance between two float32 evaluations of ``fn(params)`` (cosyjax.parity.error_model:
    one-ulp weight probes, x KAPPA); the f0 predictor runs in float64 on both paths and is not probed."""
    return probe_tolerance(fn, params, skip=lambda path: path.startswith("f0_predictor"))


def _base():
    return load_model_config(HIFT_CASES[0] + "/model").hift


def _config_a(**kw):
    """Two stages (2, 3), n_fft 16 / hop 4: S = 24, a stride-3 source conv, the release STFT."""
    return dataclasses.replace(_base(), base_channels=8, upsample_rates=(2, 3), upsample_kernel_sizes=(4, 5),
                               resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 2),),
                               source_resblock_kernel_sizes=(3, 5), source_resblock_dilation_sizes=((1,), (1, 2)),
                               f0_cond_channels=8, **kw)


def _config_b():
    """n_fft 8 / hop 4 (no iSTFT overlap context), look-ahead 2, stride-2 source conv: other plan offsets."""
    return dataclasses.replace(_base(), base_channels=8, n_fft=8, hop_len=4, upsample_rates=(3, 2),
                               upsample_kernel_sizes=(5, 4), resblock_kernel_sizes=(3, 5),
                               resblock_dilation_sizes=((1, 2), (1,)), source_resblock_kernel_sizes=(3, 3),
                               source_resblock_dilation_sizes=((1,), (2,)), f0_cond_channels=8,
                               conv_pre_look_right=2)


def _random_params(cfg, seed=0):
    """Small random weights (audio well inside +-audio_limit) and f0 around 100 Hz, so the sines matter."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.1).astype(np.float32), param_shapes(cfg))
    params["f0_predictor"]["classifier"]["bias"] = np.array([100.0], np.float32)
    return params


def _mel(frames, batch=1, seed=1, channels=80):
    return np.random.default_rng(seed).normal(0.0, 1.0, (batch, frames, channels)).astype(np.float32)


def _run_stream(params, mel, cfg, chunks, noise, bucket=None, batch_len=None):
    """Push ``chunks`` (frame counts; the rest goes with the finalize push): (audio, per-push pieces)."""
    state = hift_stream_init(cfg, mel.shape[0], noise)
    pieces, pos = [], 0
    for c in chunks:
        state, audio = hift_stream_push(params, state, mel[:, pos:pos + c], cfg=cfg, bucket=bucket)
        pieces.append(np.asarray(audio))
        pos += c
    state, audio = hift_stream_push(params, state, mel[:, pos:], cfg=cfg, bucket=bucket, finalize=True)
    pieces.append(np.asarray(audio))
    assert np.asarray(state.finished).all()
    return np.concatenate(pieces, axis=1), pieces, state


def _random_chunks(total, seed, low=1, high=90):
    rng = np.random.default_rng(seed)
    out, pos = [], 0
    while pos < total - high:
        out.append(int(rng.integers(low, high)))
        pos += out[-1]
    return out


# ---------------------------------------------------------------- reference cases
@pytest.mark.parametrize("case_dir", CASE_PARAMS)
def test_stream_matches_offline_and_upstream_on_case(case_dir):
    """Upstream's own noise buffers: the stream reproduces the reference audio and the offline call."""
    case = load_case(case_dir)
    cfg = load_model_config(case.model_dir).hift
    params = convert(load_state_dict(os.path.join(case.model_dir, "hift.pt")), cfg, "hift.pt")
    ref = case.group("hift")
    mel = np.transpose(ref["speech_feat"], (0, 2, 1))
    noise = HiftNoise(ref["noise_rand_ini"], ref["noise_sine_waves"])
    offline = np.asarray(hift_inference(params, mel, cfg=cfg, noise=noise))
    tol = _tol(params, lambda p: hift_inference(p, mel, cfg=cfg, noise=noise))
    frames = mel.shape[1]
    bucket = 16 * -(-frames // 16)
    for chunks in ([], [9] * (frames // 9), [frames // 3, 1, frames // 3]):
        streamed, pieces, state = _run_stream(params, mel, cfg, chunks, noise, bucket=bucket)
        assert streamed.shape == offline.shape == ref["audio"].shape
        assert int(np.asarray(state.emitted)[0]) == offline.shape[1]
        err = np.abs(streamed - offline).max()
        print(f"{os.path.basename(case_dir)} chunks {chunks[:3]}: max|stream - offline| {err:.2e}, "
              f"max|stream - upstream| {np.abs(streamed - ref['audio']).max():.2e}")
        np.testing.assert_allclose(streamed, offline, atol=tol, rtol=0)
        np.testing.assert_allclose(streamed, ref["audio"], atol=tol, rtol=0)
    # Chunk by chunk against upstream's loop (``hift_stream_step``: rerun on all mel so far).
    emitted, pos = 0, 0
    for i, c in enumerate(chunks + [frames - sum(chunks)]):
        pos += c
        rerun, emitted = hift_stream_step(params, mel[:, :pos], emitted, cfg=cfg, finalize=i == len(chunks),
                                          noise=noise)
        rerun = np.asarray(rerun)
        assert pieces[i].shape == rerun.shape
        err = np.abs(pieces[i] - rerun).max() if rerun.size else 0.0
        print(f"  chunk {i}: {rerun.shape[1]} samples, max|carried - rerun| {err:.2e}")
        np.testing.assert_allclose(pieces[i], rerun, atol=tol, rtol=0)


# ---------------------------------------------------------------- chunkings, compiles
@pytest.mark.parametrize("schedule", ["tokens25_50_100", "random", "misaligned_first", "one_frame_then_big"])
def test_stream_matches_offline_for_chunkings(schedule):
    cfg = _config_a()
    params = _random_params(cfg)
    mel = _mel(600)
    chunks = {"tokens25_50_100": [50, 100, 200, 200],  # 25 / 50 / 100 tokens' worth of mel
              "random": _random_chunks(600, seed=2),
              "misaligned_first": [37, 100, 3, 200, 200],
              "one_frame_then_big": [1, 1, 7, 1, 250, 0, 250]}[schedule]
    key = jax.random.PRNGKey(11)
    offline = np.asarray(hift_inference(params, mel, cfg=cfg, noise=key))
    tol = _tol(params, lambda p: hift_inference(p, mel, cfg=cfg, noise=key))
    streamed, pieces, _ = _run_stream(params, mel, cfg, chunks, key, bucket=256)
    err = np.abs(streamed - offline).max()
    print(f"{schedule}: {len(pieces)} pushes, max|stream - offline| {err:.2e} (audio max {np.abs(offline).max():.2f})")
    assert np.abs(offline).max() < 0.9 * cfg.audio_limit and np.abs(offline).std() > 1e-3  # not clipped, not silent
    assert streamed.shape == offline.shape
    np.testing.assert_allclose(streamed, offline, atol=tol, rtol=0)
    total = 0
    for c, piece in zip(np.cumsum(chunks), pieces):  # upstream's emission schedule
        total += piece.shape[1]
        assert total == output_samples(int(c), cfg, False) if c >= 9 else total == 0


def test_one_compile_per_bucket():
    """Chunks of any size in one bucket, finalizing or not, share one compiled function."""
    cfg = _config_a(audio_limit=0.985)  # a config no other test compiles
    params = _random_params(cfg)
    mel = _mel(175)
    before = stream._stream_core._cache_size()
    streamed, pieces, _ = _run_stream(params, mel, cfg, [17, 30, 20, 32, 31, 25], 0)  # final push: 20 frames
    assert stream._stream_core._cache_size() - before == 1
    assert len(pieces) == 7 and streamed.shape == (1, 175 * cfg.upsample_scale)


@pytest.mark.slow
def test_other_plan_offsets_config_b():
    cfg = _config_b()
    plan = stream_plan(cfg)
    assert plan.istft_ctx == 0 and plan.delay == 3 + cfg.conv_pre_look_right + 1
    params = _random_params(cfg, seed=3)
    mel = _mel(250, seed=4)
    offline = np.asarray(hift_inference(params, mel, cfg=cfg, noise=2))
    tol = _tol(params, lambda p: hift_inference(p, mel, cfg=cfg, noise=2))
    streamed, _, _ = _run_stream(params, mel, cfg, [3, 5, 60, 1, 64, 64], 2, bucket=64)
    np.testing.assert_allclose(streamed, offline, atol=tol, rtol=0)


@pytest.mark.slow
def test_chunk_by_chunk_equals_upstream_style_rerun():
    """Upstream's loop (``hift_stream_step``: rerun on all mel, finalize=False) gives the same chunks."""
    cfg = _config_a()
    params = _random_params(cfg)
    mel = _mel(130, seed=5)
    chunks = [56, 50]  # upstream's first hops: 2 * (25 + pad) + 6 and 2 * 25 frames; the rest finalizes
    streamed, pieces, _ = _run_stream(params, mel, cfg, chunks, 9, bucket=256)
    tol = _tol(params, lambda p: hift_inference(p, mel, cfg=cfg, noise=9))
    emitted, pos = 0, 0
    for i, c in enumerate(chunks + [mel.shape[1] - sum(chunks)]):
        pos += c
        final = i == len(chunks)
        rerun, emitted = hift_stream_step(params, mel[:, :pos], emitted, cfg=cfg, finalize=final, noise=9)
        rerun = np.asarray(rerun)
        assert pieces[i].shape == rerun.shape
        err = np.abs(pieces[i] - rerun).max() if rerun.size else 0.0
        print(f"chunk {i}: {rerun.shape[1]} samples, max|carried - rerun| {err:.2e}")
        np.testing.assert_allclose(pieces[i], rerun, atol=tol, rtol=0)


def test_batch_rows_stream_with_own_lengths_and_finalize():
    """Rows advance by their own chunk_len and finalize at different pushes; each equals its offline audio."""
    cfg = _config_a()
    params = _random_params(cfg)
    mel = _mel(160, batch=3, seed=6)
    totals = [160, 97, 40]
    # (chunk_len per row, finalize per row) per push, all padded to one bucket of 64
    pushes = [([64, 10, 3], [False, False, False]),
              ([30, 64, 37], [False, False, True]),
              ([64, 23, 0], [False, True, False]),
              ([2, 0, 0], [True, False, False])]
    state = hift_stream_init(cfg, 3, 4)
    pos = np.zeros(3, int)
    outs = [[] for _ in range(3)]
    for lengths, fin in pushes:
        chunk = np.zeros((3, 64, 80), np.float32)
        for b in range(3):
            chunk[b, :lengths[b]] = mel[b, pos[b]:pos[b] + lengths[b]]
        state, audio = hift_stream_push(params, state, chunk, cfg=cfg, chunk_len=np.array(lengths),
                                        finalize=np.array(fin), bucket=64)
        got = np.asarray(state.chunk_len)
        for b in range(3):
            outs[b].append(np.asarray(audio)[b, :got[b]])
            assert not np.asarray(audio)[b, got[b]:].any()
        pos += lengths
    assert pos.tolist() == totals and np.asarray(state.finished).all()
    offline = np.asarray(hift_inference(params, mel, cfg=cfg, noise=4, mel_len=np.array(totals)))
    tol = _tol(params, lambda p: hift_inference(p, mel, cfg=cfg, noise=4, mel_len=np.array(totals)))
    single, _, _ = _run_stream(params, mel[1:2, :totals[1]], cfg, [10, 64], 4, bucket=256)
    for b in range(3):
        row = np.concatenate(outs[b])
        assert row.shape == (cfg.upsample_scale * totals[b],)
        np.testing.assert_allclose(row, offline[b, :row.shape[0]], atol=tol, rtol=0)
    np.testing.assert_allclose(np.concatenate(outs[1]), single[0], atol=tol, rtol=0)


# ---------------------------------------------------------------- bad inputs
@pytest.fixture
def no_device(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("device function called for a bad input")
    monkeypatch.setattr(stream, "_stream_core", refuse)


def test_bad_inputs_raise_before_device(no_device):
    cfg = _base()
    state = hift_stream_init(cfg, 2)
    good = np.zeros((2, 10, cfg.in_channels), np.float32)
    cases = [
        (dict(mel_chunk=np.zeros((2, cfg.in_channels, 10), np.float32)), "looks channel-major"),
        (dict(mel_chunk=np.zeros((1, 10, cfg.in_channels), np.float32)), "the stream state has 2"),
        (dict(mel_chunk=np.full((2, 10, cfg.in_channels), np.nan, np.float32)), "NaN or inf"),
        (dict(chunk_len=np.array([3, 11])), "outside"),
        (dict(bucket=8), "smaller than"),
        (dict(finalize=np.array([True])), "finalize: expected"),
        (dict(mel_chunk=np.zeros((2, 0, cfg.in_channels), np.float32), finalize=True), "received no mel frames"),
    ]
    for kwargs, match in cases:
        args = dict(mel_chunk=good) | kwargs
        with pytest.raises(ValueError, match=match):
            hift_stream_push({}, state, args.pop("mel_chunk"), cfg=cfg, **args)
    finished = dataclasses.replace(state, finished=np.array([True, False]))
    with pytest.raises(ValueError, match="were finalized"):
        hift_stream_push({}, finished, good, cfg=cfg)
    with pytest.raises(ValueError, match="cache layout"):
        hift_stream_push({}, hift_stream_init(_config_a(), 2), good, cfg=cfg)
    short = hift_stream_init(cfg, 2, HiftNoise(np.zeros(9), np.zeros((100, 9))))
    with pytest.raises(ValueError, match="noise.uniform"):
        hift_stream_push({}, short, good, cfg=cfg)
    with pytest.raises(ValueError, match="noise: expected"):
        hift_stream_init(cfg, 1, "seed")
    with pytest.raises(ValueError, match="batch"):
        hift_stream_init(cfg, 0)


# ---------------------------------------------------------------- CosyVoice3Model(hift_carry=...)
def test_model_hift_carry_equals_rerun():
    """The model's carried vocoder (default) against upstream's re-run at every hop: the same chunk
    lengths, and each chunk within the HiFT audio tolerance (buffer-size-dependent float32 rounding;
    see cosyjax/hift/stream.py)."""
    from test_model import TTS_CASES, _codes, _load, _prompt

    from cosyjax.model import CosyVoice3Model, Trace

    if not TTS_CASES:
        pytest.skip("no committed case with the tts groups")
    case, converted = _load(TTS_CASES[0])
    forced = _codes(converted, 24, 3)  # the tokens of test_model's stream tests: their compiles
    chunks = {}
    for carry in (True, False):
        m = CosyVoice3Model(converted, hift_carry=carry)
        trace = Trace(record_mel=True)
        chunks[carry] = [c["tts_speech"] for c in m.tts(forced_tokens=forced, stream=True, trace=trace,
                                                           **_prompt(case))]
    tol = _tol(m.params["hift"], lambda p: hift_inference(p, trace.mel, cfg=m.config.hift, noise=m.hift_noise))
    assert len(chunks[True]) >= 2
    assert [c.shape for c in chunks[True]] == [c.shape for c in chunks[False]]
    for i, (carried, rerun) in enumerate(zip(chunks[True], chunks[False])):
        assert np.abs(rerun).max() > 1e-2  # audible chunks, not silence
        np.testing.assert_allclose(carried, rerun, atol=tol, rtol=0, err_msg=f"chunk {i}")
