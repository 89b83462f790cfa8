"""Upstream's audio wire format, shared by the HTTP routes and the gRPC service."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_pcm16(audio: Any) -> bytes:
    """Upstream's wire conversion: float audio -> int16 little-endian bytes.

    Args:
      audio: [1, T] or [T] float waveform in [-1, 1).
    Returns:
      2*T bytes: ``(x * 2**15).astype(int16)``, truncated toward zero as upstream; out-of-range
      values are clipped to the int16 range instead of wrapping around (the model's output limit
      never reaches them).
    """
    scaled = np.asarray(audio, np.float32).reshape(-1) * np.float32(2 ** 15)
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes()


__all__ = ["to_pcm16"]
