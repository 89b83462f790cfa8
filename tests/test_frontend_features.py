"""Frontend audio loading, resampling and feature extractors against their references.

References, per function (max errors reached are in the test names' tolerances):

* ``resample``: the sinc interpolation sum evaluated directly from its definition (float64), published
  filter properties (identity, length rule, DC gain, passband, stopband), scipy ``resample_poly``
  (loosely), and ``tests/data/frontend/frontend_reference.npz``.
* ``whisper_log_mel``: openai-whisper ``log_mel_spectrogram`` (live if installed, and stored), a torch
  reference written here from SPEC §2.2, librosa / whisper ``mel_filters.npz`` for the filterbank.
* ``kaldi_fbank``: torchaudio's fbank (stored), kaldi-native-fbank (live, if installed).
* ``prompt_mel``: a torch reference written here from SPEC §2.4 + ``librosa.filters.mel``, and
  matcha's ``mel_spectrogram`` (stored).

``frontend_reference.npz`` was generated once, with torch 2.13 CPU and one thread, by executing the
reference implementations themselves on the synthetic signals stored next to their outputs:
torchaudio 2.3.1's ``functional._get_sinc_resample_kernel`` / ``_apply_sinc_resample_kernel`` and
``compliance/kaldi.py`` (pure-torch source from the wheel; torchaudio itself cannot be imported here),
matcha-tts 0.0.7.2 ``utils/audio.py::mel_spectrogram`` and openai-whisper 20250625. Torch's float32
FFT and log put up to ~1e-4 of noise on low-energy Kaldi log bins, and its bits depend on the
machine's FFT: the fbank checks compare each side with the float64 definition, torchaudio's within a
worst-case float32 error bound (``fbank_error_bound``), so they hold on any machine.
"""

from __future__ import annotations

import hashlib
import io
import math
import os

import numpy as np
import pytest
import soundfile

from cosyjax.config import MelConfig
from cosyjax.frontend import (
    AudioError, kaldi_fbank, kaldi_mel_banks, load_audio, prompt_mel, read_audio, resample,
    sinc_resample_kernel, slaney_mel_filterbank, spk_fbank, whisper_log_mel,
)

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "frontend", "frontend_reference.npz")
RELEASE_MEL = MelConfig(n_fft=1920, num_mels=80, sampling_rate=24000, hop_size=480, win_size=1920,
                        fmin=0.0, fmax=None, center=False)


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as z:
        return {k: z[k] for k in z.files}


