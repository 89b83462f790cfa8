"""The three prompt feature extractors of the CosyVoice3 frontend (SPEC §2.2-2.4, §10.11).

=====================  ======================================  ======================================
function               upstream                                feeds
=====================  ======================================  ======================================
``whisper_log_mel``    ``whisper.log_mel_spectrogram(x, 128)`` ``speech_tokenizer_v3.onnx`` (tokens)
``kaldi_fbank``        ``torchaudio.compliance.kaldi.fbank``   ``spk_fbank`` (mean-normalised)
``spk_fbank``          ``_extract_spk_embedding``              ``campplus.onnx`` (192-d embedding)
``prompt_mel``         ``matcha.utils.audio.mel_spectrogram``  flow ``prompt_feat`` (50 Hz)
=====================  ======================================  ======================================

All of them run once per prompt, so they are plain numpy. The arithmetic is float64 internally
(``numpy.fft`` is float64 pocketfft) and the result is float32: the only disagreement with the
float32 torch reference is then the reference's own rounding: whisper and prompt mel within 6e-6;
Kaldi fbank within ~1.5e-4 on bins 60 dB below the frame peak, where torch's float32 FFT dominates,
and 3e-5 elsewhere. Filterbanks are float32, as upstream's are: the slaney bank is bit-identical to
librosa's, and the Kaldi bins follow torchaudio's float32 arithmetic.

Definitions (N = number of input samples):

* ``whisper_log_mel``: periodic Hann(400), reflect pad 200 on both sides (``torch.stft``
  center=True), hop 160, power ``|X|^2``, last frame dropped -> ``N // 160`` frames; 128-bin slaney
  mel filterbank (sr 16000, n_fft 400, fmin 0, fmax 8000, slaney norm, whisper's ``mel_128``);
  ``L = log10(max(mel, 1e-10))``; ``L = max(L, max(L) - 8)`` with the max over the **whole**
  utterance; output ``(L + 4) / 4``.
* ``kaldi_fbank`` (torchaudio/Kaldi ``compute-fbank-feats`` defaults, dither 0): frames of 400
  samples every 160 with ``snip_edges`` -> ``1 + (N - 400) // 160`` frames; per-frame DC removal;
  pre-emphasis ``x[j] -= 0.97 x[j-1]`` (``x[0] -= 0.97 x[0]``); Povey window
  ``(0.5 - 0.5 cos(2 pi n / 399)) ** 0.85``; zero pad to 512; power spectrum; Kaldi mel bins
  (``mel(f) = 1127 ln(1 + f/700)``, 80 triangles equally spaced in mel between 20 Hz and 8000 Hz,
  evaluated on FFT bins 0..255, Nyquist bin weight 0); ``log(max(e, float32 eps))``. No x32768
  scaling.
* ``spk_fbank``: ``kaldi_fbank`` minus its mean over time.
* ``prompt_mel`` (release: n_fft 1920, hop 480, win 1920, 80 mels, 24 kHz, fmin 0, fmax None ->
  12000): reflect pad ``(n_fft - hop) // 2`` on both sides, STFT without centering (``center``
  from the config adds torch's own ``n_fft // 2`` reflect pad, False in the release) and a periodic
  Hann(win) zero padded to n_fft, magnitude ``sqrt(re^2 + im^2 + 1e-9)``, librosa slaney mel
  basis, ``log(max(., 1e-5))`` -> ``N // hop`` frames.

Slaney mel filterbank (``librosa.filters.mel(htk=False, norm="slaney")``): mel scale linear below
1 kHz (``f / (200/3)``) and logarithmic above (``15 + ln(f / 1000) / (ln(6.4) / 27)``);
``n_mels + 2`` points equally spaced in mel between fmin and fmax give the triangle edges
``f[i], f[i+1], f[i+2]``, and triangle ``i`` is scaled by ``2 / (f[i+2] - f[i])`` (equal area).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from cosyjax.config import MelConfig

WHISPER_SAMPLE_RATE = 16000
WHISPER_N_FFT = 400
WHISPER_HOP = 160
WHISPER_N_MELS = 128
FBANK_SAMPLE_RATE = 16000
FBANK_NUM_MEL_BINS = 80
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # Kaldi's numeric_limits<float>::epsilon() log floor


def _frames(x: np.ndarray, frame_length: int, hop: int, num_frames: int) -> np.ndarray:
    """[N] -> [num_frames, frame_length] read-only strided view."""
    return np.lib.stride_tricks.sliding_window_view(x, frame_length)[: (num_frames - 1) * hop + 1: hop]


def _periodic_hann(n: int) -> np.ndarray:
    """``torch.hann_window(n)`` (periodic=True): 0.5 - 0.5 cos(2 pi k / n), float64 [n]."""
    return 0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(n) / n)


def _as_waveform(x: np.ndarray, what: str, min_samples: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{what}: expected a mono waveform [T], got shape {x.shape}")
    if x.shape[0] < min_samples:
        raise ValueError(f"{what}: needs at least {min_samples} samples, got {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: the waveform holds NaN or infinite samples")
    return x.astype(np.float64)


# librosa's slaney constants, written as librosa derives them (min_log_mel is 14.999999999999998).
_SLANEY_F_SP = 200.0 / 3
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP
_SLANEY_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, np.float64)
    ratio = np.maximum(f, _SLANEY_MIN_LOG_HZ) / _SLANEY_MIN_LOG_HZ
    log = _SLANEY_MIN_LOG_MEL + np.log(ratio) / _SLANEY_LOGSTEP
    return np.where(f >= _SLANEY_MIN_LOG_HZ, log, f / _SLANEY_F_SP)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    above = np.maximum(m, _SLANEY_MIN_LOG_MEL) - _SLANEY_MIN_LOG_MEL
    log = _SLANEY_MIN_LOG_HZ * np.exp(_SLANEY_LOGSTEP * above)
    return np.where(m >= _SLANEY_MIN_LOG_MEL, log, _SLANEY_F_SP * m)


@functools.lru_cache(maxsize=8)
def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                          fmax: float | None = None) -> np.ndarray:
    """``librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax)`` (slaney scale and norm), built here.

    Args:
      sample_rate, n_fft: STFT parameters.
      n_mels: number of triangular filters.
      fmin, fmax: band edges in Hz; ``fmax=None`` means ``sample_rate / 2``.
    Returns:
      [n_mels, n_fft // 2 + 1] float32 filterbank (read-only), as librosa returns it.
    """
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)  # [F], as librosa.fft_frequencies
    lo, hi = _hz_to_mel_slaney(np.array(fmin)), _hz_to_mel_slaney(np.array(fmax))
    edges = _mel_to_hz_slaney(np.linspace(lo, hi, n_mels + 2))  # [n_mels + 2]
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]  # [n_mels + 2, F]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    # librosa accumulates the triangles in a float32 array, then applies the slaney norm to it.
    weights = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)  # [n_mels, F]
    weights = (weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)
    weights.setflags(write=False)
    return weights


# torch.log(1 + k * 31.25 / 700) in float32 minus the correctly rounded value, in ulps (k: ulps), for
# the 256 FFT bins of a 512-point FFT at 16 kHz (measured with torch 2.13 on CPU; tests compare the
# resulting banks with torchaudio's stored ones).
TORCH_LOG_ULPS_512_16K = {8: 1, 13: 1, 31: -1, 38: -1, 56: 1, 57: -1, 91: 1, 93: 1, 98: 1, 100: -1, 116: 1,
                          148: -1, 216: 1, 218: 1, 221: 1, 225: 1, 236: 1, 240: 1, 243: -1, 245: 1, 252: 1}


@functools.lru_cache(maxsize=4)
def kaldi_mel_banks(num_bins: int, padded_window: int, sample_rate: float, low_freq: float = 20.0,
                    high_freq: float = 0.0) -> np.ndarray:
    """Kaldi's triangular mel bins (``torchaudio.compliance.kaldi.get_mel_banks``, no VTLN warp).

    Args:
      num_bins: number of mel bins.
      padded_window: FFT size.
      sample_rate: in Hz.
      low_freq: lower band edge in Hz.
      high_freq: upper band edge in Hz; ``<= 0`` is an offset from Nyquist (Kaldi convention).
    Returns:
      [num_bins, padded_window // 2 + 1] float32 (read-only); the Nyquist column is zero.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < high_freq <= nyquist):
        raise ValueError(f"kaldi_mel_banks: need 0 <= low_freq < high_freq <= nyquist, got "
                         f"{low_freq}, {high_freq}, {nyquist}")
    # torchaudio evaluates the bins in float32 (torch's default dtype) from float64 band edges. We
    # follow its operation order in float32 because the rounding of small triangle weights moves
    # low-energy log bins by ~1e-4.  Its float32 log (ATen's vectorised SLEEF log) is not correctly
    # rounded: for the frontend's configuration (512-point FFT at 16 kHz) 21 of the 256 values are
    # one ulp off, and we apply those ulps so the banks equal torchaudio's bit for bit.
    f32 = np.float32
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = f32((mel_high - mel_low) / (num_bins + 1))
    index = np.arange(num_bins, dtype=f32)[:, None]  # [num_bins, 1]
    left = f32(mel_low) + index * delta
    center = f32(mel_low) + (index + f32(1.0)) * delta
    right = f32(mel_low) + (index + f32(2.0)) * delta
    fft_hz = f32(sample_rate / padded_window) * np.arange(padded_window // 2, dtype=f32)
    log = np.log((f32(1.0) + fft_hz / f32(700.0)).astype(np.float64)).astype(f32)  # correctly rounded
    if (padded_window, float(sample_rate)) == (512, 16000.0):
        for k, ulps in TORCH_LOG_ULPS_512_16K.items():
            log[k] = np.nextafter(log[k], f32(np.inf) if ulps > 0 else f32(-np.inf))
    fft_mel = f32(1127.0) * log  # [F - 1]
    up = (fft_mel[None, :] - left) / (center - left)
    down = (right - fft_mel[None, :]) / (right - center)
    bins = np.zeros((num_bins, padded_window // 2 + 1), np.float32)
    bins[:, :-1] = np.maximum(f32(0.0), np.minimum(up, down))
    bins.setflags(write=False)
    return bins


def whisper_log_mel(wav16k: np.ndarray, n_mels: int = WHISPER_N_MELS) -> np.ndarray:
    """Whisper log-mel features for the speech tokenizer (``whisper.log_mel_spectrogram``).

    Args:
      wav16k: [N] mono waveform at 16 kHz, N > 200.
      n_mels: 128 for ``speech_tokenizer_v3``.
    Returns:
      [n_mels, N // 160] float32.
    """
    x = _as_waveform(wav16k, "whisper_log_mel", WHISPER_N_FFT // 2 + 1)
    half = WHISPER_N_FFT // 2
    padded = np.pad(x, (half, half), mode="reflect")
    num_frames = x.shape[0] // WHISPER_HOP  # torch.stft gives one more; whisper drops it
    spectrum = np.fft.rfft(_frames(padded, WHISPER_N_FFT, WHISPER_HOP, num_frames)
                           * _periodic_hann(WHISPER_N_FFT), axis=-1)  # [T, F]
    power = spectrum.real ** 2 + spectrum.imag ** 2
    filters = slaney_mel_filterbank(WHISPER_SAMPLE_RATE, WHISPER_N_FFT, n_mels, 0.0, None)
    log_spec = np.log10(np.maximum(filters.astype(np.float64) @ power.T, 1e-10))  # [n_mels, T]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def kaldi_fbank(wav16k: np.ndarray, num_mel_bins: int = FBANK_NUM_MEL_BINS,
                sample_rate: int = FBANK_SAMPLE_RATE) -> np.ndarray:
    """Kaldi log filterbank, ``torchaudio.compliance.kaldi.fbank(num_mel_bins=80, dither=0)``.

    Args:
      wav16k: [N] mono waveform in [-1, 1] (not scaled to int16 range), N >= 25 ms of samples.
      num_mel_bins: number of mel bins.
      sample_rate: in Hz.
    Returns:
      [1 + (N - window) // shift, num_mel_bins] float32 (window 25 ms, shift 10 ms).
    """
    window = int(sample_rate * 0.025)
    shift = int(sample_rate * 0.010)
    padded_window = 1 << (window - 1).bit_length()
    x = _as_waveform(wav16k, "kaldi_fbank", window)
    num_frames = 1 + (x.shape[0] - window) // shift  # snip_edges=True
    frames = _frames(x, window, shift, num_frames)
    frames = frames - frames.mean(axis=1, keepdims=True)  # [T, window]
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - 0.97 * previous
    n = np.arange(window)
    povey = (0.5 - 0.5 * np.cos(2.0 * math.pi * n / (window - 1))) ** 0.85
    spectrum = np.fft.rfft(frames * povey, n=padded_window, axis=-1)  # [T, padded_window // 2 + 1]
    power = spectrum.real ** 2 + spectrum.imag ** 2
    banks = kaldi_mel_banks(num_mel_bins, padded_window, float(sample_rate))
    energies = power @ banks.astype(np.float64).T  # [T, num_mel_bins]
    return np.log(np.maximum(energies, FLOAT32_EPS)).astype(np.float32)


def spk_fbank(wav16k: np.ndarray) -> np.ndarray:
    """Speaker-embedding input (``_extract_spk_embedding``): Kaldi fbank minus its mean over time.

    Args:
      wav16k: [N] mono waveform at 16 kHz.
    Returns:
      [1 + (N - 400) // 160, 80] float32, to be fed to ``campplus.onnx`` as [1, T, 80].
    """
    feats = kaldi_fbank(wav16k).astype(np.float64)
    return (feats - feats.mean(axis=0, keepdims=True)).astype(np.float32)


def prompt_mel(wav24k: np.ndarray, mel_cfg: MelConfig) -> np.ndarray:
    """Prompt mel for the flow (``matcha.utils.audio.mel_spectrogram``), time-major.

    Args:
      wav24k: [N] mono waveform at ``mel_cfg.sampling_rate``, N > (n_fft - hop) / 2.
      mel_cfg: the release's feat_extractor arguments.
    Returns:
      [T, num_mels] float32 with ``T = N // hop_size`` when ``center`` is False.
    """
    n_fft, hop, win = mel_cfg.n_fft, mel_cfg.hop_size, mel_cfg.win_size
    if win > n_fft:
        raise ValueError(f"prompt_mel: win_size {win} > n_fft {n_fft}")
    side = int((n_fft - hop) / 2)
    x = _as_waveform(wav24k, "prompt_mel", side + 1)  # reflect padding needs side < N
    padded = np.pad(x, (side, side), mode="reflect")
    if mel_cfg.center:  # torch.stft(center=True, pad_mode="reflect") on top of matcha's own padding
        padded = np.pad(padded, (n_fft // 2, n_fft // 2), mode="reflect")
    if padded.shape[0] < n_fft:
        raise ValueError(f"prompt_mel: {x.shape[0]} samples give no frame of {n_fft}")
    num_frames = 1 + (padded.shape[0] - n_fft) // hop
    window = np.zeros(n_fft)
    start = (n_fft - win) // 2  # torch.stft centres a shorter window inside n_fft
    window[start:start + win] = _periodic_hann(win)
    spectrum = np.fft.rfft(_frames(padded, n_fft, hop, num_frames) * window, axis=-1)  # [T, F]
    magnitude = np.sqrt(spectrum.real ** 2 + spectrum.imag ** 2 + 1e-9)
    basis = slaney_mel_filterbank(mel_cfg.sampling_rate, n_fft, mel_cfg.num_mels, mel_cfg.fmin, mel_cfg.fmax)
    mel = magnitude @ basis.astype(np.float64).T  # [T, num_mels]
    return np.log(np.maximum(mel, 1e-5)).astype(np.float32)
