"""Carried-state streaming for the CausalHiFT vocoder: O(chunk) work per mel chunk.

Legend: B batch, W window (frames or samples of one signal in one push), C channels, H harmonics
+ 1, S = ``cfg.upsample_scale`` samples per mel frame, R = prod(upsample_rates) STFT frames per
mel frame, N n_fft, K = N / 2 + 1.

API::

    state = hift_stream_init(cfg, batch=1, noise=key)          # HiftStreamState (a pytree)
    state, audio = hift_stream_push(params, state, mel, cfg=cfg)  # mel [B, n, C] -> audio [B, n']
    ...
    state, audio = hift_stream_push(params, state, last_mel, cfg=cfg, finalize=True)

The concatenated chunks equal ``hift_inference(all_mel, finalize=True)``; after M frames in
total a non-final push has emitted ``output_samples(M, cfg, finalize=False)`` = S * (M - 8)
samples in all, exactly upstream's streaming schedule (``hift_stream_step``), and the final push
emits the rest up to S * M.  ``state.chunk_len`` [B] holds each row's sample count of the last push.

How it works.  Every signal of the network (mel, the f0 net's activations, f0, the NSF source,
its STFT, each stage's upsampled / source / resblock activations, conv_post's frames, audio) is
produced as a stream.  After a row has received M mel frames, let E = M - D be its emission
frontier in frames (D = ``stream_plan(cfg).delay``, 8 for the release, matching upstream's hold
back); then signal s has been computed exactly for positions < q_s * E + c_s, where q_s is its
rate per mel frame and c_s a small static offset: the context its consumers need beyond E (one
STFT frame of iSTFT overlap, the 16 STFT frames the first strided source conv reads ahead, the f0
frame the source needs, ...; ``stream_plan`` derives them backwards from the audio).  A push of n
frames therefore advances every signal by exactly q_s * n positions, and every layer reads a
window at a *static* offset inside ``concat(tail, new)``, where the tail is the last few
positions of its input signal before the frontier (the causal conv's left context, or look-ahead
held back).  Only the tail update (a per-row dynamic slice by q_s * n) and the masks depend on a
row's counters, so all rows of a batch stream together with their own lengths.

* Start: tails are zeros, and every layer output at a negative position is forced to zero, which
  is exactly the zero left padding of the next conv.  The two reflections at t = 0 (the source
  STFT's ``center=True`` reflect padding and the last stage's ``ReflectionPad1d((1, 0))``) are
  applied by absolute position.
* Look-ahead: the f0 net's first conv (3 frames) and conv_pre (4 frames) read the held-back mel
  tail; the source runs ``c_f0`` frame(s) ahead of the emitted audio for the STFT / strided
  source convs, and the iSTFT keeps its overlap frames in the conv_post tail.
* Phase: the NSF phase is a running sum over all frames.  The state keeps that sum per harmonic in
  the accumulator's precision: float64 where the policy's ``f0_float64`` says so (stored as its bit
  pattern, uint32 pairs, so the pytree does not need global x64), otherwise the double-float32
  (hi, lo) pair of ``source.phase_cumsum`` in the same two words; a push adds its frames'
  cumulative sum to it before rounding to float32, as upstream's float64 cumsum does (keeping the
  float32 phase instead would drift by up to ~1e-4, and a plain float32 sum would depend on how
  the utterance is chunked).
* Precision: the conv stacks take the policy's ``hift`` precision, as in ``generator.py``; the f0
  net, the source, the STFT and the iSTFT run in float32 (float64 as above).
* Noise: ``uniform[i]`` of the source is indexed by absolute sample i: generated in the push from
  the key with the same counter hash as ``source.make_noise``, or sliced from given buffers.
* End (``finalize=True``): D zero frames follow the chunk (the look-ahead convs' zero right
  padding), the STFT reflects at the true last sample L - 1 = S * M - 1, and the iSTFT overlap-adds
  and normalises only frames < R * M + 1, as ``torch.istft`` over the offline frame count does.
  Garbage computed past the end never reaches earlier positions (every layer is causal).
* Cost: a push computes bucket + D frames' worth of every signal (the D frames serve finalizing
  rows; ``finalize`` is a traced per-row flag, so one compile per bucket serves both), i.e. O(chunk)
  with an overhead of D / bucket.

Where the output can differ from upstream's streaming loop (``CosyVoice2Model.tts``: rerun
``inference(all mel so far, finalize=False)``, emit the new samples, ``finalize=True`` at the end):

* In exact arithmetic it cannot.  Upstream's intermediate calls reflect-pad the STFT at the end
  of their source and see a truncated iSTFT envelope, but then trim 4 frames' worth of STFT frames
  (conv_pre's look-ahead) and drop the last S samples, so every sample they emit comes from interior
  frames only; the f0 net's last 3 frames serve as context, not output.  The samples upstream emits
  are therefore its own offline samples, and so are ours.  The final chunk is ``finalize=True``
  in both, with the same zero look-ahead and end reflection.
* Float64 phase carry: upstream re-accumulates the cumsum from frame 0 on every call; we add the
  chunk's cumsum to the carried sum.  The float64 values differ in the last bits (~1e-16
  relative), so a float32 phase changes only when it sits on a float32 rounding boundary
  (probability ~1e-9 per entry; not observed in the tests).
* f0: upstream reruns the float64 f0 net on the whole prefix; we run it on windows with cached
  float64 activations.  Same operations on the same values, so the float32-rounded f0 agrees
  (bit-exact on the tests).
* float32 rounding that depends on buffer sizes: XLA's convolutions and FFTs may round differently
  for another buffer length, so chunks equal the offline audio (and ``hift_stream_step``'s) only up
  to float32 rounding, which tests/test_hift_stream.py bounds with the HiFT audio tolerance.  Bit
  identity is common but neither guaranteed nor machine-independent: on Intel Sapphire Rapids the
  release-like chunkings of tests/test_hift_stream.py on config A and the tiny-a case are bit
  identical to the offline audio, while config B's pushes differ from it by up to 9e-8, and a
  56-frame ``hift_stream_step`` rerun differs from the offline audio (and so from the stream) by
  4.5e-8.  Against upstream's reference audio (its noise buffers) the stream is as close as the
  offline call.
* Lengths: the same as upstream's loop, except that a non-final push with < 9 frames in total
  emits nothing where upstream would fail, and a stream can be finalized with an empty chunk.
* The f0-to-frame-rate interpolation taps are computed per absolute frame in float32 like
  torch's; they stay inside their frame (so the result is the same as offline) for any length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry_2x32

from cosyjax.buckets import bucket_table, geometric_bucket
from cosyjax.config import HiftConfig
from cosyjax.hift.f0 import (FIRST_KERNEL, KERNEL, LOOK_AHEAD, NUM_CONVS, WeightNormConv1d, causal_padding,
                             float64_available, float64_scope)
from cosyjax.hift.generator import (POST_KERNEL, POST_LRELU_SLOPE, Block, Snake, hift_numerics, layout,
                                    look_ahead_frames, output_samples, resblock_mean, source_down_rates, spectrum)
from cosyjax.hift.istft import _irfft_basis, _overlap_add, _rfft_basis, hann_window
from cosyjax.hift.source import (HiftNoise, _unit_float, checked_buffers, harmonic_rad, merge_excitation, phase_add,
                                 phase_cumsum, phase_round)
from cosyjax.nn.conv import Conv1d
from cosyjax.precision import FLOAT32, Precision, PrecisionPolicy
from cosyjax.programs import ProgramCache, exportable, specs_of
from cosyjax.programs import run as run_program

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Static plan: frontier offsets and tail lengths
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """Static layout of a stream, derived from the config (see the module docstring).

    With E = frames received - ``delay``, signal s is known for positions < q_s * E + c_s.

    Attributes:
      delay: D, mel frames held back by a non-final push (>= upstream's 8, and >= what is needed).
      c_f0: offset of f0 (rate 1), of the f0 net's activations, and of the source (rate S: S * c_f0).
      c_pre: offset of conv_pre's output (rate 1).
      c_stft: offset of the source STFT frames (rate R).
      c_stage: per stage i, offset of its output X_i (rate prod(rates[:i + 1])).
      c_ups: per stage i, offset of the ups conv output U_i (one more than X on the last stage,
        whose ReflectionPad1d((1, 0)) reads U[1] for position 0).
      istft_ctx: a = (N/2 - 1) // hop, the frames on each side of a sample's hop.
      tail_mel, tail_src, tail_stft: kept positions of mel, source samples, STFT frames.
      tail_x: per stage i, kept positions of leaky_relu(X_{i - 1}) (X_{-1} = conv_pre output).
      tail_u: kept positions of U on the last stage.
    """

    delay: int
    c_f0: int
    c_pre: int
    c_stft: int
    c_stage: tuple[int, ...]
    c_ups: tuple[int, ...]
    istft_ctx: int
    tail_mel: int
    tail_src: int
    tail_stft: int
    tail_x: tuple[int, ...]
    tail_u: int


@functools.lru_cache(maxsize=None)
def stream_plan(cfg: HiftConfig) -> StreamPlan:
    """Derive every frontier offset backwards from "audio known up to S * E" (module docstring)."""
    rates = tuple(cfg.upsample_rates)
    stages = len(rates)
    hop, n_fft, scale = cfg.hop_len, cfg.n_fft, cfg.upsample_scale
    half = n_fft // 2
    a = (half - 1) // hop
    c_stage = [0] * stages
    c_ups = [0] * stages
    tail_x = [0] * stages
    c_stage[-1] = a + 1  # conv_post frames needed: < R E + a + 1 for samples < S E
    c_pre = 0
    for i in reversed(range(stages)):
        c_ups[i] = c_stage[i] + (1 if i == stages - 1 else 0)
        k, r = cfg.upsample_kernel_sizes[i], rates[i]
        lo = (c_ups[i] - k + 1) // r  # first input (pre-repeat) position the window reads
        c_prev = (c_ups[i] - 1) // r + 1
        tail_x[i] = c_prev - lo
        if i > 0:
            c_stage[i - 1] = c_prev
        else:
            c_pre = c_prev
    needs, starts = [], []
    for i, u in enumerate(source_down_rates(cfg)):
        if u == 1:
            needs.append(c_stage[i])
            starts.append(c_stage[i])
        else:  # kernel 2u, stride u, left pad u - 1: output j reads [u j - u + 1, u j + u]
            needs.append(u * c_stage[i] + 1)
            starts.append(u * c_stage[i] - u + 1)
    c_stft = max(needs)
    tail_stft = max(c_stft - s for s in starts)
    # STFT frame f reads samples [hop f - N/2, hop f + N/2); the source advances in whole frames.
    c_f0 = -(-(hop * (c_stft - 1) + half) // scale)
    tail_src = scale * c_f0 - (hop * c_stft - half)
    delay = max(look_ahead_frames(cfg), c_f0 + LOOK_AHEAD, c_pre + cfg.conv_pre_look_right)
    return StreamPlan(delay=delay, c_f0=c_f0, c_pre=c_pre, c_stft=c_stft, c_stage=tuple(c_stage),
                      c_ups=tuple(c_ups), istft_ctx=a, tail_mel=delay - min(c_f0, c_pre), tail_src=tail_src,
                      tail_stft=tail_stft, tail_x=tuple(tail_x), tail_u=c_ups[-1] - (c_stage[-1] - 1))


STREAM_BUCKET_MIN = 16
# Push buckets: powers of two from STREAM_BUCKET_MIN (cosyjax.buckets' table at one bucket per octave).
STREAM_BUCKETS = dict(minimum=STREAM_BUCKET_MIN, per_octave=1, multiple=1)


def stream_bucket(num_frames: int) -> int:
    """Padded chunk length: the next power of two, at least 16 (one compile per bucket)."""
    return geometric_bucket(num_frames, **STREAM_BUCKETS)


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------
@exportable
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HiftStreamState:
    """Everything a stream carries between pushes (a pytree of arrays).

    Attributes:
      frames: [B] int32 mel frames received so far (M).
      finished: [B] bool, set by a ``finalize=True`` push.
      emitted: [B] int32 samples emitted so far; chunk_len: [B] int32 samples of the last push.
      phase: [B, H, 2] uint32, the running NSF phase sum (rad / 2 pi) per harmonic: its float64 bits
        under a policy with ``f0_float64``, else the bits of its double-float32 (hi, lo) pair ([B, H]
        float32 where jax lacks scoped float64).  Push a stream with one policy throughout.
      tails: {name: [B, P, C]} the last P positions of each layer's input signal before its
        frontier (float32; the f0 net's as [B, P, C, 2] uint32: float64 bits, or float32 bits in word 0).
      rand_ini: [H] float32; noise_key: uint32[2] counter key of ``make_noise``; uniform: [U, H]
        float32 given noise buffers (U = 0: draw from ``noise_key``).
    """

    frames: Array
    finished: Array
    emitted: Array
    chunk_len: Array
    phase: Array
    tails: dict
    rand_ini: Array
    noise_key: Array
    uniform: Array


def _f64_bits_zeros(shape: tuple[int, ...]) -> np.ndarray:
    if float64_available():
        return np.zeros(shape + (2,), np.uint32)  # 0.0 in float64 is all-zero bits
    return np.zeros(shape, np.float32)


def _tail_shapes(cfg: HiftConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{tail name: (shape without batch, stored as float64 bits)}."""
    plan = stream_plan(cfg)
    shapes: dict[str, tuple[tuple[int, ...], bool]] = {
        "mel": ((plan.tail_mel, cfg.in_channels), False),
        "source": ((plan.tail_src, 1), False),
        "stft": ((plan.tail_stft, cfg.n_fft + 2), False),
        "post_in": ((causal_padding(POST_KERNEL), cfg.base_channels // 2 ** len(cfg.upsample_rates)), False),
        "post": ((2 * plan.istft_ctx + 1, cfg.n_fft + 2), False),
        "ups_last": ((plan.tail_u, cfg.base_channels // 2 ** len(cfg.upsample_rates)), False),
    }
    for i in range(1, NUM_CONVS):
        shapes[f"f0_{2 * i}"] = ((causal_padding(KERNEL), cfg.f0_cond_channels), True)
    for s in layout(cfg):
        shapes[f"ups_{s.index}"] = ((plan.tail_x[s.index], s.channels_in), False)
        for block in (s.source_block,) + s.blocks:
            for j, d in enumerate(block.dilations):
                shapes[f"{block.name}/convs1_{j}"] = ((causal_padding(block.kernel, d), s.channels), False)
                shapes[f"{block.name}/convs2_{j}"] = ((causal_padding(block.kernel, 1), s.channels), False)
    return shapes


def hift_stream_init(cfg: HiftConfig, batch: int = 1, noise: Any = None) -> HiftStreamState:
    """A fresh stream state for ``batch`` rows.

    Args:
      cfg: hift config.
      batch: rows streamed together.
      noise: None (seed 0), an int seed or a jax PRNG key (the same noise ``hift_inference`` makes
        from it), or ``HiftNoise`` buffers (``uniform`` [U, H] or [1, U, H], which must cover every
        sample the stream will produce).

    Returns:
      HiftStreamState with zero tails, zero phase sum and zero counters.
    """
    if int(batch) < 1:
        raise ValueError(f"batch: expected >= 1 rows, found {batch}")
    if cfg.upsample_scale < 3:
        raise ValueError(f"upsample_scale={cfg.upsample_scale}: streaming needs >= 3 samples per frame")
    width = cfg.num_harmonic_channels
    batch = int(batch)
    if isinstance(noise, HiftNoise):
        rand_ini, uniform = checked_buffers(noise, cfg)
        counter_key = np.zeros((2,), np.uint32)
    else:
        if noise is None or isinstance(noise, (int, np.integer)):
            key = jax.random.PRNGKey(0 if noise is None else int(noise))
        elif isinstance(noise, (jax.Array, np.ndarray)):
            key = jnp.asarray(noise)
        else:
            raise ValueError(f"noise: expected None, an int seed, a jax PRNG key or HiftNoise, "
                             f"found {type(noise).__name__}")
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        if key.shape != (2,) or key.dtype != jnp.uint32:
            raise ValueError(f"noise key: expected a threefry key (uint32[2]), found {key.dtype}{list(key.shape)}")
        # The same split and draws as source._make_noise, so uniform[i] matches hift_inference's.
        ini_key, counter_key = jax.random.split(key)
        rand_ini = np.asarray(jax.random.uniform(ini_key, (width,), jnp.float32).at[0].set(0.0))
        counter_key = np.asarray(counter_key, np.uint32)
        uniform = np.zeros((0, width), np.float32)
    tails = {name: (_f64_bits_zeros((batch,) + shape) if f64 else np.zeros((batch,) + shape, np.float32))
             for name, (shape, f64) in _tail_shapes(cfg).items()}
    zeros = np.zeros((batch,), np.int32)
    state = HiftStreamState(frames=zeros, finished=np.zeros((batch,), bool), emitted=zeros, chunk_len=zeros,
                            phase=_f64_bits_zeros((batch, width)), tails=tails, rand_ini=rand_ini,
                            noise_key=counter_key, uniform=uniform)
    # Device arrays, like the states pushes return: one dispatch-cache entry per bucket, and the
    # noise buffers are uploaded once.
    return jax.tree.map(jnp.asarray, state)


# --------------------------------------------------------------------------------------------
# Jitted push
# --------------------------------------------------------------------------------------------
def _as_f32(params: Mapping[str, Any]) -> Any:
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def _unpack64(x: Array, use64: bool) -> Array:
    """Stored accumulator bits (uint32 [..., 2]) -> float64 (``use64``; call inside ``float64_scope``)
    or float32.  The layout does not depend on the policy: a float32 accumulator keeps its bits in word
    0 (word 1 zero), so a float32-policy program holds no float64; all-zero bits are 0.0 either way.
    Where jax lacks scoped float64 the state is plain float32."""
    if x.dtype != jnp.uint32:
        return x.astype(jnp.float32)
    if use64:
        return jax.lax.bitcast_convert_type(x, jnp.float64)
    return jax.lax.bitcast_convert_type(x[..., 0], jnp.float32)


def _unpack_phase(x: Array, use64: bool) -> Any:
    """The stored phase sum [B, H, 2] -> a ``phase_cumsum`` accumulator: float64 bits (``use64``) or the
    (hi, lo) float32 pair in words 0 and 1.  Where jax lacks scoped float64: float32 [B, H], lo = 0."""
    if x.dtype != jnp.uint32:
        return x.astype(jnp.float32), jnp.zeros(x.shape, jnp.float32)
    if use64:
        return jax.lax.bitcast_convert_type(x, jnp.float64)
    words = jax.lax.bitcast_convert_type(x, jnp.float32)
    return words[..., 0], words[..., 1]


def _pack_phase(acc: Any, use64: bool) -> Array:
    """The inverse of ``_unpack_phase``."""
    if not float64_available():
        return phase_round(acc)
    if use64:
        return jax.lax.bitcast_convert_type(acc.astype(jnp.float64), jnp.uint32)
    return jax.lax.bitcast_convert_type(jnp.stack(acc, axis=-1), jnp.uint32)


def _pack64(x: Array, use64: bool) -> Array:
    """The inverse of ``_unpack64``."""
    if not float64_available():
        return x.astype(jnp.float32)
    if use64:
        return jax.lax.bitcast_convert_type(x.astype(jnp.float64), jnp.uint32)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.stack([bits, jnp.zeros_like(bits)], axis=-1)


class _Push:
    """Per-push bookkeeping: row counters, tails in and out, masks by absolute position."""

    def __init__(self, tails: dict, e_old: Array, advance: Array):
        self.tails_in = tails
        self.tails_out: dict[str, Array] = {}
        self.e_old = e_old  # [B] emission frontier before the push (mel frames, may be < 0)
        self.advance = advance  # [B] frames every signal advances by (per unit rate)

    def pos(self, rate: int, offset: int, width: int) -> Array:
        """[B, W] absolute positions of a window that starts at rate * E_old + offset."""
        return rate * self.e_old[:, None] + offset + jnp.arange(width, dtype=jnp.int32)[None, :]

    def zero_before_start(self, x: Array, rate: int, offset: int) -> Array:
        """Zero the positions < 0 (the next conv's zero left padding); x [B, W, ...]."""
        keep = self.pos(rate, offset, x.shape[1]) >= 0
        return jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))

    def extend(self, name: str, new: Array, rate: int) -> Array:
        """concat(tail, new) along time; records the tail after advancing rate * advance positions."""
        tail = self.tails_in[name]
        z = jnp.concatenate([tail, new.astype(tail.dtype)], axis=1)
        size = tail.shape[1]
        if size:
            start = rate * self.advance
            self.tails_out[name] = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, size, axis=0))(z, start)
        else:
            self.tails_out[name] = tail
        return z


def _conv(params: Any, x: Array, kernel: int, *, dilation: int = 1, stride: int = 1,
          precision: Precision = FLOAT32) -> Array:
    """Valid (unpadded) Conv1d with the generator's params and precision; x [B, W, C_in]."""
    features = params["bias"].shape[0]
    return Conv1d(features, kernel, padding=(0, 0), dilation=dilation, stride=stride,
                  precision=precision).apply({"params": params}, x)


def _snake(params: Any, x: Array) -> Array:
    return Snake(x.shape[-1]).apply({"params": params}, x)


def _resblock(push: _Push, block: Block, all_params: Any, x: Array, rate: int, offset: int,
              precision: Precision) -> Array:
    """``ResBlock`` ``block`` on a window [B, W, C] at position rate * E_old + offset, with cached left
    context."""
    name, kernel, params = block.name, block.kernel, all_params[block.name]
    for j, d in enumerate(block.dilations):
        t = push.extend(f"{name}/convs1_{j}", _snake(params[f"activations1_{j}"], x), rate)
        t = push.zero_before_start(_conv(params[f"convs1_{j}"], t, kernel, dilation=d, precision=precision), rate, offset)
        t = push.extend(f"{name}/convs2_{j}", _snake(params[f"activations2_{j}"], t), rate)
        t = push.zero_before_start(_conv(params[f"convs2_{j}"], t, kernel, precision=precision), rate, offset)
        x = t + x
    return x


def _f0_window(push: _Push, params: Any, z_mel: Array, plan: StreamPlan, width: int, use64: bool) -> Array:
    """F0Predictor on frames [E_old + c_f0, + W): [B, W] float32, zero before frame 0."""
    dtype = jnp.float64 if use64 else jnp.float32
    start = plan.c_f0 - (plan.delay - plan.tail_mel)
    with float64_scope(use64):
        x = z_mel[:, start:start + width + LOOK_AHEAD]
        x = WeightNormConv1d(params["condnet_0"]["bias"].shape[0], FIRST_KERNEL, padding=(0, 0), dtype=dtype).apply(
            {"params": params["condnet_0"]}, x)
        x = push.zero_before_start(jax.nn.elu(x), 1, plan.c_f0)
        for i in range(1, NUM_CONVS):
            name = f"f0_{2 * i}"
            tail = _unpack64(push.tails_in[name], use64)
            z = jnp.concatenate([tail, x], axis=1)
            size = tail.shape[1]
            push.tails_out[name] = _pack64(jax.vmap(
                lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, size, axis=0))(z, push.advance), use64)
            x = WeightNormConv1d(x.shape[-1], KERNEL, padding=(0, 0), dtype=dtype).apply(
                {"params": params[f"condnet_{2 * i}"]}, z)
            x = push.zero_before_start(jax.nn.elu(x), 1, plan.c_f0)
        x = nn.Dense(1, dtype=dtype, precision=HIGHEST).apply({"params": params["classifier"]}, x)
        f0 = jnp.abs(x[..., 0]).astype(jnp.float32)
    return push.zero_before_start(f0, 1, plan.c_f0)  # [B, W]


def _source_window(push: _Push, state: HiftStreamState, params: Any, f0: Array, cfg: HiftConfig,
                   plan: StreamPlan, use64: bool) -> tuple[Array, Array]:
    """NSF source for the f0 window's samples: ([B, W * S] float32, new phase carry).

    The NSF of ``source.source_signal`` (``harmonic_rad``, ``phase_cumsum``, ``merge_excitation``:
    one implementation); here the interpolation taps are per absolute frame, the cumsum starts from
    the carried sum (float64 when ``use64``) instead of 0, and noise is read at absolute sample positions.
    """
    scale = cfg.upsample_scale
    width = cfg.num_harmonic_channels
    batch, frames = f0.shape
    frame_pos = push.pos(1, plan.c_f0, frames)  # [B, W]
    rad = harmonic_rad(f0, cfg, use64)  # [B, W, H]
    # F.interpolate(linear, 1/S) taps of this absolute frame, in float32 as torch computes them;
    # both taps lie inside the frame (S >= 3), where every sample holds the same rad value.
    step = np.float32(1.0 / (1.0 / scale))
    real = jax.lax.optimization_barrier(step * (frame_pos.astype(jnp.float32) + jnp.float32(0.5))) - jnp.float32(0.5)
    real = jnp.maximum(real, jnp.float32(0.0))
    i0f = jnp.floor(real)
    w1 = jnp.clip(real - i0f, jnp.float32(0.0), jnp.float32(1.0))
    w0 = jnp.float32(1.0) - w1
    i0 = i0f.astype(jnp.int32)
    ini = state.rand_ini.astype(jnp.float32)
    v0 = jnp.where((i0 == 0)[..., None], rad + ini, rad)  # sample 0 carries rand_ini
    v1 = jnp.where((i0 + 1 == 0)[..., None], rad + ini, rad)
    rad_frames = v0 * w0[..., None] + v1 * w1[..., None]  # [B, W, H]
    rad_frames = jnp.where((frame_pos >= 0)[..., None], rad_frames, 0.0)
    with float64_scope(use64):
        carry = _unpack_phase(state.phase, use64)  # [B, H]
        total = phase_add(jax.tree.map(lambda c: c[:, None, :], carry), phase_cumsum(rad_frames, use64))  # [B, W, H]
        at = jnp.clip(push.advance - 1, 0, frames - 1)[:, None, None]
        last = jax.tree.map(lambda t: jnp.take_along_axis(t, at, axis=1)[:, 0], total)
        moved = (push.advance > 0)[:, None]
        new_carry = _pack_phase(jax.tree.map(lambda a, b: jnp.where(moved, a, b), last, carry), use64)
        phase = phase_round(total)
    sample_pos = jnp.maximum(push.pos(scale, scale * plan.c_f0, frames * scale), 0)  # [B, W*S]
    if state.uniform.shape[0]:
        uniform = state.uniform[jnp.minimum(sample_pos, state.uniform.shape[0] - 1)]  # [B, W*S, H]
    else:  # source._make_noise: uniform[i, h] from threefry(counter_key, (i * H + h, 0))
        counters = (sample_pos.astype(jnp.uint32)[..., None] * jnp.uint32(width)
                    + jnp.arange(width, dtype=jnp.uint32)).reshape(-1)
        bits = threefry_2x32(state.noise_key, jnp.concatenate([counters, jnp.zeros_like(counters)]))
        uniform = _unit_float(bits[:counters.shape[0]]).reshape(batch, frames * scale, width)
    return merge_excitation(params, phase, f0, uniform, cfg), new_carry


def _stft_window(push: _Push, z_src: Array, plan: StreamPlan, cfg: HiftConfig, frames: int,
                 total_samples: Array, finalize: Array) -> Array:
    """Source STFT frames [R E_old + c_stft, + frames) from the source window: [B, frames, N + 2]."""
    n_fft, hop, scale = cfg.n_fft, cfg.hop_len, cfg.upsample_scale
    half = n_fft // 2
    big_r = scale // hop
    frame = big_r * push.e_old[:, None] + plan.c_stft + jnp.arange(frames, dtype=jnp.int32)[None, :]  # [B, F]
    sample = hop * frame[..., None] - half + jnp.arange(n_fft, dtype=jnp.int32)  # [B, F, N]
    sample = jnp.abs(sample)  # center=True reflect padding at sample 0
    last = (total_samples - 1)[:, None, None]  # ... and at the true last sample of a finalizing row
    sample = jnp.where(finalize[:, None, None] & (sample > last), 2 * last - sample, sample)
    z_start = scale * push.e_old + scale * plan.c_f0 - plan.tail_src  # absolute sample of z_src[:, 0]
    index = jnp.clip(sample - z_start[:, None, None], 0, z_src.shape[1] - 1)
    framed = jnp.take_along_axis(z_src, index.reshape(index.shape[0], -1), axis=1).reshape(index.shape)
    spec = jnp.einsum("bfn,nk->bfk", framed * hann_window(n_fft), _rfft_basis(n_fft), precision=HIGHEST)
    return push.zero_before_start(spec, big_r, plan.c_stft)


@functools.partial(jax.jit, static_argnames=("cfg", "precision", "f0_float64"))
def _stream_core(params: Mapping[str, Any], state: HiftStreamState, mel: Array, num_new: Array, finalize: Array, *,
                 cfg: HiftConfig, precision: Precision, f0_float64: bool) -> tuple[HiftStreamState, Array]:
    """One push: padded chunk mel [B, N, C], ``num_new`` [B] valid frames, ``finalize`` [B] bool.

    Returns (state, audio [B, (N + D) S]) with each row's new samples at the front.  The window is
    always N + D frames, so finalizing rows (which advance by n + D) and streaming rows share one
    compiled function.
    """
    params = _as_f32(params)
    plan = stream_plan(cfg)
    scale, hop, n_fft = cfg.upsample_scale, cfg.hop_len, cfg.n_fft
    big_r = scale // hop
    delay = plan.delay
    batch, chunk, _ = mel.shape
    mel = jnp.where(jnp.arange(chunk)[None, :, None] < num_new[:, None, None], mel.astype(jnp.float32), 0.0)
    # D zero frames: the look-ahead convs' zero right padding past the last frame of a finalizing row.
    mel = jnp.pad(mel, ((0, 0), (0, delay), (0, 0)))
    advance = num_new + jnp.where(finalize, delay, 0)
    width = mel.shape[1]  # W: frames every signal advances by at most, per unit rate
    e_old = state.frames - delay
    push = _Push(state.tails, e_old, advance)
    total_frames = state.frames + num_new
    use64 = f0_float64 and float64_available()

    # mel -> f0 -> NSF source -> STFT
    z_mel = push.extend("mel", mel, 1)
    f0 = _f0_window(push, params["f0_predictor"], z_mel, plan, width, use64)  # [B, W]
    source, new_phase = _source_window(push, state, params["m_source"], f0, cfg, plan, use64)  # [B, W*S]
    z_src = push.extend("source", source[..., None], scale)[..., 0]
    s_stft = _stft_window(push, z_src, plan, cfg, big_r * width, scale * total_frames, finalize)
    z_stft = push.extend("stft", s_stft, big_r)  # starts at R E_old + c_stft - tail_stft

    # conv_pre (look-ahead conv_pre_look_right) on the held-back mel
    start = plan.c_pre - (delay - plan.tail_mel)
    x = _conv(params["conv_pre"], z_mel[:, start:start + width + cfg.conv_pre_look_right],
              cfg.conv_pre_look_right + 1, precision=precision)
    x = push.zero_before_start(x, 1, plan.c_pre)  # X_{-1}: [B, W, base]
    c_prev, rate_prev = plan.c_pre, 1
    for stage in layout(cfg):  # the decoder's stages, as HiFTGenerator.decode runs them
        i, r, k, u = stage.index, stage.rate, stage.up_kernel, stage.down_rate
        rate = rate_prev * r
        c_i, c_u = plan.c_stage[i], plan.c_ups[i]
        # ups_i: nearest x r, then the left-causal conv; the window reads leaky(X_{i-1}) from lo on.
        z = push.extend(f"ups_{i}", jax.nn.leaky_relu(x, cfg.lrelu_slope), rate_prev)
        lo = (c_u - k + 1) // r
        z = z[:, lo - (c_prev - plan.tail_x[i]):]
        z = jnp.repeat(z, r, axis=1)[:, c_u - k + 1 - r * lo:][:, :rate * width + k - 1]
        up = _conv(params[f"ups_{i}"], z, k, precision=precision)
        up = push.zero_before_start(up, rate, c_u)  # U_i from rate E_old + c_u
        if stage.last:
            # V[m] = U[m - 1], and V[0] = U[1] (ReflectionPad1d((1, 0))).
            z_up = push.extend("ups_last", up, rate)  # starts at rate E_old + c_i - 1
            shifted = z_up[:, :rate * width]
            first = jnp.clip(1 - (rate * e_old + c_i - 1), 0, z_up.shape[1] - 1)
            at_one = jnp.take_along_axis(z_up, first[:, None, None], axis=1)  # [B, 1, C]
            pos = push.pos(rate, c_i, rate * width)
            up = jnp.where((pos == 0)[..., None], at_one, shifted)
            up = push.zero_before_start(up, rate, c_i)
        # source branch: source_downs_i on the STFT frames, then its resblock
        z_start = plan.c_stft - plan.tail_stft
        if u == 1:
            s_in = z_stft[:, c_i - z_start:c_i - z_start + rate * width]
            down = _conv(params[f"source_downs_{i}"], s_in, 1, precision=precision)
        else:
            s0 = u * c_i - u + 1 - z_start
            down = _conv(params[f"source_downs_{i}"], z_stft[:, s0:s0 + big_r * width + u], 2 * u, stride=u,
                         precision=precision)
        down = push.zero_before_start(down, rate, c_i)
        y = up + _resblock(push, stage.source_block, params, down, rate, c_i, precision)
        x = resblock_mean([_resblock(push, b, params, y, rate, c_i, precision) for b in stage.blocks])
        c_prev, rate_prev = c_i, rate

    # conv_post, then the iSTFT over frames [R E_old - a, ...)
    z = push.extend("post_in", jax.nn.leaky_relu(x, POST_LRELU_SLOPE), big_r)
    post = _conv(params["conv_post"], z, POST_KERNEL, precision=precision)  # [B, R W, N + 2]
    z_post = push.extend("post", post, big_r)
    a = plan.istft_ctx
    magnitude, phase = spectrum(z_post, cfg)
    spec = jnp.concatenate([magnitude * jnp.cos(phase), magnitude * jnp.sin(phase)], axis=-1)
    window = hann_window(n_fft)
    frames = jnp.einsum("bfk,kn->bfn", spec, _irfft_basis(n_fft), precision=HIGHEST) * window  # [B, F, N]
    fpos = push.pos(big_r, -a, frames.shape[1])
    keep = fpos >= 0
    # A finalizing row: torch.istft over the offline frame count R T + 1.
    keep = keep & (~finalize[:, None] | (fpos < big_r * total_frames[:, None] + 1))
    keep = keep.astype(frames.dtype)[..., None]  # [B, F, 1]
    signal = _overlap_add(jnp.where(keep > 0, frames, 0.0), hop)
    envelope = _overlap_add(keep * (window * window), hop)
    first = hop * a + n_fft // 2  # OLA index of sample S E_old
    signal = signal[:, first:first + scale * width]
    envelope = envelope[:, first:first + scale * width]
    e_new = e_old + advance
    spos = push.pos(scale, 0, scale * width)
    ok = (envelope > 1e-11) & (spos >= 0) & (spos < scale * e_new[:, None])
    audio = jnp.where(ok, signal / jnp.where(ok, envelope, 1.0), 0.0)
    audio = jnp.clip(audio, -cfg.audio_limit, cfg.audio_limit)  # [B, W S] from S E_old

    # Emit [max(0, S E_old), S E_new) at the front of each row.
    shift = jnp.clip(-scale * e_old, 0, scale * width)
    out_len = scale * (jnp.maximum(e_new, 0) - jnp.maximum(e_old, 0))
    padded = jnp.pad(audio, ((0, 0), (0, scale * width)))
    audio = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, scale * width))(padded, shift)
    audio = jnp.where(jnp.arange(scale * width)[None, :] < out_len[:, None], audio, 0.0)

    tails = dict(push.tails_out)
    assert set(tails) == set(state.tails), sorted(set(state.tails) ^ set(tails))
    new_state = HiftStreamState(frames=total_frames, finished=state.finished | finalize,
                                emitted=state.emitted + out_len, chunk_len=out_len, phase=new_phase, tails=tails,
                                rand_ini=state.rand_ini, noise_key=state.noise_key, uniform=state.uniform)
    return new_state, audio


