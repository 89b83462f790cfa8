"""CausalHiFTGenerator (cosyvoice/hifigan/generator.py): mel -> f0 -> NSF source -> waveform.

Legend: B batch, T mel frames, C channels, L samples (S = ``cfg.upsample_scale`` per frame),
F STFT frames (L / hop + 1), N n_fft, K = N / 2 + 1.

``hift_inference`` is upstream's ``inference(speech_feat, finalize)`` for a batch:

1. f0 = |F0Predictor(mel)| in float64 (scoped ``jax.enable_x64`` inside the jitted function;
   float32 where that is unavailable or ``f0_float64=False``), cast to float32.  On tiny-a the
   float64 f0 is bit-exact; a float32 f0 is off by ~2e-5 Hz, which the NSF phase turns into an
   audio error of 1.2e-5 (SNR 93 dB) instead of 1.0e-6 (SNR 112 dB);
2. source = SourceModuleHnNSF(f0) (``source.py``), its STFT S (``istft.py``);
3. conv_pre (right look-ahead ``conv_pre_look_right``), per stage: leaky_relu(lrelu_slope),
   nearest upsample + left-causal conv, (last stage: ReflectionPad1d((1, 0))), + source branch,
   mean of the Snake resblocks; leaky_relu(0.01), conv_post -> [B, F, N + 2];
4. magnitude = min(exp(x[:K]), 100), phase = sin(x[K:]), iSTFT, clamp to +-audio_limit.

``finalize=False`` holds back look-ahead exactly as upstream: the f0 net uses its last
``f0.LOOK_AHEAD`` (3) frames as context, conv_pre its last ``conv_pre_look_right`` (4), and the
last S samples of the iSTFT are dropped, so T frames give S * (T - 8) samples (release sizes).

Static shapes.  Mel is zero-padded to a length bucket (``mel_bucket``) and each row's true length
travels as a traced value, so every length in a bucket shares one compiled function.  Padding at
the end cannot change the valid output because every conv after the two look-ahead convs is
left-causal, the look-ahead convs see zeros past the end exactly as upstream's zero padding, the
source STFT reflects at the valid end (not the buffer end), and the iSTFT drops frames past the
valid count from both signal and window envelope.

Streaming.  ``hift_stream_step`` reproduces upstream's streaming contract (``CosyVoice2Model.tts``
/ ``CosyVoice3Model``): rerun the vocoder on *all* mel so far with ``finalize=False`` and emit the
samples past those already emitted; the last call uses ``finalize=True``.  Because everything is
causal past the look-ahead, the emitted samples equal the offline ``finalize=True`` result's (up to
float32 rounding of different buffer sizes).  A carried-state version (conv caches per layer, the
running phase sum, STFT/iSTFT overlap tails) makes each step O(chunk) instead of O(all mel): see
``cosyjax.hift.stream`` (``hift_stream_init`` / ``hift_stream_push``).  It could differ from upstream where upstream recomputes
from t = 0: the phase cumsum (upstream re-accumulates from frame 0 in float64 and rounds each
entry to float32; a carry must keep the float64 running sum, not the float32 phase, or the sines
drift by up to ~1e-4), and the f0 net, which upstream reruns in float64 on the whole prefix.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.config import HiftConfig
from cosyjax.hift.f0 import LOOK_AHEAD, F0Predictor, causal_padding, float64_available, float64_scope
from cosyjax.hift.istft import istft, num_stft_frames, stft
from cosyjax.hift.source import HiftNoise, checked_buffers, make_noise, source_signal
from cosyjax.nn.conv import Conv1d

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST
SNAKE_EPS = 1e-9  # Snake.no_div_by_zero
POST_LRELU_SLOPE = 0.01  # F.leaky_relu default, used before conv_post
MAG_CLIP = 1e2  # HiFTGenerator._istft: torch.clip(magnitude, max=1e2)


class Snake(nn.Module):
    """``x + 1 / (alpha + 1e-9) * sin(alpha x)^2`` with per-channel alpha (linear scale), on [B, T, C]."""

    channels: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        alpha = self.param("alpha", nn.initializers.ones, (self.channels,), jnp.float32)
        return x + (1.0 / (alpha + jnp.float32(SNAKE_EPS))) * jnp.sin(x * alpha) ** 2


class ResBlock(nn.Module):
    """Causal HiFiGAN ResBlock: per dilation d, x += conv2(snake(conv1_d(snake(x)))), on [B, T, C]."""

    channels: int
    kernel_size: int
    dilations: tuple[int, ...]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        for i, d in enumerate(self.dilations):
            t = Snake(self.channels, name=f"activations1_{i}")(x)
            t = Conv1d(self.channels, k, padding=(causal_padding(k, d), 0), dilation=d, name=f"convs1_{i}")(t)
            t = Snake(self.channels, name=f"activations2_{i}")(t)
            t = Conv1d(self.channels, k, padding=(causal_padding(k, 1), 0), name=f"convs2_{i}")(t)
            x = t + x
        return x


class SourceMerge(nn.Module):
    """``m_source.l_linear``: harmonics [..., H] -> [..., 1] (only its params are used here; see source.py)."""

    @nn.compact
    def __call__(self, e: Array) -> Array:
        return nn.Dense(1, precision=HIGHEST, name="l_linear")(e)


def source_down_rates(cfg: HiftConfig) -> list[int]:
    """Stride of ``source_downs[i]``: cumprod([1] + rates[::-1][:-1]) reversed ([15, 3, 1] for 8, 5, 3)."""
    rates = [1] + list(cfg.upsample_rates[::-1][:-1])
    return [int(r) for r in np.cumprod(rates)[::-1]]


class HiFTGenerator(nn.Module):
    """The parametrised parts of CausalHiFTGenerator; params are named after the torch keys.

    Methods: ``predict_f0(mel [B, T, C]) -> [B, T]``; ``decode(mel [B, T, C], s_stft [B, F, N+2])
    -> conv_post output [B, F, N+2]`` with F = T * prod(upsample_rates) + 1 (zero right context
    past the end, i.e. ``finalize=True`` semantics).
    """

    cfg: HiftConfig
    f0_dtype: Any = jnp.float32

    def setup(self):
        c = self.cfg
        self.f0_predictor = F0Predictor(c.f0_cond_channels, c.f0_num_class, dtype=self.f0_dtype)
        self.m_source = SourceMerge()
        pre_kernel = c.conv_pre_look_right + 1
        self.conv_pre = Conv1d(c.base_channels, pre_kernel, padding=(0, causal_padding(pre_kernel)))
        self.ups = [Conv1d(c.base_channels // 2 ** (i + 1), k, padding=(k - 1, 0))
                    for i, k in enumerate(c.upsample_kernel_sizes)]
        downs, source_blocks = [], []
        for i, (u, k, d) in enumerate(zip(source_down_rates(c), c.source_resblock_kernel_sizes,
                                          c.source_resblock_dilation_sizes)):
            ch = c.base_channels // 2 ** (i + 1)
            if u == 1:
                downs.append(Conv1d(ch, 1, padding=(causal_padding(1), 0)))
            else:  # CausalConv1dDownSample(kernel 2u, stride u): left pad u - 1
                downs.append(Conv1d(ch, 2 * u, stride=u, padding=(u - 1, 0)))
            source_blocks.append(ResBlock(ch, k, tuple(d)))
        self.source_downs = downs
        self.source_resblocks = source_blocks
        self.resblocks = [ResBlock(c.base_channels // 2 ** (i + 1), k, tuple(d))
                          for i in range(len(c.upsample_rates))
                          for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes)]
        post_kernel = 7  # CausalHiFTGenerator: CausalConv1d(ch, n_fft + 2, 7, causal_type='left')
        self.conv_post = Conv1d(c.n_fft + 2, post_kernel, padding=(causal_padding(post_kernel), 0))

    def predict_f0(self, mel: Array) -> Array:
        return self.f0_predictor(mel)

    def merge_source(self, e: Array) -> Array:
        return self.m_source(e)

    def decode(self, mel: Array, s_stft: Array) -> Array:
        c = self.cfg
        stages = len(c.upsample_rates)
        kernels = len(c.resblock_kernel_sizes)
        x = self.conv_pre(mel.astype(jnp.float32))
        for i, rate in enumerate(c.upsample_rates):
            x = jax.nn.leaky_relu(x, c.lrelu_slope)
            x = self.ups[i](jnp.repeat(x, rate, axis=1))  # CausalConv1dUpsample: nearest, then conv
            if i == stages - 1:
                x = jnp.concatenate([x[:, 1:2], x], axis=1)  # ReflectionPad1d((1, 0))
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = None
            for j in range(kernels):
                y = self.resblocks[i * kernels + j](x)
                xs = y if xs is None else xs + y
            x = xs / kernels
        x = jax.nn.leaky_relu(x, POST_LRELU_SLOPE)
        return self.conv_post(x)  # [B, F, N + 2]

    def __call__(self, mel: Array, s_stft: Array, excitation: Array) -> tuple[Array, Array, Array]:
        """Runs every part once (used by ``init``)."""
        return self.predict_f0(mel), self.merge_source(excitation), self.decode(mel, s_stft)


def param_shapes(cfg: HiftConfig) -> dict[str, Any]:
    """Pytree of ``jax.ShapeDtypeStruct`` of the hift params (without the ``{"params": ...}`` wrapper)."""
    frames = 2
    mel = jax.ShapeDtypeStruct((1, frames, cfg.in_channels), jnp.float32)
    s_stft = jax.ShapeDtypeStruct((1, num_stft_frames(frames * cfg.upsample_scale, cfg.hop_len), cfg.n_fft + 2),
                                  jnp.float32)
    excitation = jax.ShapeDtypeStruct((1, 1, cfg.num_harmonic_channels), jnp.float32)
    variables = jax.eval_shape(HiFTGenerator(cfg).init, jax.random.PRNGKey(0), mel, s_stft, excitation)
    return variables["params"]


# --------------------------------------------------------------------------------------------
# Lengths
# --------------------------------------------------------------------------------------------
def look_ahead_frames(cfg: HiftConfig) -> int:
    """Mel frames held back by ``finalize=False``: f0 look-ahead + conv_pre look-ahead + 1 iSTFT frame."""
    return LOOK_AHEAD + cfg.conv_pre_look_right + 1


def output_samples(num_frames: int, cfg: HiftConfig, finalize: bool) -> int:
    """Samples ``inference`` returns for ``num_frames`` mel frames: S*T, or S*(T - look-ahead)."""
    if finalize:
        return cfg.upsample_scale * num_frames
    return max(0, cfg.upsample_scale * (num_frames - look_ahead_frames(cfg)))


def min_frames(cfg: HiftConfig, finalize: bool) -> int:
    """Fewest mel frames that give at least one output sample (and that upstream can run)."""
    return 1 if finalize else look_ahead_frames(cfg) + 1


def mel_bucket(num_frames: int) -> int:
    """Padded mel length: multiples of 32 frames up to 256, then of 128 (a compile per bucket)."""
    step = 32 if num_frames <= 256 else 128
    return max(step, -(-num_frames // step) * step)


# --------------------------------------------------------------------------------------------
# Jitted core
# --------------------------------------------------------------------------------------------
def _as_f32(params: Mapping[str, Any]) -> Any:
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


@functools.partial(jax.jit, static_argnames=("cfg", "finalize", "f0_float64", "intermediates"))
def _hift_core(params: Mapping[str, Any], mel: Array, mel_len: Array, noise: HiftNoise, *, cfg: HiftConfig,
               finalize: bool, f0_float64: bool, intermediates: bool) -> dict[str, Array]:
    """Padded batch -> {"audio" [B, Tp*S], "audio_len" [B]} (+ f0, source, conv_post when intermediates)."""
    params = _as_f32(params)
    batch, frames, _ = mel.shape
    scale = cfg.upsample_scale
    mel = jnp.where(jnp.arange(frames)[None, :, None] < mel_len[:, None, None], mel.astype(jnp.float32), 0.0)
    use64 = f0_float64 and float64_available()
    model = HiFTGenerator(cfg, f0_dtype=jnp.float64 if use64 else jnp.float32)
    with float64_scope() if use64 else contextlib.nullcontext():
        f0 = model.apply({"params": params}, mel, method=HiFTGenerator.predict_f0).astype(jnp.float32)  # [B, Tp]
    f0_len = mel_len - (0 if finalize else LOOK_AHEAD)
    source = source_signal(params["m_source"], f0, noise, cfg=cfg)  # [B, Tp*S]
    s_stft = stft(source, f0_len * scale, n_fft=cfg.n_fft, hop=cfg.hop_len)  # [B, F, N+2]
    x = model.apply({"params": params}, mel, s_stft, method=HiFTGenerator.decode)  # [B, F, N+2]
    bins = cfg.n_fft // 2 + 1
    magnitude = jnp.minimum(jnp.exp(x[..., :bins]), jnp.float32(MAG_CLIP))
    phase = jnp.sin(x[..., bins:])
    x_len = f0_len - (0 if finalize else cfg.conv_pre_look_right)
    valid_frames = x_len * (scale // cfg.hop_len) + 1
    audio = istft(magnitude, phase, valid_frames, n_fft=cfg.n_fft, hop=cfg.hop_len)  # [B, Tp*S]
    audio_len = (valid_frames - 1) * cfg.hop_len - (0 if finalize else scale)
    audio = jnp.clip(audio, -cfg.audio_limit, cfg.audio_limit)
    audio = jnp.where(jnp.arange(audio.shape[1])[None, :] < audio_len[:, None], audio, 0.0)
    out = {"audio": audio, "audio_len": audio_len}
    if intermediates:
        out.update(f0=f0, f0_len=f0_len, source=source, conv_post=x, conv_post_len=valid_frames)
    return out


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------
def _check_mel(mel: Any, cfg: HiftConfig, finalize: bool, mel_len: Any) -> tuple[np.ndarray, np.ndarray]:
    mel = np.asarray(mel)
    c = cfg.in_channels
    if mel.ndim != 3:
        raise ValueError(f"mel: expected [batch, frames, {c}] (time-major), found shape {mel.shape}")
    if mel.shape[2] != c:
        hint = " (looks channel-major: transpose torch's (B, C, T) to (B, T, C))" if mel.shape[1] == c else ""
        raise ValueError(f"mel: expected {c} channels in the last axis, found shape {mel.shape}{hint}")
    if mel.shape[0] == 0:
        raise ValueError("mel: empty batch")
    if not np.issubdtype(mel.dtype, np.floating):
        raise ValueError(f"mel: expected a float array, found dtype {mel.dtype}")
    if mel_len is None:
        lengths = np.full((mel.shape[0],), mel.shape[1], np.int64)
    else:
        lengths = np.asarray(mel_len)
        if lengths.shape != (mel.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"mel_len: expected {mel.shape[0]} integer lengths, found {lengths.dtype} {lengths.shape}")
        if (lengths > mel.shape[1]).any() or (lengths < 0).any():
            raise ValueError(f"mel_len: lengths {lengths.tolist()} outside [0, {mel.shape[1]}]")
    need = min_frames(cfg, finalize)
    if (lengths < need).any():
        rows = np.flatnonzero(lengths < need).tolist()
        raise ValueError(f"mel: {lengths.min()} frames in row(s) {rows}; finalize={finalize} needs at least "
                         f"{need} frame(s) to produce audio")
    valid = np.arange(mel.shape[1])[None, :] < lengths[:, None]
    if not np.isfinite(np.where(valid[:, :, None], mel, 0.0)).all():
        raise ValueError("mel: contains NaN or inf")
    return mel.astype(np.float32), lengths.astype(np.int32)


def _noise_for(noise: Any, num_samples: int, need: int, cfg: HiftConfig) -> HiftNoise:
    """HiftNoise of exactly ``num_samples`` rows from a key/seed/None or given buffers."""
    if noise is None or isinstance(noise, (int, np.integer)):
        return make_noise(jax.random.PRNGKey(0 if noise is None else int(noise)), num_samples, cfg)
    if isinstance(noise, HiftNoise):
        rand_ini, uniform = checked_buffers(noise, cfg)
        if uniform.shape[0] < need:
            raise ValueError(f"noise.uniform: {uniform.shape[0]} samples, this call needs {need}")
        uniform = uniform[:num_samples]
        if uniform.shape[0] < num_samples:  # the rest only reaches samples past the valid end
            uniform = np.pad(uniform, ((0, num_samples - uniform.shape[0]), (0, 0)))
        return HiftNoise(rand_ini, uniform)
    if isinstance(noise, (jax.Array, np.ndarray)):
        return make_noise(jnp.asarray(noise), num_samples, cfg)
    raise ValueError(f"noise: expected None, an int seed, a jax PRNG key or HiftNoise, found {type(noise).__name__}")


def hift_inference(params: Mapping[str, Any], mel: Any, *, cfg: HiftConfig, finalize: bool = True, noise: Any = None,
                   mel_len: Any = None, f0_float64: bool = True, return_intermediates: bool = False) -> Any:
    """``CausalHiFTGenerator.inference(speech_feat, finalize)`` for a batch of mel rows.

    Args:
      params: hift params (from ``cosyjax.convert.hift.convert``), float32 or bfloat16 numpy/jax.
      mel: [B, T, C] float mel, time-major (transpose upstream's (B, C, T) first), C = in_channels.
      cfg: hift config (static).
      finalize: False holds back look-ahead like upstream's streaming calls.
      noise: the source's random buffers: None (seed 0), an int seed, a jax PRNG key, or
        ``HiftNoise`` (e.g. upstream's dumped ``rand_ini`` [1, H] and ``sine_waves`` [1, N, H]).
        Keys are expanded position-consistently (``source.make_noise``).
      mel_len: optional [B] valid frames per row (default T for every row).
      f0_float64: run the f0 net in float64 like upstream (needs ``jax.enable_x64``).
      return_intermediates: also return f0, source and conv_post (for parity).

    Returns:
      audio [B, N] float32 with N = ``output_samples(max(mel_len), cfg, finalize)``; a shorter row is
      followed by zeros.  With ``return_intermediates``, a dict with "audio", "audio_len" [B] and
      the padded "f0" [B, Tp], "source" [B, Tp*S], "conv_post" [B, F, N_fft+2] plus their valid
      lengths "f0_len" and "conv_post_len".

    Raises:
      ValueError (before any device work) for a wrong shape/channel count, NaN/inf, too few frames
      for ``finalize`` (zero length included), bad lengths or bad noise buffers.
    """
    mel, lengths = _check_mel(mel, cfg, finalize, mel_len)
    bucket = mel_bucket(int(mel.shape[1]))
    num_samples = bucket * cfg.upsample_scale
    f0_frames = int(lengths.max()) - (0 if finalize else LOOK_AHEAD)
    noise = _noise_for(noise, num_samples, f0_frames * cfg.upsample_scale, cfg)
    padded = np.zeros((mel.shape[0], bucket, mel.shape[2]), np.float32)
    padded[:, :mel.shape[1]] = mel
    out = _hift_core(params, padded, lengths, noise, cfg=cfg, finalize=bool(finalize), f0_float64=bool(f0_float64),
                     intermediates=bool(return_intermediates))
    total = output_samples(int(lengths.max()), cfg, finalize)
    if return_intermediates:
        return out
    return out["audio"][:, :total]


def hift_stream_step(params: Mapping[str, Any], mel_so_far: Any, emitted: int, *, cfg: HiftConfig, finalize: bool,
                     noise: Any = None, f0_float64: bool = True) -> tuple[Any, int]:
    """One streaming step with upstream's contract: rerun on all mel so far, emit the new samples.

    Args:
      params, cfg, noise, f0_float64: as for ``hift_inference``; pass the same ``noise`` every step.
      mel_so_far: [B, T, C] every mel frame received so far (upstream's ``hift_cache_dict['mel']``).
      emitted: samples already returned by earlier steps (0 at the start).
      finalize: True for the last step of an utterance.

    Returns:
      (new audio [B, n], emitted + n).  Before enough frames arrive for ``finalize=False`` this
      returns an empty [B, 0] chunk instead of raising.
    """
    mel_so_far = np.asarray(mel_so_far)
    if not finalize and mel_so_far.ndim == 3 and mel_so_far.shape[1] < min_frames(cfg, False):
        return jnp.zeros((mel_so_far.shape[0], 0), jnp.float32), emitted
    audio = hift_inference(params, mel_so_far, cfg=cfg, finalize=finalize, noise=noise, f0_float64=f0_float64)
    new = audio[:, emitted:]
    return new, emitted + int(new.shape[1])