def assert_close(name: str, actual: np.ndarray, expected: np.ndarray, atol: float) -> None:
    """Max-abs check that prints the index and both values on failure."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    idx = np.unravel_index(int(np.argmax(err)), err.shape) if err.size else ()
    assert err.size == 0 or err.max() <= atol, (
        f"{name}: max abs err {err.max():.3g} > {atol:g} at {idx}: ours {actual[idx]!r}, ref {expected[idx]!r}")


def speech_like(sr: int, seconds: float, seed: int) -> np.ndarray:
    """A gliding 29-harmonic buzz with a syllable-rate envelope over a -40 dB noise floor, float32 [T]."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(sr * seconds)) / sr
    f0 = 120 * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 30)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t)) ** 2
    return (0.2 * voiced + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


# ----------------------------------------------------------------------------------------- resample

def test_resample_identity_when_rates_equal():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert np.array_equal(resample(x, 24000, 24000), x)
    assert resample(x.astype(np.float64), 16000, 16000).dtype == np.float32


@pytest.mark.parametrize("orig,new", [(44100, 16000), (48000, 24000), (22050, 24000), (16000, 24000),
                                      (8000, 16000), (96000, 16000)])
@pytest.mark.parametrize("length", [1, 2, 146, 147, 148, 441, 1000, 4801])
def test_resample_length_rule(orig, new, length):
    y = resample(np.ones(length, np.float32), orig, new)
    assert y.shape == (math.ceil(new * length / orig),) and y.dtype == np.float32


def direct_sinc_resample(x: np.ndarray, orig: int, new: int, width: int = 6, rolloff: float = 0.99):
    """y[m] = sum_i x[i] (base/L) sinc(u) cos^2(pi u / 2W), u = base (i/L - m/M), |u| < W; float64."""
    g = math.gcd(orig, new)
    L, M = orig // g, new // g
    base = min(L, M) * rolloff
    i = np.arange(x.size)
    y = np.empty(math.ceil(M * x.size / L))
    for m in range(y.size):
        u = base * (i / L - m / M)
        keep = np.abs(u) < width
        h = (base / L) * np.sinc(u[keep]) * np.cos(np.pi * u[keep] / (2 * width)) ** 2
        y[m] = h @ x[keep]
    return y


@pytest.mark.parametrize("orig,new", [(44100, 16000), (48000, 24000), (22050, 24000), (16000, 24000)])
def test_resample_matches_direct_sinc_sum(orig, new):
    x = np.random.default_rng(1).standard_normal(700).astype(np.float32)
    # torchaudio (and so resample) rounds the phase offsets j/M to float32, which moves each tap by
    # up to ~base * 3e-8; on unit-variance noise that reaches 7e-6 at 44.1k -> 16k.
    assert_close(f"resample {orig}->{new} vs direct sum", resample(x, orig, new),
                 direct_sinc_resample(x.astype(np.float64), orig, new), 2e-5)


@pytest.mark.parametrize("orig,new", [(44100, 16000), (48000, 24000), (22050, 24000), (16000, 24000),
                                      (96000, 16000), (44100, 24000)])
def test_resample_matches_torchaudio(reference, orig, new):
    key = f"resample_{orig}_{new}"
    kernel, width = sinc_resample_kernel(orig, new)
    assert width == int(reference[f"{key}/width"])
    assert kernel.shape == tuple(reference[f"{key}/kernel_shape"])
    # The kernel is bit-identical to torchaudio's float32 kernel.
    assert hashlib.sha256(kernel.tobytes()).hexdigest() == str(reference[f"{key}/kernel_sha256"])
    assert_close(f"resample {orig}->{new} vs torchaudio", resample(reference[f"{key}/x"], orig, new),
                 reference[f"{key}/y"], 1e-6)


@pytest.mark.parametrize("orig,new", [(44100, 16000), (48000, 24000), (16000, 24000)])
def test_resample_kernel_dc_gain(orig, new):
    kernel, _ = sinc_resample_kernel(orig, new)
    assert np.all(np.abs(kernel.astype(np.float64).sum(axis=1) - 1.0) < 1e-3)


@pytest.mark.parametrize("orig,new", [(44100, 16000), (48000, 24000), (16000, 24000)])
def test_resample_passband_and_stopband(orig, new):
    t = np.arange(orig) / orig  # 1 s
    inner = slice(new // 10, -new // 10)  # away from the zero-padded edges
    nyquist = min(orig, new) / 2
    for f in (100.0, 1000.0, 0.375 * nyquist):
        y = resample(np.sin(2 * np.pi * f * t).astype(np.float32), orig, new)
        ideal = np.sin(2 * np.pi * f * np.arange(y.size) / new)
        assert_close(f"{orig}->{new} sine {f} Hz", y[inner], ideal[inner], 2e-3)
    if new < orig:  # aliasing suppression: -28 dB at 1.2x and -55 dB at 1.5x the new Nyquist
        for ratio, max_db in ((1.2, -25.0), (1.5, -50.0)):
            y = resample(np.sin(2 * np.pi * ratio * nyquist * t).astype(np.float32), orig, new)
            level = 20 * np.log10(np.sqrt(2) * y[inner].std())
            assert level < max_db, f"{orig}->{new}: {ratio}x Nyquist leaks at {level:.1f} dB"


def test_resample_close_to_scipy_resample_poly():
    from scipy import signal

    orig, new = 44100, 16000
    noise = np.random.default_rng(2).standard_normal(orig)
    band = signal.sosfiltfilt(signal.butter(8, 5000, fs=orig, output="sos"), noise).astype(np.float32)
    ours = resample(band, orig, new)
    theirs = signal.resample_poly(band, 160, 441)
    inner = slice(1000, -1000)
    rel = np.sqrt(np.mean((ours[inner] - theirs[inner]) ** 2) / np.mean(theirs[inner] ** 2))
    assert rel < 1e-2, f"resample vs resample_poly: relative rms difference {rel:.3g}"


def test_resample_batch_and_errors():
    x = np.random.default_rng(3).standard_normal((2, 3, 900)).astype(np.float32)
    y = resample(x, 48000, 16000)
    assert y.shape == (2, 3, 300)
    assert np.array_equal(y[1, 2], resample(x[1, 2], 48000, 16000))
    with pytest.raises(ValueError, match="kernel"):
        resample(np.zeros(10, np.float32), 16001, 16000)
    with pytest.raises(ValueError, match="positive"):
        resample(np.zeros(10, np.float32), 0, 16000)
    with pytest.raises(TypeError):
        resample(np.zeros(10, np.int16), 48000, 16000)


# --------------------------------------------------------------------------------------- load_audio

def write(path, data, sr, **kwargs) -> str:
    soundfile.write(path, data, sr, **kwargs)
    return str(path)


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("WAV", "FLOAT")])
def test_load_audio_stereo_mixdown_and_resample(tmp_path, fmt, subtype):
    left = speech_like(44100, 0.5, 0)
    right = speech_like(44100, 0.5, 1)
    path = write(tmp_path / f"a.{fmt.lower()}", np.stack([left, right], 1), 44100, format=fmt, subtype=subtype)
    stereo, sr = soundfile.read(path, dtype="float32", always_2d=True)
    mono, sr_read = read_audio(path)
    assert sr == sr_read == 44100
    assert np.array_equal(mono, stereo.mean(axis=1, dtype=np.float32))
    for target in (16000, 24000):
        y = load_audio(path, target)
        assert y.dtype == np.float32 and y.shape == (math.ceil(target * left.size / 44100),)
        assert np.array_equal(y, resample(mono, 44100, target))


