"""HiFT vocoder: parity with the reference cases, padding/bucketing, batching, streaming, converter, bad inputs."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest
import torch

from cosyjax.checkpoint import ConvertedModel
from cosyjax.config import load_model_config
from cosyjax.convert.common import ConversionError, load_state_dict, shape_only_state_dict
from cosyjax.convert.hift import convert
from cosyjax.hift import generator
from cosyjax.hift.generator import (hift_inference, hift_stream_step, mel_bucket, output_samples, param_shapes)
from cosyjax.hift.istft import hann_window, istft, stft
from cosyjax.hift.source import HiftNoise, make_noise
from cosyjax.parity.case import load_case
from cosyjax.parity.compare import format_comparison
from cosyjax.parity.error_model import probe_tolerance
from cosyjax.parity.stages.hift import RUNNERS

from conftest import cases_with_group

GROUPS = ("hift", "hift_partial")
PARITY_CASES = [(d, g) for g in GROUPS for d in cases_with_group(g)]
HIFT_CASES = cases_with_group("hift")

_CONVERTED: dict[str, tuple] = {}


def _converted(case_dir: str):
    """(case, model config, hift params, raw state_dict), converted once per session."""
    if case_dir not in _CONVERTED:
        case = load_case(case_dir)
        cfg = load_model_config(case.model_dir)
        sd = load_state_dict(os.path.join(case.model_dir, "hift.pt"))
        _CONVERTED[case_dir] = (case, cfg, convert(sd, cfg.hift, "hift.pt"), sd)
    return _CONVERTED[case_dir]


def _f0_path(path: str) -> bool:
    return path.startswith("f0_predictor")  # float64 on every path that is compared here


def _tol(params, fn) -> float:
    """The error-model tolerance of two float32 evaluations of ``fn(params)`` (one-ulp weight probes)."""
    return probe_tolerance(fn, params, skip=_f0_path)


def _case_inputs(case, group):
    ref = case.group(group)
    mel = np.transpose(ref["speech_feat"], (0, 2, 1))
    return ref, mel, HiftNoise(ref["noise_rand_ini"], ref["noise_sine_waves"])


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("case_dir,group", PARITY_CASES,
                         ids=[f"{os.path.basename(d)}-{g}" for d, g in PARITY_CASES])
def test_parity(case_dir, group):
    case, cfg, params, _ = _converted(case_dir)
    result = RUNNERS[group](case, group, ConvertedModel(config=cfg, params={"hift": params}, buffers={}))
    assert {c.key.split("/", 1)[1] for c in result.comparisons} == {"f0", "source", "conv_post", "audio"}
    failed = [format_comparison(c) for c in result.comparisons if not c.passed]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("case_dir", HIFT_CASES, ids=os.path.basename)
@pytest.mark.parametrize("group", GROUPS)
def test_padding_does_not_change_valid_output(case_dir, group):
    """Garbage frames past ``mel_len`` and a larger bucket leave the reference audio unchanged."""
    case, cfg, params, _ = _converted(case_dir)
    if f"{group}/audio" not in case.arrays:
        pytest.skip(f"no {group} in this case")
    ref, mel, noise = _case_inputs(case, group)
    frames = mel.shape[1]
    extra = mel_bucket(frames) + 1 - frames  # force the next bucket
    garbage = np.random.default_rng(0).normal(0.0, 5.0, (1, extra, mel.shape[2])).astype(np.float32)
    long_noise = HiftNoise(noise.rand_ini, np.concatenate(
        [noise.uniform, np.random.default_rng(1).random((1, extra * cfg.hift.upsample_scale, noise.uniform.shape[2]),
                                                         np.float32)], axis=1))
    finalize = bool(ref["finalize"])
    padded = np.asarray(hift_inference(params, np.concatenate([mel, garbage], axis=1), cfg=cfg.hift,
                                       finalize=finalize, noise=long_noise, mel_len=np.array([frames])))
    def plain_fn(p):
        return hift_inference(p, mel, cfg=cfg.hift, finalize=finalize, noise=noise)

    plain = np.asarray(plain_fn(params))
    tol = _tol(params, plain_fn)
    assert padded.shape == plain.shape == ref["audio"].shape
    np.testing.assert_allclose(padded, ref["audio"], atol=tol, rtol=0)
    np.testing.assert_allclose(padded, plain, atol=tol, rtol=0)


@pytest.mark.parametrize("case_dir", HIFT_CASES, ids=os.path.basename)
def test_batch_rows_equal_single_rows(case_dir):
    case, cfg, params, _ = _converted(case_dir)
    _, mel, _ = _case_inputs(case, "hift")
    other = mel[:, ::-1] * 0.8 + 0.1
    short = mel.shape[1] - 5
    batch = np.concatenate([mel, other], axis=0)
    both = np.asarray(hift_inference(params, batch, cfg=cfg.hift, noise=3, mel_len=np.array([mel.shape[1], short])))
    one = np.asarray(hift_inference(params, mel, cfg=cfg.hift, noise=3))
    two = np.asarray(hift_inference(params, other[:, :short], cfg=cfg.hift, noise=3))
    tol = _tol(params, lambda p: hift_inference(p, batch, cfg=cfg.hift, noise=3, mel_len=np.array([mel.shape[1], short])))
    np.testing.assert_allclose(both[0], one[0], atol=tol, rtol=0)
    np.testing.assert_allclose(both[1, :two.shape[1]], two[0], atol=tol, rtol=0)
    assert not both[1, two.shape[1]:].any(), "a shorter row must be followed by zeros"


@pytest.mark.parametrize("case_dir", HIFT_CASES, ids=os.path.basename)
def test_streaming_matches_offline(case_dir):
    """Upstream's streaming contract (rerun with finalize=False, emit new samples) gives the offline audio."""
    case, cfg, params, _ = _converted(case_dir)
    _, mel, _ = _case_inputs(case, "hift")
    key = jax.random.PRNGKey(7)
    offline = np.asarray(hift_inference(params, mel, cfg=cfg.hift, noise=key))
    tol = _tol(params, lambda p: hift_inference(p, mel, cfg=cfg.hift, noise=key))
    frames = mel.shape[1]
    pieces, emitted = [], 0
    for end in (5, frames // 2, frames - 3):
        new, emitted = hift_stream_step(params, mel[:, :end], emitted, cfg=cfg.hift, finalize=False, noise=key)
        assert new.shape[1] == output_samples(end, cfg.hift, False) - sum(p.shape[1] for p in pieces)
        pieces.append(np.asarray(new))
    new, emitted = hift_stream_step(params, mel, emitted, cfg=cfg.hift, finalize=True, noise=key)
    pieces.append(np.asarray(new))
    streamed = np.concatenate(pieces, axis=1)
    assert emitted == streamed.shape[1] == offline.shape[1]
    np.testing.assert_allclose(streamed, offline, atol=tol, rtol=0)


# ---------------------------------------------------------------- shapes, compiles
def test_output_lengths_follow_config():
    cfg = load_model_config(HIFT_CASES[0] + "/model").hift
    scale = cfg.upsample_scale
    assert output_samples(20, cfg, True) == scale * 20
    assert output_samples(20, cfg, False) == scale * (20 - 3 - cfg.conv_pre_look_right - 1)
    wider = dataclasses.replace(cfg, conv_pre_look_right=2, upsample_rates=(4, 5, 3))
    assert output_samples(20, wider, False) == wider.upsample_scale * (20 - 3 - 2 - 1)


def _small_config(base):
    """One upsample stage, one resblock kernel: compiles in a fraction of the tiny-a graph's time."""
    return dataclasses.replace(base, base_channels=8, upsample_rates=(4,), upsample_kernel_sizes=(8,),
                               resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3),),
                               source_resblock_kernel_sizes=(3,), source_resblock_dilation_sizes=((1,),),
                               f0_cond_channels=8)


