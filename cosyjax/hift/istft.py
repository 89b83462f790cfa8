"""``torch.stft`` / ``torch.istft`` (center=True, reflect, onesided, periodic Hann) for HiFT, in JAX.

Legend: B batch, L samples, F frames, N n_fft, K = N // 2 + 1 bins, H hop.

Both transforms work on fixed-size (bucketed) buffers whose valid part ends at a per-row length,
so they take that length as a traced value and reproduce exactly what torch does at the true end:

* ``stft``: torch reflect-pads N/2 samples at each end of the *valid* signal.  Past the valid end
  we read the reflection ``x[2(n-1) - i]`` instead of whatever the buffer holds there.
* ``istft``: torch overlap-adds only the frames that exist and divides by the window-square
  envelope of those frames.  Frames at or after the valid frame count are zeroed in both the
  signal and the envelope, so the last valid samples see upstream's tail envelope.

The DFTs are matmuls with float32 bases (HIGHEST precision): N is 16 for the release, where a
matmul is both faster than an FFT call on CPU and within a few float32 ulp of pocketfft.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=None)
def hann_window(n_fft: int) -> np.ndarray:
    """Periodic Hann [N] as ``scipy.signal.get_window('hann', N, fftbins=True)`` cast to float32."""
    n = np.arange(n_fft, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _rfft_basis(n_fft: int) -> np.ndarray:
    """[N, 2K] float32: x @ basis = concat(Re rfft(x), Im rfft(x))."""
    n = np.arange(n_fft)[:, None]
    k = np.arange(n_fft // 2 + 1)[None, :]
    angle = 2.0 * np.pi * ((n * k) % n_fft) / n_fft  # reduce n*k mod N before the float multiply
    return np.concatenate([np.cos(angle), -np.sin(angle)], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _irfft_basis(n_fft: int) -> np.ndarray:
    """[2K, N] float32: concat(Re X, Im X) @ basis = irfft(X, N) (norm="backward").

    Like pocketfft's c2r, the imaginary parts of the DC and Nyquist bins are ignored (their sine
    rows are zero) and the other bins count twice.
    """
    k = np.arange(n_fft // 2 + 1)[:, None]
    n = np.arange(n_fft)[None, :]
    angle = 2.0 * np.pi * ((k * n) % n_fft) / n_fft
    weight = np.full((n_fft // 2 + 1, 1), 2.0)
    weight[0] = 1.0
    if n_fft % 2 == 0:
        weight[-1] = 1.0
    re = weight * np.cos(angle) / n_fft
    im = -weight * np.sin(angle) / n_fft
    im[0] = 0.0
    if n_fft % 2 == 0:
        im[-1] = 0.0
    return np.concatenate([re, im], axis=0).astype(np.float32)


def num_stft_frames(num_samples: int, hop: int) -> int:
    """Frames of ``torch.stft(center=True)`` on ``num_samples`` samples."""
    return num_samples // hop + 1


def stft(x: Array, valid_len: Array, *, n_fft: int, hop: int) -> Array:
    """``torch.stft(x, n_fft, hop, n_fft, hann, center=True, pad_mode='reflect')`` of each row's valid part.

    Args:
      x: [B, L] float32 signal buffers; row b is valid on ``[0, valid_len[b])``.
      valid_len: [B] int32, each > N/2 (reflect padding needs that many samples, as in torch).
      n_fft, hop: static transform sizes.

    Returns:
      [B, F, 2K] float32 with F = L // hop + 1: real parts of bins 0..K-1, then imaginary parts
      (upstream's ``cat([real, imag], dim=1)`` channel order).  Frame f of row b equals torch's
      frame f of ``x[b, :valid_len[b]]`` for every f < valid_len[b] // hop + 1.
    """
    batch, length = x.shape
    half = n_fft // 2
    frames = num_stft_frames(length, hop)
    # Sample index in the reflect-padded signal -> source index in the row.
    pos = jnp.arange(length + 2 * half)[None, :] - half  # [1, L + N]
    last = (valid_len[:, None] - 1).astype(pos.dtype)
    src = jnp.abs(pos)  # reflection at the start: x[-i] -> x[i]
    src = jnp.where(src > last, 2 * last - src, src)  # reflection at the valid end
    src = jnp.clip(src, 0, length - 1)
    padded = jnp.take_along_axis(x, jnp.broadcast_to(src, (batch, src.shape[1])), axis=1)  # [B, L + N]
    index = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]  # [F, N]
    framed = padded[:, index] * hann_window(n_fft)  # [B, F, N]
    return jnp.einsum("bfn,nk->bfk", framed, _rfft_basis(n_fft), precision=HIGHEST)


def _overlap_add(frames: Array, hop: int) -> Array:
    """[B, F, N] -> [B, (F - 1) * hop + N]: frame f added at offset f * hop."""
    batch, count, n_fft = frames.shape
    parts = -(-n_fft // hop)
    frames = jnp.pad(frames, ((0, 0), (0, 0), (0, parts * hop - n_fft)))
    frames = frames.reshape(batch, count, parts, hop)
    total = None
    for m in range(parts):  # piece m of frame f lands in hop-block f + m
        shifted = jnp.pad(frames[:, :, m], ((0, 0), (m, parts - 1 - m), (0, 0)))  # [B, F + parts - 1, hop]
        total = shifted if total is None else total + shifted
    return total.reshape(batch, -1)[:, :(count - 1) * hop + n_fft]


def istft(magnitude: Array, phase: Array, valid_frames: Array, *, n_fft: int, hop: int) -> Array:
    """``torch.istft(magnitude * exp(i phase), n_fft, hop, n_fft, hann, center=True)`` per row.

    Args:
      magnitude, phase: [B, F, K] float32; row b has ``valid_frames[b]`` frames (the rest ignored).
      valid_frames: [B] int32.
      n_fft, hop: static transform sizes.

    Returns:
      [B, (F - 1) * hop] float32.  Row b's first ``(valid_frames[b] - 1) * hop`` samples are
      torch's output for its valid frames; later samples are 0.
    """
    count = magnitude.shape[1]
    real = magnitude * jnp.cos(phase)
    imag = magnitude * jnp.sin(phase)
    spec = jnp.concatenate([real, imag], axis=-1)  # [B, F, 2K]
    window = hann_window(n_fft)
    frames = jnp.einsum("bfk,kn->bfn", spec, _irfft_basis(n_fft), precision=HIGHEST) * window  # [B, F, N]
    keep = (jnp.arange(count)[None, :] < valid_frames[:, None]).astype(frames.dtype)[:, :, None]  # [B, F, 1]
    signal = _overlap_add(frames * keep, hop)
    envelope = _overlap_add(keep * (window * window), hop)
    half = n_fft // 2
    out_len = (count - 1) * hop
    signal = signal[:, half:half + out_len]
    envelope = envelope[:, half:half + out_len]
    # torch raises when the envelope is < 1e-11 inside its output; here that only happens past a
    # row's valid end, which is set to 0.
    ok = (envelope > 1e-11) & (jnp.arange(out_len)[None, :] < (valid_frames[:, None] - 1) * hop)
    return jnp.where(ok, signal / jnp.where(ok, envelope, 1.0), 0.0)