def test_load_audio_ogg_bytes_and_file_object(tmp_path):
    x = speech_like(24000, 0.5, 2)
    path = write(tmp_path / "a.ogg", x, 24000, format="OGG", subtype="VORBIS")
    y = load_audio(path, 24000)
    assert y.shape == x.shape and np.all(np.isfinite(y))
    with open(path, "rb") as f:
        data = f.read()
    assert np.array_equal(load_audio(data, 24000), y)
    assert np.array_equal(load_audio(io.BytesIO(data), 24000), y)


def test_load_audio_pcm16_is_exact(tmp_path):
    pcm = (np.random.default_rng(4).integers(-20000, 20000, 8000)).astype(np.int16)
    path = write(tmp_path / "a.wav", pcm, 16000, subtype="PCM_16")
    assert np.array_equal(load_audio(path, 16000), pcm.astype(np.float32) / 32768)


@pytest.mark.parametrize("case,pattern", [
    ("missing", "no such audio file"),
    ("corrupt", "cannot decode"),
    ("text", "cannot decode"),
    ("empty", "no audio samples"),
    ("silent", "silent"),
    ("short", "shorter than"),
    ("long", "longer than"),
    ("nan", "NaN or infinite"),
    ("low_rate", "below the minimum 16000"),
])
def test_load_audio_errors(tmp_path, case, pattern):
    path = str(tmp_path / f"{case}.wav")
    if case == "corrupt":
        with open(path, "wb") as f:
            f.write(b"RIFF\x24\x00\x00\x00WAVEfmt " + np.random.default_rng(0).bytes(64))
    elif case == "text":
        with open(path, "w") as f:
            f.write("not audio at all\n" * 10)
    elif case == "empty":
        write(path, np.zeros((0,), np.float32), 16000)
    elif case == "silent":
        write(path, np.full(16000, 5e-5, np.float32), 16000, subtype="FLOAT")
    elif case == "short":
        write(path, speech_like(16000, 0.05, 0), 16000)
    elif case == "long":
        write(path, speech_like(16000, 30.5, 0), 16000)
    elif case == "nan":
        x = speech_like(16000, 0.5, 0)
        x[100] = np.nan
        write(path, x, 16000, subtype="FLOAT")
    elif case == "low_rate":
        write(path, speech_like(8000, 0.5, 0), 8000)
    with pytest.raises(AudioError, match=pattern) as info:
        load_audio(path, 16000)
    assert isinstance(info.value, ValueError) and path in str(info.value)


