"""Prompt audio loading and band-limited resampling (upstream ``cosyvoice/utils/file_utils.py::load_wav``).

Upstream reads the file with torchaudio's soundfile backend, averages the channels, and resamples
with ``torchaudio.transforms.Resample(orig, new)`` at its defaults (``sinc_interp_hann``,
``lowpass_filter_width=6``, ``rolloff=0.99``). The prompt is loaded twice, at 16 kHz (speech
tokens, speaker embedding) and at 24 kHz (prompt mel); the 24 kHz signal is never derived from the
16 kHz one (SPEC §2.1, §10.12). torchaudio is not a dependency here: the resampler below is written
from the definition of the windowed-sinc interpolator that torchaudio implements.

Resampling kernel (all rates reduced by ``g = gcd(orig_sr, new_sr)``: ``L = orig_sr/g`` input
samples map to ``M = new_sr/g`` output samples; ``W = lowpass_filter_width``)::

    base  = min(L, M) * rolloff                    # cutoff, in cycles per L input samples
    width = ceil(W * L / base)                     # one-sided kernel support, in input samples
    u(j, k) = clamp(base * ((k - width) / L - j / M), -W, W)     j in [0, M), k in [0, 2*width + L)
    h[j, k] = (base / L) * sinc(u) * cos(pi * u / (2 * W))**2    sinc(u) = sin(pi u) / (pi u), sinc(0) = 1

Output sample ``y[n*M + j] = sum_k h[j, k] * xp[n*L + k]`` where ``xp`` is ``x`` with ``width``
zeros on the left and ``width + L`` zeros on the right, i.e. the sinc interpolation
``y[m] = sum_i x[i] * (base/L) sinc(base * (i/L - m/M)) * hann(...)`` of the input evaluated at
output time ``m/M``. The output is cut to ``ceil(M * T / L)`` samples (= ``ceil(new_sr * T / orig_sr)``).
When ``orig_sr == new_sr`` the input is returned unchanged.

Validation policy of :func:`load_audio` (every failure is an :class:`AudioError`, a ``ValueError``
whose message names the source and the problem):

* the file is missing, unreadable, or not a format libsndfile decodes (wav/flac/ogg/...);
* the audio is empty, holds NaN/inf samples, or is silent: peak ``|x| < SILENCE_PEAK = 1e-4``
  (about -80 dBFS, three 16-bit LSBs; speech tokens and the speaker embedding of such input are
  meaningless);
* it is shorter than ``min_seconds`` (default 0.1 s: 2 speech tokens, 5 mel frames; all three
  feature extractors need at least 25 ms) or longer than ``max_seconds`` (default 30 s, the limit
  that upstream asserts before the speech tokenizer);
* it has to be resampled but its rate is below ``min_sr`` (16 kHz, as upstream asserts).
"""

from __future__ import annotations

import functools
import io
import math
import os
from typing import BinaryIO

import numpy as np
import soundfile

SILENCE_PEAK = 1e-4
MIN_SECONDS = 0.1
MAX_SECONDS = 30.0  # upstream asserts this before the speech tokenizer (frontend._extract_speech_token)
MIN_SOURCE_SR = 16000  # upstream load_wav(min_sr=16000)
# A kernel beyond this many taps means coprime rates such as 16001 -> 16000; torchaudio would
# build a multi-GB kernel for those, we refuse instead.
MAX_KERNEL_TAPS = 1 << 24

AudioSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO


class AudioError(ValueError):
    """Prompt audio that cannot be used; the message names the source and the problem."""


@functools.lru_cache(maxsize=16)
def sinc_resample_kernel(orig_sr: int, new_sr: int, lowpass_filter_width: int = 6,
                         rolloff: float = 0.99) -> tuple[np.ndarray, int]:
    """The polyphase windowed-sinc kernel of torchaudio's ``sinc_interp_hann`` resampler.

    Args:
      orig_sr, new_sr: integer sample rates (any common factor is divided out here).
      lowpass_filter_width: ``W``, the number of sinc zero crossings kept on each side.
      rolloff: cutoff as a fraction of the lower Nyquist frequency.
    Returns:
      (kernel [M, 2*width + L] float32, width) with ``L, M`` the gcd-reduced rates; read-only.
    """
    if orig_sr <= 0 or new_sr <= 0 or int(orig_sr) != orig_sr or int(new_sr) != new_sr:
        raise ValueError(f"resample: sample rates must be positive integers, got {orig_sr} -> {new_sr}")
    if lowpass_filter_width <= 0:
        raise ValueError(f"resample: lowpass_filter_width must be positive, got {lowpass_filter_width}")
    gcd = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // gcd, int(new_sr) // gcd
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    taps = new * (2 * width + orig)
    if taps > MAX_KERNEL_TAPS:
        raise ValueError(f"resample: {orig_sr} -> {new_sr} Hz reduces to {orig}:{new}, a {taps}-tap kernel "
                         f"(limit {MAX_KERNEL_TAPS}); resample with rates that share a larger common factor")
    idx = np.arange(-width, width + orig, dtype=np.float64) / orig  # [K]
    # torchaudio builds the phase offsets j/M with a float32 arange (default dtype) before promoting
    # to float64; rounding them the same way keeps the float32 kernel identical to its kernel.
    phase = (np.arange(0, -new, -1, dtype=np.float32) / np.float32(new)).astype(np.float64)  # [M]
    t = np.clip((phase[:, None] + idx[None, :]) * base, -lowpass_filter_width, lowpass_filter_width)  # [M, K]
    window = np.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        sinc = np.where(t == 0, 1.0, np.sin(t) / t)
    kernel = (sinc * window * (base / orig)).astype(np.float32)
    kernel.setflags(write=False)
    return kernel, width


