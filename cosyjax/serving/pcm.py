"""Upstream's audio wire format, and the one float -> 16-bit conversion every 16-bit output uses.

``pcm16`` is the rule (upstream's ``(x * 2**15).astype(int16)``: truncated toward zero, here also
clipped); the HTTP routes and the gRPC service send its samples as bytes (``to_pcm16``), and the web UI,
``cosyjax tts`` and the OpenAI-style route write them into wav files (``wav16_bytes`` / ``write_wav16``)
unchanged, so one seed gives the same samples everywhere (libsndfile's own float -> PCM_16 conversion
rounds instead, and is not used).

Needs numpy and soundfile only (no server dependencies); importing it runs ``cosyjax.serving``'s
``__init__``, which imports jax and the model code, as any caller that synthesises already has.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def pcm16(audio: Any) -> np.ndarray:
    """Upstream's float -> int16 conversion, the one every 16-bit output of cosyjax uses.

    Args:
      audio: [1, T] or [T] float waveform in [-1, 1); int16 input is taken as already converted
        (returned flattened, unchanged).
    Returns:
      [T] int16: ``(x * 2**15).astype(int16)``, truncated toward zero as upstream (not rounded: 0.7 LSB
      gives 0, -0.7 LSB gives 0, 1.5 LSB gives 1); out-of-range values are clipped to the int16 range
      instead of wrapping around (the model's output limit never reaches them).
    """
    arr = np.asarray(audio)
    if arr.dtype == np.int16:
        return arr.reshape(-1)
    scaled = arr.astype(np.float32).reshape(-1) * np.float32(2 ** 15)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def to_pcm16(audio: Any) -> bytes:
    """Upstream's wire format: ``pcm16(audio)`` as little-endian bytes (2*T bytes)."""
    return pcm16(audio).astype("<i2").tobytes()


def write_wav16(file: Any, audio: Any, sample_rate: int) -> None:
    """Write ``pcm16(audio)`` as a 16-bit PCM mono wav to ``file`` (a path or a binary file object).

    soundfile writes int16 input to PCM_16 unchanged, so the file holds exactly ``pcm16``'s samples.
    """
    import soundfile

    soundfile.write(file, pcm16(audio), int(sample_rate), format="WAV", subtype="PCM_16")


def wav16_bytes(audio: Any, sample_rate: int) -> bytes:
    """``pcm16(audio)`` as the bytes of a 16-bit PCM mono wav file (see ``write_wav16``)."""
    buf = io.BytesIO()
    write_wav16(buf, audio, sample_rate)
    return buf.getvalue()


__all__ = ["pcm16", "to_pcm16", "wav16_bytes", "write_wav16"]