# --------------------------------------------------------------------------------------------
# Public push
# --------------------------------------------------------------------------------------------
def hift_stream_push(params: Mapping[str, Any], state: HiftStreamState, mel_chunk: Any, *, cfg: HiftConfig,
                     finalize: Any = False, chunk_len: Any = None, bucket: int | None = None,
                     policy: PrecisionPolicy | str | None = None,
                     programs: ProgramCache | None = None) -> tuple[HiftStreamState, Any]:
    """Feed the next mel frames of every row; get the audio that became final.

    Args:
      params: hift params (as for ``hift_inference``).
      state: from ``hift_stream_init`` or the previous push (same cfg and batch).
      mel_chunk: [B, n, C] float mel, time-major; n may be 0 (e.g. to finalize only).
      cfg: hift config (static).
      finalize: bool, or [B] bools per row: this chunk ends the row's utterance, so its held-back
        frames are flushed with upstream's ``finalize=True`` edges.  A finished row may only be
        pushed again with 0 frames and ``finalize`` False (it then emits nothing).
      chunk_len: optional [B] valid frames per row (default n each); a row may pass 0.
      bucket: padded chunk length (static; default ``stream_bucket(n)``), >= n.  Every push with
        the same bucket shares one compiled function, finalizing or not.
      policy: the precision policy, as for ``hift_inference`` (the conv stacks' precision and the
        float64 switch of the f0 net and NSF phase; use the same policy for every push of a stream).
      programs: run through this ``cosyjax.programs.ProgramCache`` (compiled ahead of time by warm-up).

    Returns:
      (state, audio [B, n_out] numpy: cut on the host, a device slice would compile per length) with
      n_out the longest row's new sample count; shorter rows are followed by zeros (``state.chunk_len`` [B] gives each row's count).  After M frames in total
      a row has emitted S * max(0, M - delay) samples in all, S * M once finalized.

    Raises:
      ValueError (before any device work) for a wrong shape, NaN/inf, bad ``chunk_len``/``bucket``/
      ``finalize``, a mismatched state, frames or a finalize for a finished row, a finalize with no
      frames at all, or noise buffers too short.
    """
    mel = np.asarray(mel_chunk)
    c = cfg.in_channels
    if not isinstance(state, HiftStreamState):
        raise ValueError(f"state: expected a HiftStreamState from hift_stream_init, found {type(state).__name__}")
    batch = int(np.shape(state.frames)[0])
    if mel.ndim != 3 or mel.shape[2] != c:
        hint = (" (looks channel-major: transpose torch's (B, C, T) to (B, T, C))"
                if mel.ndim == 3 and mel.shape[1] == c else "")
        raise ValueError(f"mel_chunk: expected [batch, frames, {c}] (time-major), found shape {mel.shape}{hint}")
    if mel.shape[0] != batch:
        raise ValueError(f"mel_chunk: {mel.shape[0]} rows, the stream state has {batch}")
    if not np.issubdtype(mel.dtype, np.floating):
        raise ValueError(f"mel_chunk: expected a float array, found dtype {mel.dtype}")
    n = mel.shape[1]
    if chunk_len is None:
        lengths = np.full((batch,), n, np.int32)
    else:
        lengths = np.asarray(chunk_len)
        if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"chunk_len: expected {batch} integer lengths, found {lengths.dtype} {lengths.shape}")
        if (lengths < 0).any() or (lengths > n).any():
            raise ValueError(f"chunk_len: lengths {lengths.tolist()} outside [0, {n}]")
        lengths = lengths.astype(np.int32)
    fin = np.asarray(finalize)
    if fin.dtype != bool or fin.shape not in ((), (batch,)):
        raise ValueError(f"finalize: expected a bool or {batch} bools, found {fin.dtype} {fin.shape}")
    fin = np.broadcast_to(fin, (batch,)).copy()
    valid = np.arange(n)[None, :] < lengths[:, None]
    if not np.isfinite(np.where(valid[:, :, None], mel, 0.0)).all():
        raise ValueError("mel_chunk: contains NaN or inf")
    longest = int(lengths.max(initial=0))
    size = stream_bucket(longest) if bucket is None else int(bucket)
    if size < max(1, longest):
        raise ValueError(f"bucket={bucket} is smaller than the chunk's {longest} frames (and must be >= 1)")
    expected = _tail_shapes(cfg)
    if set(state.tails) != set(expected) or any(tuple(np.shape(state.tails[k])[1:len(s) + 1]) != s
                                                for k, (s, _) in expected.items()):
        raise ValueError("state: its cache layout does not match this cfg "
                         "(made by hift_stream_init for another config?)")
    finished = np.asarray(state.finished)
    if (finished & ((lengths > 0) | fin)).any():
        rows = np.flatnonzero(finished & ((lengths > 0) | fin)).tolist()
        raise ValueError(f"state: row(s) {rows} were finalized; start a new stream with hift_stream_init")
    frames = np.asarray(state.frames).astype(np.int64)
    total = frames + lengths
    if (fin & (total < 1)).any():
        rows = np.flatnonzero(fin & (total < 1)).tolist()
        raise ValueError(f"finalize: row(s) {rows} received no mel frames; hift needs at least 1")
    uniform_len = int(np.shape(state.uniform)[0])
    if uniform_len and uniform_len < cfg.upsample_scale * int(total.max()):
        raise ValueError(f"noise.uniform: {uniform_len} samples, this stream needs "
                         f"{cfg.upsample_scale * int(total.max())} after this push")
    padded = np.zeros((batch, size, c), np.float32)
    padded[:, :n] = np.where(valid[:, :, None], mel, 0.0)[:, :size]
    precision, use64 = hift_numerics(policy)
    new_state, audio = run_program(programs, _stream_core, params, state, padded, lengths, fin, cfg=cfg,
                                   precision=precision, f0_float64=use64)
    delay = stream_plan(cfg).delay
    start = np.where(finished, frames, frames - delay)
    end = np.where(fin | finished, total, total - delay)
    out = cfg.upsample_scale * (np.maximum(end, 0) - np.maximum(start, 0))
    return new_state, np.asarray(audio)[:, :int(out.max(initial=0))]