def _random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.1).astype(np.float32), param_shapes(cfg))


def test_lengths_in_one_bucket_compile_once():
    cfg = _small_config(load_model_config(HIFT_CASES[0] + "/model").hift)
    params = _random_params(cfg)
    mel = np.random.default_rng(1).standard_normal((1, 3 * mel_bucket(33), cfg.in_channels)).astype(np.float32)
    before = generator._hift_core._cache_size()
    lengths = [t for t in (33, 40, 50, 64) if mel_bucket(t) == mel_bucket(33)]
    assert len(lengths) >= 3
    for t in lengths:
        audio = hift_inference(params, mel[:, :t], cfg=cfg, noise=0)
        assert audio.shape == (1, output_samples(t, cfg, True))
        assert np.isfinite(np.asarray(audio)).all()
    assert generator._hift_core._cache_size() - before == 1
    hift_inference(params, mel[:, :mel_bucket(33) + 1], cfg=cfg, noise=0)
    assert generator._hift_core._cache_size() - before == 2


# ---------------------------------------------------------------- pieces against torch
def test_stft_matches_torch_with_valid_end_inside_buffer():
    n_fft, hop = 16, 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 480)).astype(np.float32)
    valid = np.array([480, 301], np.int32)
    ours = np.asarray(stft(x, valid, n_fft=n_fft, hop=hop))
    window = torch.from_numpy(hann_window(n_fft))
    for b in range(2):
        spec = torch.stft(torch.from_numpy(x[b, :valid[b]]), n_fft, hop, n_fft, window=window, return_complex=True)
        want = torch.cat([spec.real, spec.imag], dim=0).T.numpy()  # [F, 2K]
        np.testing.assert_allclose(ours[b, :want.shape[0]], want, atol=1e-5, rtol=0)