def test_load_audio_limits_are_arguments(tmp_path):
    path = write(tmp_path / "a.wav", speech_like(16000, 0.05, 0), 16000)
    assert load_audio(path, 16000, min_seconds=0.0).shape == (800,)
    path = write(tmp_path / "b.wav", speech_like(8000, 0.5, 0), 8000)
    assert load_audio(path, 8000).shape == (4000,)  # no resampling, so no rate floor
    assert load_audio(path, 16000, min_sr=8000).shape == (8000,)


# ---------------------------------------------------------------------------------- mel filterbanks

@pytest.mark.parametrize("sr,n_fft,n_mels,fmax", [(16000, 400, 128, None), (24000, 1920, 80, None),
                                                  (22050, 1024, 80, 8000.0), (16000, 400, 80, None),
                                                  (24000, 1920, 80, 12000.0), (22050, 1024, 80, None)])
def test_slaney_filterbank_matches_librosa(sr, n_fft, n_mels, fmax):
    librosa = pytest.importorskip("librosa")
    expected = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=fmax)
    # bit for bit, as cosyjax/frontend/features.py claims (float64 ramps, float32 accumulation as librosa's)
    np.testing.assert_array_equal(slaney_mel_filterbank(sr, n_fft, n_mels, 0.0, fmax), expected)


def test_whisper_filterbank_matches_mel_filters_npz():
    whisper_audio = pytest.importorskip("whisper.audio")
    path = os.path.join(os.path.dirname(whisper_audio.__file__), "assets", "mel_filters.npz")
    with np.load(path) as z:
        assert_close("mel_128", slaney_mel_filterbank(16000, 400, 128), z["mel_128"], 1e-8)


def test_kaldi_mel_banks_match_torchaudio(reference):
    banks = kaldi_mel_banks(80, 512, 16000.0)
    assert banks.shape == (80, 257) and np.all(banks[:, -1] == 0)
    # bit for bit, torch's float32 log ulps included (features.TORCH_LOG_ULPS_512_16K)
    np.testing.assert_array_equal(banks[:, :-1], reference["fbank/banks"])


# ------------------------------------------------------------------------------------- whisper mel