def stream_programs(cfg: HiftConfig, params: Any, *, max_push_frames: int, batch: int = 1,
                    policy: PrecisionPolicy | str | None = None, noise: Any = None) -> list[tuple[Any, tuple, dict]]:
    """Every ``_stream_core`` program ``hift_stream_push`` runs for pushes of up to ``max_push_frames``
    frames (one per ``stream_bucket``; finalizing and streaming pushes share it), as (function,
    argument specs, static arguments) triples (``cosyjax.programs``).  ``noise`` as given to
    ``hift_stream_init`` (buffers and keys give states of different shapes)."""
    precision, use64 = hift_numerics(policy)
    state = specs_of(hift_stream_init(cfg, batch, noise))
    p, out = specs_of(params), []
    for size in bucket_table(max_push_frames, **STREAM_BUCKETS):
        args = (p, state, jax.ShapeDtypeStruct((batch, size, cfg.in_channels), jnp.float32),
                jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.bool_))
        out.append((_stream_core, args, dict(cfg=cfg, precision=precision, f0_float64=use64)))
    return out


def stream_output_samples(total_frames: int, cfg: HiftConfig, finalize: bool) -> int:
    """Samples a stream has emitted in all after ``total_frames`` frames (= ``output_samples``)."""
    delay = stream_plan(cfg).delay
    if finalize:
        return output_samples(total_frames, cfg, True)
    return cfg.upsample_scale * max(0, total_frames - delay)
