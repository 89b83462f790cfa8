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
FFT and log put ~1e-4 of noise on low-energy Kaldi log bins; that is the floor of the fbank check.
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
                                                  (22050, 1024, 80, 8000.0), (16000, 400, 80, None)])
def test_slaney_filterbank_matches_librosa(sr, n_fft, n_mels, fmax):
    librosa = pytest.importorskip("librosa")
    expected = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=fmax)
    assert_close("slaney filterbank", slaney_mel_filterbank(sr, n_fft, n_mels, 0.0, fmax), expected, 1e-8)


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

def test_kaldi_fbank_matches_torchaudio(reference):
    x = reference["speech16k"]
    expected = reference["fbank/feats"]
    feats = kaldi_fbank(x)
    assert feats.shape == (1 + (x.size - 400) // 160, 80) and feats.dtype == np.float32
    # Observed 4.7e-5, on bins 60 dB below the frame peak: torchaudio's float32 FFT noise (its
    # output is 4.7e-5 from the float64 evaluation of its own definition, ours 4.8e-7).
    assert_close("kaldi_fbank vs torchaudio", feats, expected, 1e-4)
    assert_close("kaldi_fbank vs float64 definition", feats, fbank_definition_f64(x, reference["fbank/banks"]), 2e-6)
    assert_close("spk_fbank vs torchaudio", spk_fbank(x), expected - expected.mean(axis=0), 1e-4)


def fbank_definition_f64(x: np.ndarray, banks: np.ndarray) -> np.ndarray:
    """``torchaudio.compliance.kaldi.fbank(dither=0)`` evaluated in float64 with an explicit DFT."""
    window, shift, fft = 400, 160, 512
    count = 1 + (x.size - window) // shift
    frames = np.stack([x[i * shift:i * shift + window] for i in range(count)]).astype(np.float64)
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    n = np.arange(window)
    frames = frames * (0.5 - 0.5 * np.cos(2 * math.pi * n / (window - 1))) ** 0.85
    angle = 2 * math.pi * np.outer(n, np.arange(fft // 2)) / fft  # the Nyquist bin has no weight
    power = (frames @ np.cos(angle)) ** 2 + (frames @ np.sin(angle)) ** 2
    return np.log(np.maximum(power @ banks.astype(np.float64).T, np.finfo(np.float32).eps))


def torchaudio_fbank_ops(x: np.ndarray, banks: np.ndarray) -> np.ndarray:
    """torchaudio's kaldi.fbank(dither=0) as the torch float32 ops it runs (same output bits as the
    stored torchaudio reference on its signal; checked below)."""
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(x.astype(np.float32))
    frames = t.unfold(0, 400, 160)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * previous
    frames = frames * torch.hann_window(400, periodic=False, dtype=torch.float32).pow(0.85)
    power = torch.fft.rfft(torch.nn.functional.pad(frames, (0, 112))).abs().pow(2.0)
    mel = torch.nn.functional.pad(torch.from_numpy(banks), (0, 1))
    return torch.max(power @ mel.T, torch.tensor(np.finfo(np.float32).eps)).log().numpy()


def test_torchaudio_fbank_ops_reproduce_the_stored_reference(reference):
    np.testing.assert_array_equal(torchaudio_fbank_ops(reference["speech16k"], reference["fbank/banks"]),
                                  reference["fbank/feats"])


@pytest.mark.parametrize("seed,seconds", [(0, 1.0), (1, 2.31), (2, 4.0)])
def test_kaldi_fbank_matches_torchaudio_ops_on_more_signals(reference, seed, seconds):
    """Ours is within 2e-6 of the definition; the rest of the gap to torchaudio is torchaudio's own
    float32 (MKL FFT) error, which reaches 1.3e-4 on the 4 s signal (measured; printed on failure)."""
    x = speech_like(16000, seconds, seed)
    banks = reference["fbank/banks"]
    exact = fbank_definition_f64(x, banks)
    ours = kaldi_fbank(x)
    torch_ops = torchaudio_fbank_ops(x, banks)
    assert_close("kaldi_fbank vs float64 definition", ours, exact, 2e-6)
    torch_err = float(np.abs(torch_ops - exact).max())
    assert_close("kaldi_fbank vs torchaudio ops", ours, torch_ops, torch_err + 2e-6)
    assert torch_err < 2e-4, f"torchaudio's float32 error {torch_err:.3g} grew: check the reference ops"


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