def resample(x: np.ndarray, orig_sr: int, new_sr: int, lowpass_filter_width: int = 6,
             rolloff: float = 0.99) -> np.ndarray:
    """Band-limited resampling equal to ``torchaudio.functional.resample`` at its defaults.

    Args:
      x: [..., T] waveform (float; computed in float64, returned as float32).
      orig_sr, new_sr: integer sample rates in Hz.
      lowpass_filter_width, rolloff: see :func:`sinc_resample_kernel`.
    Returns:
      [..., ceil(new_sr * T / orig_sr)] float32; ``x`` itself (as float32) when the rates are equal.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"resample: expected a floating-point waveform, got {x.dtype}")
    if orig_sr == new_sr:
        return x.astype(np.float32, copy=False)
    kernel, width = sinc_resample_kernel(orig_sr, new_sr, lowpass_filter_width, rolloff)
    gcd = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // gcd, int(new_sr) // gcd
    length = x.shape[-1]
    num_blocks = length // orig + 1  # conv1d(stride=L) outputs over the padded signal
    padded = np.zeros((*x.shape[:-1], width + num_blocks * orig + kernel.shape[1]), np.float64)
    padded[..., width:width + length] = x
    # conv1d(stride=L) as a matmul of strided input blocks [n, K] with the kernel [K, M], in chunks
    # of rows so that the copied blocks stay around 32 MB.
    blocks = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1], axis=-1)[..., ::orig, :]
    blocks = blocks[..., :num_blocks, :]  # [..., n, K]
    taps = kernel.astype(np.float64).T  # [K, M]
    rows = max(1, (1 << 22) // kernel.shape[1])
    out = np.concatenate([blocks[..., i:i + rows, :] @ taps for i in range(0, num_blocks, rows)],
                         axis=-2)  # [..., n, M]
    target = -(-new * length // orig)
    return out.reshape((*x.shape[:-1], num_blocks * new))[..., :target].astype(np.float32)


def _describe(source: AudioSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return getattr(source, "name", None) or f"<{type(source).__name__}>"


def read_audio(source: AudioSource) -> tuple[np.ndarray, int]:
    """Decode an audio file with libsndfile and average its channels (no resampling, no checks).

    Args:
      source: a path, the encoded file as bytes, or a binary file object (wav/flac/ogg/...).
    Returns:
      (waveform [T] float32 in [-1, 1], sample_rate).
    Raises:
      AudioError: the file is missing or cannot be decoded.
    """
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise AudioError(f"{name}: no such audio file")
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    try:
        data, sample_rate = soundfile.read(source, dtype="float32", always_2d=True)  # [T, C]
    except Exception as e:  # libsndfile reports unknown/corrupt formats with several exception types
        raise AudioError(f"{name}: cannot decode audio ({type(e).__name__}: {e})") from e
    return data.mean(axis=1, dtype=np.float32), int(sample_rate)


def load_audio(source: AudioSource, target_sr: int, *, min_seconds: float = MIN_SECONDS,
               max_seconds: float | None = MAX_SECONDS, min_sr: int = MIN_SOURCE_SR) -> np.ndarray:
    """Load a prompt the way upstream ``load_wav(path, target_sr)`` does, with input validation.

    Args:
      source: a path, the encoded file as bytes, or a binary file object.
      target_sr: output sample rate (16000 for tokens/speaker embedding, 24000 for the prompt mel).
      min_seconds: shortest accepted duration.
      max_seconds: longest accepted duration, or None for no limit.
      min_sr: lowest accepted source rate when resampling is needed.
    Returns:
      [T'] float32 mono waveform at ``target_sr``, ``T' = ceil(target_sr * T / source_sr)``.
    Raises:
      AudioError: see the module docstring for the list of checks.
    """
    name = _describe(source)
    wav, sample_rate = read_audio(source)
    check_waveform(wav, sample_rate, name, min_seconds=min_seconds, max_seconds=max_seconds)
    if sample_rate != target_sr and sample_rate < min_sr:
        raise AudioError(f"{name}: sample rate {sample_rate} Hz is below the minimum {min_sr} Hz")
    return resample(wav, sample_rate, target_sr)


def check_waveform(wav: np.ndarray, sample_rate: int, name: str, *, min_seconds: float = MIN_SECONDS,
                   max_seconds: float | None = MAX_SECONDS) -> None:
    """The content checks of ``load_audio`` on a decoded mono waveform [T] (also for prompts that arrive
    as samples, like the gRPC service's int16 PCM): not empty, finite, not silent, and within the
    duration limits.  Raises ``AudioError`` naming ``name``."""
    seconds = wav.shape[0] / sample_rate
    if wav.shape[0] == 0:
        raise AudioError(f"{name}: the file holds no audio samples")
    if not np.all(np.isfinite(wav)):
        raise AudioError(f"{name}: {int(np.sum(~np.isfinite(wav)))} samples are NaN or infinite")
    peak = float(np.max(np.abs(wav)))
    if peak < SILENCE_PEAK:
        raise AudioError(f"{name}: the audio is silent (peak |x| = {peak:.3g} < {SILENCE_PEAK})")
    if seconds < min_seconds:
        raise AudioError(f"{name}: {seconds:.3f} s of audio is shorter than the minimum {min_seconds} s")
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"{name}: {seconds:.2f} s of audio is longer than the maximum {max_seconds} s "
                         "(the speech tokenizer accepts at most 30 s)")