def torch_whisper_log_mel(x: np.ndarray) -> np.ndarray:
    """SPEC §2.2 in torch: center/reflect STFT, |X|^2 minus the last frame, mel_128, log10, max-8."""
    torch = pytest.importorskip("torch")
    librosa = pytest.importorskip("librosa")
    stft = torch.stft(torch.from_numpy(x), 400, 160, window=torch.hann_window(400), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = torch.from_numpy(librosa.filters.mel(sr=16000, n_fft=400, n_mels=128)) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    return ((torch.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0).numpy()


def test_whisper_log_mel_matches_stored_whisper(reference):
    assert_close("whisper_log_mel vs whisper (stored)", whisper_log_mel(reference["speech16k"]),
                 reference["whisper/log_mel"], 1e-4)


@pytest.mark.parametrize("seed,seconds", [(0, 2.0), (1, 3.37)])
def test_whisper_log_mel_matches_whisper_package(seed, seconds):
    torch = pytest.importorskip("torch")
    whisper = pytest.importorskip("whisper")
    x = speech_like(16000, seconds, seed)
    expected = whisper.log_mel_spectrogram(torch.from_numpy(x), n_mels=128).numpy()
    assert_close("whisper_log_mel vs whisper", whisper_log_mel(x), expected, 1e-4)


@pytest.mark.parametrize("length", [201, 1600, 16159, 16160, 16161, 48000])
def test_whisper_log_mel_shape_and_floor(length):
    x = speech_like(16000, length / 16000 + 1e-9, length)[:length]
    out = whisper_log_mel(x)
    assert out.shape == (128, length // 160) and out.dtype == np.float32
    assert out.min() >= out.max() - 2.0 - 1e-6  # the global max - 8 floor in log10 units, / 4
    if length >= 16000:
        assert_close(f"whisper_log_mel vs torch ({length})", out, torch_whisper_log_mel(x), 1e-4)


# ------------------------------------------------------------------------------------- kaldi fbank

F32_EPS, F64_EPS = 2.0 ** -24, 2.0 ** -53  # unit roundoffs


def test_kaldi_fbank_matches_torchaudio(reference):
    """Ours is the float64 definition rounded once to float32; torchaudio's stored output is the same
    definition within its float32 error (``fbank_error_bound``), so ours matches torchaudio to that
    error, on any machine (both sides of each check are computed in float64 or stored)."""
    x = reference["speech16k"]
    banks = reference["fbank/banks"]
    exact = fbank_definition_f64(x, banks)
    feats = kaldi_fbank(x)
    assert feats.shape == (1 + (x.size - 400) // 160, 80) and feats.dtype == np.float32
    float64_error = fbank_error_bound(x, banks, F64_EPS)  # of ours' and the definition's float64 arithmetic
    assert_within("kaldi_fbank vs float64 definition", feats, exact, final_rounding(exact) + 2 * float64_error)
    assert_within("torchaudio (stored) vs float64 definition", reference["fbank/feats"], exact,
                  fbank_error_bound(x, banks, F32_EPS) + float64_error)
    # spk_fbank subtracts the float64 mean of the float32 feats: each feat's final rounding, the
    # mean's (at most the largest in its column) and the result's own.
    centered = exact - exact.mean(axis=0)
    spk_bound = (final_rounding(exact) + final_rounding(exact).max(axis=0) + final_rounding(centered)
                 + 4 * float64_error.max(axis=0))
    assert_within("spk_fbank vs centered definition", spk_fbank(x), centered, spk_bound)


def final_rounding(exact: np.ndarray) -> np.ndarray:
    """One float32 ulp at each value: bounds the rounding of a float64 result near ``exact``."""
    return np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)


def assert_within(name: str, actual: np.ndarray, expected: np.ndarray, bound: np.ndarray) -> None:
    """Per-element |actual - expected| <= bound; prints the worst element (relative to its bound)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    idx = np.unravel_index(int(np.argmax(err / bound)), err.shape)
    assert np.all(err <= bound), (f"{name}: err {err[idx]:.3g} > bound {bound[idx]:.3g} at {idx}: "
                                  f"ours {actual[idx]!r}, ref {expected[idx]!r}")


def _fbank_frames(x: np.ndarray, preemph: float = 0.97, window_power: float = 0.85):
    """Kaldi's framing in float64: (raw frames, DC-removed, pre-emphasised, Povey window, hann)."""
    window, shift = 400, 160
    count = 1 + (x.size - window) // shift
    raw = np.stack([x[i * shift:i * shift + window] for i in range(count)]).astype(np.float64)
    centered = raw - raw.mean(axis=1, keepdims=True)
    emphasised = centered - preemph * np.concatenate([centered[:, :1], centered[:, :-1]], axis=1)
    hann = 0.5 - 0.5 * np.cos(2 * math.pi * np.arange(window) / (window - 1))
    return raw, centered, emphasised, hann ** window_power, hann


def fbank_definition_f64(x: np.ndarray, banks: np.ndarray, preemph: float = 0.97,
                         window_power: float = 0.85) -> np.ndarray:
    """``torchaudio.compliance.kaldi.fbank(dither=0)`` evaluated in float64 with an explicit DFT.

    ``preemph`` and ``window_power`` exist to check that the error bound tells the definition from
    a near miss (test_fbank_error_bound_separates_near_misses)."""
    _, _, emphasised, povey, _ = _fbank_frames(x, preemph, window_power)
    frames = emphasised * povey
    n = np.arange(frames.shape[1])
    angle = 2 * math.pi * np.outer(n, np.arange(256)) / 512  # the Nyquist bin has no weight
    power = (frames @ np.cos(angle)) ** 2 + (frames @ np.sin(angle)) ** 2
    return np.log(np.maximum(power @ banks.astype(np.float64).T, np.finfo(np.float32).eps))


def fbank_error_bound(x: np.ndarray, banks: np.ndarray, u: float) -> np.ndarray:
    """Per-element bound [T, 80] on |fbank computed in arithmetic of unit roundoff u - definition|.

    A worst-case (not statistical) model of torchaudio's ops, so it holds for any summation order or
    FFT algorithm of the Cooley-Tukey family, i.e. on any machine.  gamma(n) = n u / (1 - n u).
    Per frame, on the exact values (float64) of the frame's raw samples r, DC-removed d, pre-emphasised
    y, Povey window w = h^0.85 and windowed x = y w:

    * the mean is one constant off by |c| <= gamma(400) mean|r|; pre-emphasis turns a constant into
      0.03 of it; rounding of d (u |d|), of 0.97 d_prev and y (4 u (|d| + |d_prev|) + u |y|);
    * the window's float32 h is 2u off at most (a 1-ulp cos of a value <= 1, halved, then
      subtracted), so w = h^0.85 is 0.85 h^-0.15 2u + u w off; the product rounds (u |x|);
    * a DFT bin takes every input error with weight 1, sum_j |dx_j|, and the FFT's own error is at
      most L eta / (1 - L eta) ||X||_2 (Higham, Accuracy and Stability, Thm 24.2: eta = u +
      gamma(4) (sqrt 2 + u), L = log2(512) + 1 stages counting the real-input split) with
      ||X||_2 = sqrt(512) ||x||_2 (Parseval): delta per bin;
    * power |X|^2: 2 |X| delta + delta^2 + 4 u |X|^2 (abs and square); the 257-term mel sum of
      positive terms adds gamma(257) E; so r = dE / E, and log(E) moves by at most -log(1 - r),
      plus the log's own 1 ulp (2 u |log E|).
    Elements with r >= 1 would carry no information; the signals here have none (asserted).
    """
    raw, centered, emphasised, povey, hann = _fbank_frames(x)
    previous = np.concatenate([centered[:, :1], centered[:, :-1]], axis=1)
    windowed = emphasised * povey

    def gamma(n: int) -> float:
        return n * u / (1 - n * u)

    mean_err = gamma(raw.shape[1]) * np.abs(raw).mean(axis=1, keepdims=True)
    d_emph = 0.03 * mean_err + 4 * u * (np.abs(centered) + np.abs(previous)) + u * np.abs(emphasised)
    d_window = np.where(hann > 0, 0.85 * np.where(hann > 0, hann, 1.0) ** -0.15 * 2 * u, 0.0) + u * povey
    d_x = d_emph * povey + np.abs(emphasised) * d_window + u * np.abs(windowed)
    stages = math.log2(512) + 1
    eta = u + gamma(4) * (math.sqrt(2) + u)
    fft_err = stages * eta / (1 - stages * eta) * math.sqrt(512) * np.linalg.norm(windowed, axis=1)
    delta = (d_x.sum(axis=1) + fft_err)[:, None]  # [T, 1], per bin
    spectrum = np.abs(np.fft.rfft(windowed, 512)[:, :256])
    banks64 = banks.astype(np.float64)
    energies = spectrum ** 2 @ banks64.T
    rel = ((2 * spectrum * delta + delta ** 2 + 4 * u * spectrum ** 2) @ banks64.T) / energies + gamma(257)
    assert np.all(rel < 1), f"{int(np.sum(rel >= 1))} fbank bins are below the resolution of u={u:g}"
    log_energy = np.log(np.maximum(energies, np.finfo(np.float32).eps))
    return -np.log1p(-rel) + 2 * u * np.abs(log_energy)


def torchaudio_fbank_ops(x: np.ndarray, banks: np.ndarray, dtype=None) -> np.ndarray:
    """torchaudio's kaldi.fbank(dither=0) as the torch ops it runs, in ``dtype`` (float32 default)."""
    torch = pytest.importorskip("torch")
    dtype = dtype or torch.float32
    t = torch.from_numpy(x.astype(np.float32)).to(dtype)
    frames = t.unfold(0, 400, 160)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * previous
    frames = frames * torch.hann_window(400, periodic=False, dtype=dtype).pow(0.85)
    power = torch.fft.rfft(torch.nn.functional.pad(frames, (0, 112))).abs().pow(2.0)
    mel = torch.nn.functional.pad(torch.from_numpy(banks).to(dtype), (0, 1))
    return torch.max(power @ mel.T, torch.tensor(np.finfo(np.float32).eps, dtype=dtype)).log().numpy()


def test_torchaudio_fbank_ops_are_the_definition(reference):
    """The torch ops above are ``fbank_definition_f64``: in float64 to float64 error, and in float32
    (torchaudio's own precision, on this machine's FFT) within the float32 bound.  With the stored
    torchaudio output also within that bound of the definition (test above), the ops stand in for
    torchaudio on the signals below."""
    torch = pytest.importorskip("torch")
    x, banks = reference["speech16k"], reference["fbank/banks"]
    exact = fbank_definition_f64(x, banks)
    float64_error = fbank_error_bound(x, banks, F64_EPS)
    assert_within("torch ops (float64) vs definition", torchaudio_fbank_ops(x, banks, torch.float64), exact,
                  2 * float64_error)
    assert_within("torch ops (float32) vs definition", torchaudio_fbank_ops(x, banks), exact,
                  fbank_error_bound(x, banks, F32_EPS) + float64_error)


@pytest.mark.parametrize("near_miss", [{"preemph": 0.96}, {"window_power": 1.0}, {"window_power": 0.8}])
def test_fbank_error_bound_separates_near_misses(reference, near_miss):
    """The float32 bound is loose (worst case), but not so loose that a wrong constant would pass."""
    x, banks = reference["speech16k"], reference["fbank/banks"]
    wrong = fbank_definition_f64(x, banks, **near_miss)
    bound = fbank_error_bound(x, banks, F32_EPS) + fbank_error_bound(x, banks, F64_EPS)
    assert np.mean(np.abs(reference["fbank/feats"] - wrong) > bound) > 0.5


@pytest.mark.parametrize("seed,seconds", [(0, 1.0), (1, 2.31), (2, 4.0)])
def test_kaldi_fbank_matches_torchaudio_ops_on_more_signals(reference, seed, seconds):
    """On more signals: ours is the definition rounded to float32, torchaudio's ops are the
    definition within their float32 error bound; ours matches torchaudio to that bound."""
    x = speech_like(16000, seconds, seed)
    banks = reference["fbank/banks"]
    exact = fbank_definition_f64(x, banks)
    float64_error = fbank_error_bound(x, banks, F64_EPS)
    assert_within("kaldi_fbank vs float64 definition", kaldi_fbank(x), exact, final_rounding(exact) + 2 * float64_error)
    assert_within("torchaudio ops (float32) vs float64 definition", torchaudio_fbank_ops(x, banks), exact,
                  fbank_error_bound(x, banks, F32_EPS) + float64_error)


@pytest.mark.parametrize("seed", [0, 1])
def test_kaldi_fbank_matches_kaldi_native_fbank(seed):
    knf = pytest.importorskip("kaldi_native_fbank")
    x = speech_like(16000, 2.5, seed)
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = 16000
    opts.mel_opts.num_bins = 80
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, x.tolist())
    fbank.input_finished()
    expected = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])
    feats = kaldi_fbank(x)
    # kaldi-native-fbank builds its own float32 mel banks (it is 3e-4 from torchaudio itself).
    assert_close("kaldi_fbank vs kaldi-native-fbank", feats, expected, 4e-4)
    assert np.quantile(np.abs(feats - expected), 0.999) < 1e-4