def test_istft_matches_torch_with_valid_frames():
    n_fft, hop = 16, 4
    rng = np.random.default_rng(1)
    mag = np.exp(rng.standard_normal((2, 41, 9))).astype(np.float32)
    phase = rng.uniform(-1, 1, (2, 41, 9)).astype(np.float32)
    valid = np.array([41, 30], np.int32)
    ours = np.asarray(istft(mag, phase, valid, n_fft=n_fft, hop=hop))
    window = torch.from_numpy(hann_window(n_fft))
    for b in range(2):
        m, p = torch.from_numpy(mag[b, :valid[b]].T), torch.from_numpy(phase[b, :valid[b]].T)
        want = torch.istft(torch.complex(m * torch.cos(p), m * torch.sin(p)), n_fft, hop, n_fft, window=window).numpy()
        np.testing.assert_allclose(ours[b, :want.shape[0]], want, atol=2e-5, rtol=0)
        assert not ours[b, want.shape[0]:].any()


def test_make_noise_is_position_consistent():
    cfg = load_model_config(HIFT_CASES[0] + "/model").hift
    key = jax.random.PRNGKey(3)
    short, long = make_noise(key, 5000, cfg), make_noise(key, 13000, cfg)
    assert short.uniform.shape == (5000, cfg.nb_harmonics + 1)
    np.testing.assert_array_equal(np.asarray(short.uniform), np.asarray(long.uniform)[:5000])
    np.testing.assert_array_equal(np.asarray(short.rand_ini), np.asarray(long.rand_ini))
    u = np.asarray(long.uniform)
    assert u.min() >= 0.0 and u.max() < 1.0 and float(np.asarray(short.rand_ini)[0]) == 0.0
    assert not np.array_equal(np.asarray(make_noise(jax.random.PRNGKey(4), 5000, cfg).uniform), u[:5000])


# ---------------------------------------------------------------- converter
def _same_tree(a, b):
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_convert_legacy_weight_norm_and_generator_prefix():
    _, cfg, params, sd = _converted(HIFT_CASES[0])
    legacy = {k.replace(".parametrizations.weight.original0", ".weight_g")
               .replace(".parametrizations.weight.original1", ".weight_v"): v for k, v in sd.items()}
    assert any(k.endswith(".weight_g") for k in legacy) and not any("parametrizations" in k for k in legacy)
    _same_tree(convert(legacy, cfg.hift, "legacy"), params)
    prefixed = {f"generator.{k}": v for k, v in sd.items()}
    _same_tree(convert(prefixed, cfg.hift, "prefixed"), params)


