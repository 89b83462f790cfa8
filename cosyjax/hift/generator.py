"""CausalHiFTGenerator (cosyvoice/hifigan/generator.py): mel -> f0 -> NSF source -> waveform.

Legend: B batch, T mel frames, C channels, L samples (S = ``cfg.upsample_scale`` per frame),
F STFT frames (L / hop + 1), N n_fft, K = N / 2 + 1.

``hift_inference`` is upstream's ``inference(speech_feat, finalize)`` for a batch:

1. f0 = |F0Predictor(mel)| in float64 where the precision policy's ``f0_float64`` says so (the
   float32 policy on CPU; scoped ``jax.enable_x64`` inside the jitted function), else float32, cast
   to float32.  On tiny-a the float64 f0 is bit-exact; a float32 f0 is off by ~2e-5 Hz, which the
   NSF phase turns into an audio error of 1.2e-5 (SNR 93 dB) instead of 1.0e-6 (SNR 112 dB);
2. source = SourceModuleHnNSF(f0) (``source.py``), its STFT S (``istft.py``);
3. conv_pre (right look-ahead ``conv_pre_look_right``), per stage: leaky_relu(lrelu_slope),
   nearest upsample + left-causal conv, (last stage: ReflectionPad1d((1, 0))), + source branch,
   mean of the Snake resblocks; leaky_relu(0.01), conv_post -> [B, F, N + 2];
4. magnitude = min(exp(x[:K]), 100), phase = sin(x[K:]), iSTFT, clamp to +-audio_limit.

``finalize=False`` holds back look-ahead exactly as upstream: the f0 net uses its last
``f0.LOOK_AHEAD`` (3) frames as context, conv_pre its last ``conv_pre_look_right`` (4), and the
last S samples of the iSTFT are dropped, so T frames give S * (T - 8) samples (release sizes).

Precision (``cosyjax.precision``; every entry point takes the policy, ``hift_numerics`` reads it).
The conv stacks (conv_pre, the upsampling convs, the source downsampling convs, every resblock and
conv_post) take the policy's ``hift`` ``Precision``: float32 at HIGHEST, or bf16 operands with
float32 accumulation and float32 results.  The f0 predictor, the NSF source (phase cumsum and
sines), the STFT, Snake, exp/sin of conv_post and the iSTFT are float32 whatever the compute dtype;
float64 (f0 net, NSF division, phase cumsum) only where the policy's ``f0_float64`` asks for it.

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

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.buckets import bucket_table, geometric_bucket
from cosyjax.config import HiftConfig
from cosyjax.hift.f0 import LOOK_AHEAD, F0Predictor, causal_padding, float64_available, float64_scope
from cosyjax.hift.istft import istft, num_stft_frames, stft
from cosyjax.hift.source import HiftNoise, checked_buffers, make_noise, noise_program, source_signal
from cosyjax.nn.conv import Conv1d
from cosyjax.precision import FLOAT32, Precision, PrecisionPolicy
from cosyjax.programs import ProgramCache, specs_of
from cosyjax.programs import run as run_program

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST
SNAKE_EPS = 1e-9  # Snake.no_div_by_zero
POST_LRELU_SLOPE = 0.01  # F.leaky_relu default, used before conv_post
MAG_CLIP = 1e2  # HiFTGenerator._istft: torch.clip(magnitude, max=1e2)
POST_KERNEL = 7  # conv_post: CausalConv1d(ch, n_fft + 2, 7, causal_type='left')


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
    precision: Precision = FLOAT32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, p = self.kernel_size, self.precision
        for i, d in enumerate(self.dilations):
            t = Snake(self.channels, name=f"activations1_{i}")(x)
            t = Conv1d(self.channels, k, padding=(causal_padding(k, d), 0), dilation=d, precision=p,
                       name=f"convs1_{i}")(t)
            t = Snake(self.channels, name=f"activations2_{i}")(t)
            t = Conv1d(self.channels, k, padding=(causal_padding(k, 1), 0), precision=p, name=f"convs2_{i}")(t)
            x = t + x
        return x


class SourceMerge(nn.Module):
    """``m_source.l_linear``: harmonics [..., H] -> [..., 1] (only its params are used here; see source.py)."""

    @nn.compact
    def __call__(self, e: Array) -> Array:
        return nn.Dense(1, precision=HIGHEST, name="l_linear")(e)


def resblock_mean(outputs: list[Array]) -> Array:
    """The mean of a stage's resblock outputs, summed in order then divided (upstream's ``xs / K``)."""
    xs = None
    for y in outputs:
        xs = y if xs is None else xs + y
    return xs / len(outputs)


def source_down_rates(cfg: HiftConfig) -> list[int]:
    """Stride of ``source_downs[i]``: cumprod([1] + rates[::-1][:-1]) reversed ([15, 3, 1] for 8, 5, 3)."""
    rates = [1] + list(cfg.upsample_rates[::-1][:-1])
    return [int(r) for r in np.cumprod(rates)[::-1]]


@dataclasses.dataclass(frozen=True)
class Block:
    """One resblock: its params name, kernel size and dilations."""

    name: str
    kernel: int
    dilations: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Stage:
    """Upsampling stage i of the decoder, as ``layout`` lists it.

    Attributes:
      index: i (params ``ups_{i}``, ``source_downs_{i}``).
      rate: upsample rate r_i; up_kernel: the kernel of ``ups_{i}``.
      channels_in, channels: base / 2^i in, base / 2^(i + 1) out.
      down_rate: stride of ``source_downs_{i}`` (1: a 1x1 conv; else kernel 2u, stride u).
      source_block: ``source_resblocks_{i}``; blocks: ``resblocks_{i * K + j}`` (their mean is the output).
      last: the last stage (``ReflectionPad1d((1, 0))`` after its ups conv).
    """

    index: int
    rate: int
    up_kernel: int
    channels_in: int
    channels: int
    down_rate: int
    source_block: Block
    blocks: tuple[Block, ...]
    last: bool


@functools.lru_cache(maxsize=None)
def layout(cfg: HiftConfig) -> tuple[Stage, ...]:
    """The decoder's stages: the one description of the network layout that the module
    (``HiFTGenerator``), the offline decode and the carried-state stream (``cosyjax.hift.stream``) read."""
    stages, kernels = len(cfg.upsample_rates), len(cfg.resblock_kernel_sizes)
    out = []
    for i, (r, k, u) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, source_down_rates(cfg))):
        source = Block(f"source_resblocks_{i}", int(cfg.source_resblock_kernel_sizes[i]),
                       tuple(cfg.source_resblock_dilation_sizes[i]))
        blocks = tuple(Block(f"resblocks_{i * kernels + j}", int(kk), tuple(dd))
                       for j, (kk, dd) in enumerate(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)))
        out.append(Stage(i, int(r), int(k), cfg.base_channels // 2 ** i, cfg.base_channels // 2 ** (i + 1), int(u),
                         source, blocks, i == stages - 1))
    return tuple(out)


class HiFTGenerator(nn.Module):
    """The parametrised parts of CausalHiFTGenerator; params are named after the torch keys.

    Methods: ``predict_f0(mel [B, T, C]) -> [B, T]``; ``decode(mel [B, T, C], s_stft [B, F, N+2])
    -> conv_post output [B, F, N+2]`` with F = T * prod(upsample_rates) + 1 (zero right context
    past the end, i.e. ``finalize=True`` semantics).

    ``precision`` is the conv stacks' (conv_pre, ups, source_downs, resblocks, conv_post: operands
    in its compute dtype, float32 accumulation and results); ``f0_dtype`` the f0 predictor's (float32
    or float64, never bf16).  Snake, the mean of the resblocks and leaky_relu run on the float32
    results.
    """

    cfg: HiftConfig
    f0_dtype: Any = jnp.float32
    precision: Precision = FLOAT32

    def setup(self):
        c, p = self.cfg, self.precision
        self.f0_predictor = F0Predictor(c.f0_cond_channels, c.f0_num_class, dtype=self.f0_dtype)
        self.m_source = SourceMerge()
        pre_kernel = c.conv_pre_look_right + 1
        self.conv_pre = Conv1d(c.base_channels, pre_kernel, padding=(0, causal_padding(pre_kernel)), precision=p)
        stages = layout(c)
        self.ups = [Conv1d(s.channels, s.up_kernel, padding=(s.up_kernel - 1, 0), precision=p) for s in stages]
        downs = []
        for s in stages:
            u = s.down_rate
            if u == 1:
                downs.append(Conv1d(s.channels, 1, padding=(causal_padding(1), 0), precision=p))
            else:  # CausalConv1dDownSample(kernel 2u, stride u): left pad u - 1
                downs.append(Conv1d(s.channels, 2 * u, stride=u, padding=(u - 1, 0), precision=p))
        self.source_downs = downs
        self.source_resblocks = [ResBlock(s.channels, s.source_block.kernel, s.source_block.dilations, precision=p)
                                 for s in stages]
        self.resblocks = [ResBlock(s.channels, b.kernel, b.dilations, precision=p) for s in stages for b in s.blocks]
        self.conv_post = Conv1d(c.n_fft + 2, POST_KERNEL, padding=(causal_padding(POST_KERNEL), 0), precision=p)

    def predict_f0(self, mel: Array) -> Array:
        return self.f0_predictor(mel)

    def merge_source(self, e: Array) -> Array:
        return self.m_source(e)

    def decode(self, mel: Array, s_stft: Array) -> Array:
        c = self.cfg
        x = self.conv_pre(mel.astype(jnp.float32))
        first = 0  # index of the stage's first resblock in self.resblocks
        for s in layout(c):
            i = s.index
            x = jax.nn.leaky_relu(x, c.lrelu_slope)
            x = self.ups[i](jnp.repeat(x, s.rate, axis=1))  # CausalConv1dUpsample: nearest, then conv
            if s.last:
                x = jnp.concatenate([x[:, 1:2], x], axis=1)  # ReflectionPad1d((1, 0))
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            x = resblock_mean([self.resblocks[first + j](x) for j in range(len(s.blocks))])
            first += len(s.blocks)
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


MEL_BUCKET_MIN = 64


def mel_bucket(num_frames: int) -> int:
    """Padded mel length: the geometric table of ``cosyjax.buckets`` from 64 frames, two buckets per
    octave (a compiled program per bucket; ~20 programs cover an hour of audio)."""
    return geometric_bucket(num_frames, MEL_BUCKET_MIN)


# --------------------------------------------------------------------------------------------
# Jitted core
# --------------------------------------------------------------------------------------------
def _as_f32(params: Mapping[str, Any]) -> Any:
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def hift_numerics(policy: PrecisionPolicy | str | None = None) -> tuple[Precision, bool]:
    """What a precision policy asks of the vocoder: (the conv stacks' ``Precision``, float64 f0 net / NSF).

    ``policy``: a ``PrecisionPolicy``, a policy name, or None for the float32 policy on jax's default
    backend (float64 f0 on CPU: parity).  The float64 switch is the policy's ``f0_float64``, honoured
    where jax offers scoped float64.  Both the offline call and the stream (``cosyjax.hift.stream``)
    read it here and nowhere else.
    """
    if not isinstance(policy, PrecisionPolicy):
        policy = PrecisionPolicy.resolve(policy)
    precision = policy.hift
    if precision.attention != "xla":  # HiFT has no attention: one compiled program per compute dtype
        precision = Precision(precision.compute)
    return precision, bool(policy.f0_float64 and float64_available())


def spectrum(x: Array, cfg: HiftConfig) -> tuple[Array, Array]:
    """conv_post output [..., N + 2] -> (magnitude min(exp(x[:K]), 100), phase sin(x[K:])), float32."""
    bins = cfg.n_fft // 2 + 1
    x = x.astype(jnp.float32)
    return jnp.minimum(jnp.exp(x[..., :bins]), jnp.float32(MAG_CLIP)), jnp.sin(x[..., bins:])


@functools.partial(jax.jit, static_argnames=("cfg", "finalize", "precision", "f0_float64", "intermediates"))
def _hift_core(params: Mapping[str, Any], mel: Array, mel_len: Array, noise: HiftNoise, *, cfg: HiftConfig,
               finalize: bool, precision: Precision, f0_float64: bool, intermediates: bool) -> dict[str, Array]:
    """Padded batch -> {"audio" [B, Tp*S], "audio_len" [B]} (+ f0, source, conv_post when intermediates).

    ``precision``: the conv stacks'; ``f0_float64``: f0 net, NSF division and phase cumsum in float64
    (from ``hift_numerics``).  f0, the source, its STFT, exp/sin and the iSTFT are float32 either way.
    """
    params = _as_f32(params)
    batch, frames, _ = mel.shape
    scale = cfg.upsample_scale
    mel = jnp.where(jnp.arange(frames)[None, :, None] < mel_len[:, None, None], mel.astype(jnp.float32), 0.0)
    use64 = f0_float64 and float64_available()
    model = HiFTGenerator(cfg, f0_dtype=jnp.float64 if use64 else jnp.float32, precision=precision)
    with float64_scope(use64):
        f0 = model.apply({"params": params}, mel, method=HiFTGenerator.predict_f0).astype(jnp.float32)  # [B, Tp]
    f0_len = mel_len - (0 if finalize else LOOK_AHEAD)
    source = source_signal(params["m_source"], f0, noise, cfg=cfg, float64=use64)  # [B, Tp*S]
    s_stft = stft(source, f0_len * scale, n_fft=cfg.n_fft, hop=cfg.hop_len)  # [B, F, N+2]
    x = model.apply({"params": params}, mel, s_stft, method=HiFTGenerator.decode)  # [B, F, N+2]
    magnitude, phase = spectrum(x, cfg)
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


def _noise_for(noise: Any, num_samples: int, need: int, cfg: HiftConfig, programs: Any = None) -> HiftNoise:
    """HiftNoise of exactly ``num_samples`` rows from a key/seed/None or given buffers."""
    if noise is None or isinstance(noise, (int, np.integer)):
        return make_noise(jax.random.PRNGKey(0 if noise is None else int(noise)), num_samples, cfg, programs)
    if isinstance(noise, HiftNoise):
        rand_ini, uniform = checked_buffers(noise, cfg)
        if uniform.shape[0] < need:
            raise ValueError(f"noise.uniform: {uniform.shape[0]} samples, this call needs {need}")
        uniform = uniform[:num_samples]
        if uniform.shape[0] < num_samples:  # the rest only reaches samples past the valid end
            uniform = np.pad(uniform, ((0, num_samples - uniform.shape[0]), (0, 0)))
        return HiftNoise(rand_ini, uniform)
    if isinstance(noise, (jax.Array, np.ndarray)):
        return make_noise(jnp.asarray(noise), num_samples, cfg, programs)
    raise ValueError(f"noise: expected None, an int seed, a jax PRNG key or HiftNoise, found {type(noise).__name__}")


def hift_inference(params: Mapping[str, Any], mel: Any, *, cfg: HiftConfig, finalize: bool = True, noise: Any = None,
                   mel_len: Any = None, policy: PrecisionPolicy | str | None = None,
                   return_intermediates: bool = False, programs: ProgramCache | None = None) -> Any:
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
      policy: the precision policy (``cosyjax.precision.PrecisionPolicy`` or its name; None: the
        float32 policy on this backend).  Its ``hift`` precision runs the conv stacks; its
        ``f0_float64`` runs the f0 net, the NSF division and phase cumsum in float64 like upstream
        (on for float32 on CPU; see ``hift_numerics``).
      return_intermediates: also return f0, source and conv_post (for parity).
      programs: run through this ``cosyjax.programs.ProgramCache`` (compiled ahead of time by warm-up).

    Returns:
      audio [B, N] float32 numpy (cut on the host: a device slice would compile per length) with
      N = ``output_samples(max(mel_len), cfg, finalize)``; a shorter row is followed by zeros.  With
      ``return_intermediates``, a dict with "audio", "audio_len" [B] and the padded "f0" [B, Tp], "source" [B, Tp*S], "conv_post" [B, F, N_fft+2] plus their valid
      lengths "f0_len" and "conv_post_len".

    Raises:
      ValueError (before any device work) for a wrong shape/channel count, NaN/inf, too few frames
      for ``finalize`` (zero length included), bad lengths or bad noise buffers.
    """
    mel, lengths = _check_mel(mel, cfg, finalize, mel_len)
    bucket = mel_bucket(int(mel.shape[1]))
    num_samples = bucket * cfg.upsample_scale
    f0_frames = int(lengths.max()) - (0 if finalize else LOOK_AHEAD)
    noise = _noise_for(noise, num_samples, f0_frames * cfg.upsample_scale, cfg, programs)
    padded = np.zeros((mel.shape[0], bucket, mel.shape[2]), np.float32)
    padded[:, :mel.shape[1]] = mel
    precision, use64 = hift_numerics(policy)
    out = run_program(programs, _hift_core, params, padded, lengths, noise, cfg=cfg, finalize=bool(finalize),
                      precision=precision, f0_float64=use64, intermediates=bool(return_intermediates))
    total = output_samples(int(lengths.max()), cfg, finalize)
    if return_intermediates:
        return out
    return np.asarray(out["audio"])[:, :total]


def programs(cfg: HiftConfig, params: Any, *, max_frames: int, batch: int = 1, finalize: bool = True,
             policy: PrecisionPolicy | str | None = None, noise: Any = None) -> list[tuple[Any, tuple, dict]]:
    """Every program ``hift_inference`` runs for up to ``max_frames`` mel frames: ``_hift_core`` per
    mel bucket (and ``make_noise``'s per bucket when ``noise`` is a seed or key rather than buffers),
    as (function, argument specs, static arguments) triples (``cosyjax.programs``)."""
    precision, use64 = hift_numerics(policy)
    p = specs_of(params)
    out = []
    for frames in bucket_table(max_frames, MEL_BUCKET_MIN):
        num_samples = frames * cfg.upsample_scale
        if isinstance(noise, HiftNoise):
            noise_spec = specs_of(_noise_for(noise, num_samples, 0, cfg))
        else:
            fn, key, static = noise_program(num_samples, cfg)
            out.append((fn, key, static))
            noise_spec = jax.eval_shape(functools.partial(fn, **static), *key)
        args = (p, jax.ShapeDtypeStruct((batch, frames, cfg.in_channels), jnp.float32),
                jax.ShapeDtypeStruct((batch,), jnp.int32), noise_spec)
        out.append((_hift_core, args, dict(cfg=cfg, finalize=bool(finalize), precision=precision,
                                           f0_float64=use64, intermediates=False)))
    return out


def hift_stream_step(params: Mapping[str, Any], mel_so_far: Any, emitted: int, *, cfg: HiftConfig, finalize: bool,
                     noise: Any = None, policy: PrecisionPolicy | str | None = None,
                     programs: ProgramCache | None = None) -> tuple[Any, int]:
    """One streaming step with upstream's contract: rerun on all mel so far, emit the new samples.

    Args:
      params, cfg, noise, policy, programs: as for ``hift_inference``; pass the same ``noise`` every step.
      mel_so_far: [B, T, C] every mel frame received so far (upstream's ``hift_cache_dict['mel']``).
      emitted: samples already returned by earlier steps (0 at the start).
      finalize: True for the last step of an utterance.

    Returns:
      (new audio [B, n], emitted + n).  Before enough frames arrive for ``finalize=False`` this
      returns an empty [B, 0] chunk instead of raising.
    """
    mel_so_far = np.asarray(mel_so_far)
    if not finalize and mel_so_far.ndim == 3 and mel_so_far.shape[1] < min_frames(cfg, False):
        return np.zeros((mel_so_far.shape[0], 0), np.float32), emitted
    audio = hift_inference(params, mel_so_far, cfg=cfg, finalize=finalize, noise=noise, policy=policy,
                           programs=programs)
    new = audio[:, emitted:]
    return new, emitted + int(new.shape[1])