def test_spk_fbank_is_mean_normalised():
    x = speech_like(16000, 1.0, 5)
    feats = spk_fbank(x)
    assert feats.shape == (98, 80)
    assert np.abs(feats.mean(axis=0)).max() < 1e-5
    assert_close("spk_fbank", feats, kaldi_fbank(x) - kaldi_fbank(x).mean(axis=0), 1e-5)


def test_feature_input_errors():
    with pytest.raises(ValueError, match="at least 400"):
        kaldi_fbank(np.zeros(399, np.float32))
    with pytest.raises(ValueError, match="mono"):
        whisper_log_mel(np.zeros((2, 1600), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        prompt_mel(np.full(4800, np.nan, np.float32), RELEASE_MEL)
    with pytest.raises(ValueError, match="at least 721"):
        prompt_mel(np.zeros(720, np.float32), RELEASE_MEL)


# -------------------------------------------------------------------------------------- prompt mel

def torch_prompt_mel(x: np.ndarray, cfg: MelConfig) -> np.ndarray:
    """SPEC §2.4 in torch: reflect pad (n_fft-hop)/2, stft, sqrt(|X|^2 + 1e-9), librosa mel, log clamp."""
    torch = pytest.importorskip("torch")
    librosa = pytest.importorskip("librosa")
    side = (cfg.n_fft - cfg.hop_size) // 2
    y = torch.nn.functional.pad(torch.from_numpy(x)[None, None], (side, side), mode="reflect")[:, 0]
    spec = torch.stft(y, cfg.n_fft, hop_length=cfg.hop_size, win_length=cfg.win_size,
                      window=torch.hann_window(cfg.win_size), center=cfg.center, pad_mode="reflect",
                      normalized=False, onesided=True, return_complex=True)
    magnitude = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)
    basis = torch.from_numpy(librosa.filters.mel(sr=cfg.sampling_rate, n_fft=cfg.n_fft, n_mels=cfg.num_mels,
                                                 fmin=cfg.fmin, fmax=cfg.fmax))
    return torch.log(torch.clamp(basis @ magnitude, min=1e-5))[0].T.numpy()


def test_prompt_mel_matches_stored_matcha(reference):
    x = reference["speech24k"]
    out = prompt_mel(x, RELEASE_MEL)
    assert out.shape == (x.size // 480, 80) and out.dtype == np.float32
    assert_close("prompt_mel vs matcha (stored)", out, reference["matcha/mel"], 1e-4)


@pytest.mark.parametrize("seed,seconds", [(0, 2.0), (1, 3.01)])
def test_prompt_mel_matches_torch_reference(seed, seconds):
    x = speech_like(24000, seconds, seed)
    out = prompt_mel(x, RELEASE_MEL)
    assert out.shape == (x.size // 480, 80)
    assert_close("prompt_mel vs torch", out, torch_prompt_mel(x, RELEASE_MEL), 1e-4)


@pytest.mark.parametrize("cfg", [
    MelConfig(n_fft=1024, num_mels=80, sampling_rate=22050, hop_size=256, win_size=800, fmin=0.0,
              fmax=8000.0, center=False),
    MelConfig(n_fft=512, num_mels=40, sampling_rate=16000, hop_size=160, win_size=512, fmin=20.0,
              fmax=None, center=True),
])
def test_prompt_mel_other_configs(cfg):
    x = speech_like(cfg.sampling_rate, 0.73, 7)
    assert_close(f"prompt_mel {cfg}", prompt_mel(x, cfg), torch_prompt_mel(x, cfg), 1e-4)


@pytest.mark.parametrize("length", [721, 959, 960, 961, 24000, 24479])
def test_prompt_mel_frame_count(length):
    x = np.random.default_rng(length).standard_normal(length).astype(np.float32) * 0.1
    assert prompt_mel(x, RELEASE_MEL).shape == (length // 480, 80)