def test_convert_reports_missing_and_unexpected_keys():
    _, cfg, _, sd = _converted(HIFT_CASES[0])
    broken = dict(sd)
    del broken["conv_pre.bias"]
    broken["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"missing keys: conv_pre.bias.*unexpected keys: extra.weight"):
        convert(broken, cfg.hift, "broken")


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_full_size_keys_and_shapes(full_size_manifest, full_size_model_dir):
    cfg = load_model_config(full_size_model_dir).hift
    assert cfg.base_channels == 512 and cfg.upsample_scale == 480
    sd = shape_only_state_dict(full_size_manifest["files"]["hift.pt"]["keys"])
    params = convert(sd, cfg, "hift.pt (full-size manifest)")
    want = jax.tree.map(lambda s: tuple(s.shape), param_shapes(cfg))
    assert jax.tree.map(lambda a: tuple(a.shape), params) == want


# ---------------------------------------------------------------- bad inputs
@pytest.fixture
def no_device(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("device function called for a bad input")
    monkeypatch.setattr(generator, "_hift_core", refuse)


@pytest.mark.parametrize("mel,finalize,match", [
    (np.zeros((1, 80, 20), np.float32), True, "looks channel-major"),
    (np.zeros((1, 20, 81), np.float32), True, "expected 80 channels"),
    (np.zeros((20, 80), np.float32), True, "expected \\[batch, frames, 80\\]"),
    (np.zeros((1, 0, 80), np.float32), True, "needs at least 1 frame"),
    (np.zeros((1, 8, 80), np.float32), False, "needs at least 9 frame"),
    (np.full((1, 20, 80), np.nan, np.float32), True, "NaN or inf"),
    (np.full((1, 20, 80), np.inf, np.float32), False, "NaN or inf"),
    (np.zeros((0, 20, 80), np.float32), True, "empty batch"),
])
def test_bad_mel_raises_before_device(no_device, mel, finalize, match):
    cfg = load_model_config(HIFT_CASES[0] + "/model").hift
    with pytest.raises(ValueError, match=match):
        hift_inference({}, mel, cfg=cfg, finalize=finalize)


def test_bad_noise_raises_before_device(no_device):
    cfg = load_model_config(HIFT_CASES[0] + "/model").hift
    mel = np.zeros((1, 10, cfg.in_channels), np.float32)
    with pytest.raises(ValueError, match="needs 4800"):
        hift_inference({}, mel, cfg=cfg, noise=HiftNoise(np.zeros((1, 9)), np.zeros((1, 100, 9))))
    with pytest.raises(ValueError, match="expected 9 values"):
        hift_inference({}, mel, cfg=cfg, noise=HiftNoise(np.zeros((1, 5)), np.zeros((1, 4800, 9))))
    with pytest.raises(ValueError, match="mel_len"):
        hift_inference({}, mel, cfg=cfg, mel_len=np.array([11]))
    with pytest.raises(ValueError, match="noise: expected None"):
        hift_inference({}, mel, cfg=cfg, noise="seed")


# ---------------------------------------------------------------- precision policy
def _programs_text(cfg, params, policy):
    """HLO text of the offline core and of a stream push under ``policy`` (what ``hift_numerics`` gives)."""
    from cosyjax.hift import stream

    precision, use64 = generator.hift_numerics(policy)
    mel = np.zeros((1, 32, cfg.in_channels), np.float32)
    noise = make_noise(jax.random.PRNGKey(0), 32 * cfg.upsample_scale, cfg)
    offline = generator._hift_core.lower(params, mel, np.array([32], np.int32), noise, cfg=cfg, finalize=True,
                                         precision=precision, f0_float64=use64, intermediates=False).as_text()
    state = stream.hift_stream_init(cfg, 1)
    push = stream._stream_core.lower(params, state, np.zeros((1, 16, cfg.in_channels), np.float32),
                                     np.array([16], np.int32), np.array([False]), cfg=cfg, precision=precision,
                                     f0_float64=use64).as_text()
    return offline, push


def test_policy_decides_float64_and_bf16_convs():
    """One place decides the vocoder's numerics: the float32 policy on CPU holds float64 (the f0 net, NSF
    division and phase cumsum, as upstream), on GPU/TPU and for bf16 none; bf16 runs bf16 convolutions."""
    from cosyjax.precision import PrecisionPolicy

    cfg = _small_config(load_model_config(HIFT_CASES[0] + "/model").hift)
    params = _random_params(cfg)
    assert PrecisionPolicy.resolve("float32", "cpu").f0_float64
    for backend in ("gpu", "tpu"):
        assert not PrecisionPolicy.resolve("float32", backend).f0_float64
        assert not PrecisionPolicy.resolve("bfloat16", backend).f0_float64
    for text in _programs_text(cfg, params, PrecisionPolicy.resolve("float32", "cpu")):
        assert "f64" in text and "bf16" not in text
    for text in _programs_text(cfg, params, PrecisionPolicy.resolve("float32", "gpu")):
        assert "f64" not in text and "bf16" not in text
    for text in _programs_text(cfg, params, PrecisionPolicy.resolve("bfloat16", "cpu")):
        assert "f64" not in text
        convs = [line for line in text.splitlines() if "stablehlo.convolution" in line]
        assert convs and all("bf16" in line for line in convs), "every conv of the stacks runs in bf16"


# Measured 2026-12-04 (hift group; conv_post / audio SNR): tiny-a 36.7 / 34.6 dB, tiny-b 32.1 / 29.2 dB, tiny-train
# 23.2 / 22.6 dB; tiny-dpo 20.5 / 17.5 dB misses the audio target (its hift_partial group passes): its random vocoder
# is that sensitive to any bf16 rounding (bf16 weights with float32 compute alone: audio 19.1 dB). A known gap,
# recorded in parity/TOLERANCES.md with where it is amplified, not hidden by a bound.
BF16_GAP = {"tiny-dpo"}
BF16_CASES = [pytest.param(d, marks=pytest.mark.xfail(strict=True, reason="known bf16 gap (parity/TOLERANCES.md)"))
              if os.path.basename(d) in BF16_GAP else d for d in HIFT_CASES]


@pytest.mark.parametrize("case_dir", BF16_CASES, ids=[os.path.basename(d) for d in HIFT_CASES])
def test_bf16_policy_meets_the_bf16_targets(case_dir):
    """bf16 compute (bf16 weights and conv stacks; float32 f0 net, NSF and iSTFT, no float64) on the case's
    reference mel, against upstream's float32 audio: the issue's targets (parity/bf16.py)."""
    from cosyjax.checkpoint import cast_params
    from cosyjax.parity import bf16

    case, cfg, params, _ = _converted(case_dir)
    model = ConvertedModel(config=cfg, params={"hift": cast_params(params, "bfloat16", ("hift",))}, buffers={},
                           dtype="bfloat16")
    for group in GROUPS:
        if f"{group}/audio" not in case.arrays:
            continue
        result = RUNNERS[group](case, group, model)
        snr = {c.key.split("/", 1)[1]: c.snr_db for c in result.comparisons}
        failed = [format_comparison(c) for c in result.comparisons if not c.passed]
        assert not failed, "\n".join(failed)
        assert min(snr["audio"], snr["conv_post"]) >= bf16.AUDIO_SNR_DB and min(snr["f0"], snr["source"]) >= bf16.SNR_DB


def test_bf16_stream_equals_bf16_offline():
    """The carried-state stream and the offline call share the layout and the NSF source under the bf16
    policy too: same lengths, and the same audio up to bf16 rounding.

    The two differ by more than float32 noise: XLA's float32 accumulation order in a bf16 conv depends
    on the buffer length (at float32 HIGHEST the offline output is bit-identical across mel buckets),
    and a changed float32 sum can round to a neighbouring bf16 operand for the next layer, which the
    random net then amplifies like any bf16 rounding.  So the bound is the bf16 audio target against
    each other and against float32 (the exact float32 equality is tests/test_hift_stream.py's)."""
    from cosyjax.hift.stream import hift_stream_init, hift_stream_push
    from cosyjax.parity import bf16
    from cosyjax.parity.compare import snr_db

    case, cfg, params, _ = _converted(HIFT_CASES[0])
    _, mel, _ = _case_inputs(case, "hift")
    key = jax.random.PRNGKey(3)
    offline = np.asarray(hift_inference(params, mel, cfg=cfg.hift, noise=key, policy="bfloat16"), np.float64)
    f32 = np.asarray(hift_inference(params, mel, cfg=cfg.hift, noise=key, policy="float32"), np.float64)
    state, pieces = hift_stream_init(cfg.hift, 1, noise=key), []
    half = mel.shape[1] // 2
    for chunk, fin in ((mel[:, :half], False), (mel[:, half:], True)):
        state, audio = hift_stream_push(params, state, chunk, cfg=cfg.hift, finalize=fin, policy="bfloat16")
        pieces.append(np.asarray(audio, np.float64))
    streamed = np.concatenate(pieces, axis=1)
    assert streamed.shape == offline.shape
    assert min(snr_db(streamed, offline), snr_db(streamed, f32), snr_db(offline, f32)) >= bf16.AUDIO_SNR_DB, \
        (snr_db(streamed, offline), snr_db(streamed, f32), snr_db(offline, f32))
    assert snr_db(streamed, f32) < 60  # the stream did run the bf16 policy (float32 would be ~100 dB)
