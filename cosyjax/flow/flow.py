"""Token-to-mel flow of CosyVoice3 (cosyvoice/flow/flow.py::CausalMaskedDiffWithDiT.inference).

Front (SPEC 4): the L2-normalised speaker embedding goes through ``spk_embed_affine_layer``; the
prompt + target tokens are embedded (ids clamped at 0), passed through the PreLookaheadLayer and
repeated ``token_mel_ratio`` times in time to give ``mu``; ``cond`` holds the prompt mel in the
first F1 frames and zeros after.  The CFM (SPEC 5) integrates from the fixed seed-0 noise over the
whole prompt + generated length and the output is sliced after F1.

Batching: rows are right-padded to a token-length bucket; every op that mixes frames is causal or
masked by each row's length, so a row's result does not depend on its padding or its neighbours.

Legend: B batch, N tokens, T mel frames, C mel bins (= token embedding width), E speaker embedding.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.buckets import bucket_table, geometric_bucket
from cosyjax.config import FlowConfig
from cosyjax.flow.dit import DiT
from cosyjax.flow.prompt import FlowPrompt, int_rows, row_lengths
from cosyjax.flow.solver import cfg_batch, solve_euler_cfg
from cosyjax.nn import Conv1d, Dense
from cosyjax.precision import FLOAT32, Precision
from cosyjax.programs import ProgramCache, specs_of
from cosyjax.programs import run as run_program

Array = jax.Array
LEAKY_SLOPE = 0.01  # F.leaky_relu default in PreLookaheadLayer


class PreLookaheadLayer(nn.Module):
    """conv1 (k = lookahead + 1, right context) -> leaky_relu(0.01) -> conv2 (k=3, left-causal) + residual.

    ``x`` [B, N, C] must be zero beyond each row's tokens: the right zero padding of the conv then
    equals upstream's ``finalize`` padding.  For ``finalize=False`` upstream feeds the last
    ``lookahead`` tokens as context and returns ``N - lookahead`` frames; the first ``N - lookahead``
    frames here are the same numbers, so the caller only shortens the valid length.
    """

    channels: int
    lookahead: int
    precision: Precision = FLOAT32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = Conv1d(self.channels, self.lookahead + 1, padding=(0, self.lookahead), precision=self.precision,
                   name="conv1")(x)
        h = jax.nn.leaky_relu(h, LEAKY_SLOPE)
        h = Conv1d(x.shape[-1], 3, padding=(2, 0), precision=self.precision, name="conv2")(h)
        return h + x.astype(jnp.float32)


class Flow(nn.Module):
    """Params holder and the two halves of the flow: ``encode`` (front) and ``estimate`` (DiT)."""

    vocab_size: int
    input_size: int
    output_size: int
    pre_lookahead_channels: int
    pre_lookahead_len: int
    dim: int
    depth: int
    heads: int
    dim_head: int
    ff_mult: int
    time_freq_dim: int
    conv_pos_kernel: int
    conv_pos_groups: int
    static_chunk_size: int
    dropout: float = 0.0  # active only in ``estimate(..., deterministic=False)`` (training)
    precision: Precision = FLOAT32

    def setup(self):
        self.input_embedding = nn.Embed(self.vocab_size, self.input_size)
        self.spk_embed_affine_layer = Dense(self.output_size)  # one row per request: float32
        self.pre_lookahead_layer = PreLookaheadLayer(self.pre_lookahead_channels, self.pre_lookahead_len,
                                                     self.precision)
        self.estimator = DiT(self.dim, self.depth, self.heads, self.dim_head, self.ff_mult, self.output_size,
                             self.time_freq_dim, self.conv_pos_kernel, self.conv_pos_groups,
                             self.static_chunk_size, self.dropout, self.precision)

    def encode(self, tokens: Array, token_mask: Array, embedding: Array) -> tuple[Array, Array]:
        """tokens [B, N] int, token_mask [B, N] bool, embedding [B, E] -> (spks [B, C], h [B, N, C])."""
        # F.normalize(dim=1): x / max(||x||, 1e-12)
        embedding = embedding.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(embedding), axis=-1, keepdims=True))
        spks = self.spk_embed_affine_layer(embedding / jnp.maximum(norm, 1e-12))
        x = self.input_embedding(jnp.maximum(tokens, 0)).astype(jnp.float32) * token_mask[..., None]
        return spks, self.pre_lookahead_layer(x)

    def estimate(self, x: Array, mu: Array, t: Array, spks: Array, cond: Array, lengths: Array,
                 streaming: bool = False, deterministic: bool = True, cache: Mapping[str, Array] | None = None):
        """DiT velocity: x, mu, cond [B, T, C], t [B], spks [B, C], lengths [B] -> [B, T, C].

        ``deterministic=False`` applies the config's dropout (needs a ``"dropout"`` rng).  With
        ``cache`` the DiT runs incrementally and also returns its new cache entries (``DiT``)."""
        return self.estimator(x, mu, t, spks, cond, lengths, streaming, deterministic, cache)

    def __call__(self, tokens: Array, embedding: Array, x: Array) -> Array:
        """Touches every param (for init): a full-attention estimator call on the encoded tokens."""
        spks, h = self.encode(tokens, jnp.ones(tokens.shape, bool), embedding)
        lengths = jnp.full((x.shape[0],), x.shape[1])
        return self.estimate(x, h, jnp.zeros((x.shape[0],)), spks, h, lengths)


def make_flow(cfg: FlowConfig, precision: Precision = FLOAT32) -> Flow:
    """The Flow module for a config (every dimension from ``cfg``), computing under ``precision``."""
    return Flow(vocab_size=cfg.vocab_size, input_size=cfg.input_size, output_size=cfg.output_size,
                pre_lookahead_channels=cfg.pre_lookahead_channels, pre_lookahead_len=cfg.pre_lookahead_len,
                dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, dim_head=cfg.dim_head, ff_mult=cfg.ff_mult,
                time_freq_dim=cfg.time_freq_dim, conv_pos_kernel=cfg.conv_pos_kernel,
                conv_pos_groups=cfg.conv_pos_groups, static_chunk_size=cfg.static_chunk_size,
                dropout=cfg.dropout, precision=precision)


def param_shapes(cfg: FlowConfig) -> dict[str, Any]:
    """Pytree of ``jax.ShapeDtypeStruct`` of the flow params (without the ``{"params": ...}`` wrapper)."""
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    embedding = jax.ShapeDtypeStruct((1, cfg.spk_embed_dim), jnp.float32)
    # __call__ feeds encode's h to the estimator as mu and cond, so x has as many frames as tokens.
    x = jax.ShapeDtypeStruct((1, 4, cfg.output_size), jnp.float32)
    variables = jax.eval_shape(make_flow(cfg).init, jax.random.PRNGKey(0), tokens, embedding, x)
    return variables["params"]


# --------------------------------------------------------------------------------------------
# Jitted pieces (also used by the parity runner)
# --------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "precision"))
def flow_encode(params: Mapping[str, Any], tokens: Array, token_mask: Array, embedding: Array, *,
                cfg: FlowConfig, precision: Precision = FLOAT32) -> tuple[Array, Array]:
    """Front half: tokens [B, N] (prompt + target), token_mask [B, N], embedding [B, E] ->
    (spk_proj [B, C], h [B, N, C]); with finalize=False only the first N - pre_lookahead_len frames of h
    are upstream's h."""
    return make_flow(cfg, precision).apply({"params": params}, tokens, token_mask, embedding, method=Flow.encode)


@functools.partial(jax.jit, static_argnames=("cfg", "streaming", "precision"))
def estimator_forward(params: Mapping[str, Any], x: Array, mu: Array, t: Array, spks: Array, cond: Array,
                      lengths: Array, *, cfg: FlowConfig, streaming: bool, precision: Precision = FLOAT32) -> Array:
    """DiT alone: x, mu, cond [B, T, C], t [B], spks [B, C], lengths [B] -> velocity [B, T, C]."""
    return make_flow(cfg, precision).apply({"params": params}, x, mu, t, spks, cond, lengths, streaming,
                                           method=Flow.estimate)


@functools.partial(jax.jit, static_argnames=("cfg", "streaming", "trajectory", "precision"))
def _flow_core(params: Mapping[str, Any], tokens: Array, token_len: Array, feat: Array, feat_len: Array,
               mel_len: Array, embedding: Array, noise: Array, *, cfg: FlowConfig, streaming: bool,
               trajectory: bool = False, precision: Precision = FLOAT32) -> tuple[Array, Array | None]:
    """Padded batch -> generated mel, left-aligned per row.

    tokens [B, N] (prompt + target, right-padded), token_len [B] (tokens per row), feat [B, T, C]
    (prompt mel, right-padded to T = ratio * N), feat_len [B] (F1), mel_len [B] (valid frames, ratio
    times the valid h length), embedding [B, E], noise [1, T, C].
    Returns (mel [B, T, C] float32 with row b's frames F1..mel_len-1 at 0.. and zeros after, trajectory).
    """
    model = make_flow(cfg, precision)
    variables = {"params": params}
    num_tokens = tokens.shape[1]
    token_mask = jnp.arange(num_tokens)[None, :] < token_len[:, None]
    spks, h = model.apply(variables, tokens, token_mask, embedding, method=Flow.encode)
    mu = jnp.repeat(h, cfg.token_mel_ratio, axis=1)  # [B, T, C]
    frames = jnp.arange(mu.shape[1])
    cond = jnp.where((frames[None, :] < feat_len[:, None])[..., None], feat, 0.0)
    mu2, spks2, cond2 = cfg_batch(mu, spks, cond)
    lengths2 = jnp.concatenate([mel_len, mel_len], axis=0)

    def velocity(x2, t2, _):
        return model.apply(variables, x2, mu2, t2, spks2, cond2, lengths2, streaming, method=Flow.estimate), None

    x, _, xs = solve_euler_cfg(velocity, jnp.broadcast_to(noise, mu.shape), n_timesteps=cfg.n_timesteps,
                               cfg_rate=cfg.inference_cfg_rate, trajectory=trajectory)
    # Row b's output is x[b, F1:mel_len]; move it to the front with a gather.
    index = jnp.clip(feat_len[:, None] + frames[None, :], 0, mu.shape[1] - 1)  # [B, T]
    out = jnp.take_along_axis(x, index[..., None], axis=1)
    out = jnp.where((frames[None, :] < (mel_len - feat_len)[:, None])[..., None], out, 0.0)
    return out, xs


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
TOKEN_BUCKET_MIN = 32


def token_bucket(n: int) -> int:
    """Padded prompt + target token length: ``cosyjax.buckets`` (32, 48, 64, 96, 128, ...: two per octave)."""
    return geometric_bucket(n, TOKEN_BUCKET_MIN)


def output_lengths(cfg: FlowConfig, token_len: Any, prompt_token_len: Any, prompt_feat_len: Any,
                   finalize: bool) -> np.ndarray:
    """Generated frames per row: ratio * (Np + Nt - (0 if finalize else pre_lookahead_len)) - F1 [B]."""
    held_back = 0 if finalize else cfg.pre_lookahead_len
    total = np.asarray(prompt_token_len, np.int64) + np.asarray(token_len, np.int64) - held_back
    return cfg.token_mel_ratio * total - np.asarray(prompt_feat_len, np.int64)


def flow_inference(params: Mapping[str, Any], token: Any, prompt_token: Any = None, prompt_feat: Any = None,
                   embedding: Any = None, *, cfg: FlowConfig, noise: Any, streaming: bool, finalize: bool,
                   token_len: Any = None, prompt_token_len: Any = None, prompt_feat_len: Any = None,
                   prompt: FlowPrompt | None = None, precision: Precision = FLOAT32,
                   programs: ProgramCache | None = None) -> np.ndarray:
    """CausalMaskedDiffWithDiT.inference for a batch of rows.

    Args:
      params: flow params (from ``cosyjax.convert.flow.convert``), float32 or bfloat16.
      token: target speech tokens [B, Nt] (right-padded when rows differ; see ``token_len``).
        Negative ids are clamped to 0 as upstream does; ids >= vocab_size are refused.
      prompt_token: prompt speech tokens [B, Np] (Np may be 0).
      prompt_feat: prompt mel [B, F1, C], time-major (upstream's layout), C = cfg.output_size.
        Like upstream, F1 need not be ratio * Np (voice conversion passes them unaligned): the
        first F1 frames of ``cond`` hold it and the output starts after frame F1.
      embedding: raw speaker embedding [B, E] (L2-normalised here).
      cfg: the flow config (static).
      noise: the fixed noise buffer [1, C, frames] (``ConvertedModel.buffers["flow_rand_noise"]``);
        frame i of every row starts from noise[:, :, i].
      streaming: chunked attention (``static_chunk_size`` frames) instead of full attention.
      finalize: False holds the last ``pre_lookahead_len`` tokens back as look-ahead context.
      token_len, prompt_token_len, prompt_feat_len: per-row lengths [B] (default: full widths).
      prompt: instead of the five prompt arguments, a ``FlowPrompt`` checked before (not re-checked).
      precision: the flow stage's ``cosyjax.precision.Precision`` (static; float32 = parity).
      programs: run through this ``cosyjax.programs.ProgramCache`` (compiled ahead of time by warm-up).

    Returns:
      mel [B, T_out, C] float32 numpy, T_out = max over rows of ``output_lengths(...)``; a shorter row is
      followed by zeros.

    Raises:
      ValueError (before any device work) for: ids >= vocab_size, an empty target token sequence,
      prompt mel channels != C, a prompt mel longer than the mel the tokens give (upstream fails),
      nothing to generate, non-finite embedding or prompt mel, a batch mismatch, or more frames than
      the noise buffer holds.
    """
    token = int_rows("token", token, None)
    batch = token.shape[0]
    if batch == 0:
        raise ValueError("token: empty batch")
    if prompt is None:
        prompt = FlowPrompt.check(cfg, prompt_token, prompt_feat, embedding, batch=batch,
                                  prompt_token_len=prompt_token_len, prompt_feat_len=prompt_feat_len)
    elif any(a is not None for a in (prompt_token, prompt_feat, embedding, prompt_token_len, prompt_feat_len)):
        raise ValueError("give either prompt (a FlowPrompt) or prompt_token/prompt_feat/embedding, not both")
    elif prompt.batch != batch:
        raise ValueError(f"prompt: batch {prompt.batch} != token batch {batch}")
    prompt_token, prompt_feat, embedding = prompt.tokens, prompt.feat, prompt.embedding
    prompt_token_len, feat_len = prompt.token_len, prompt.feat_len
    channels = cfg.output_size
    token_len = row_lengths("token_len", token_len, batch, token.shape[1])
    if (token_len == 0).any():
        raise ValueError(f"token: empty target token sequence in row(s) {np.flatnonzero(token_len == 0).tolist()}")
    valid = np.arange(token.shape[1])[None, :] < token_len[:, None]
    if (np.where(valid, token, 0) >= cfg.vocab_size).any():
        bad = int(np.where(valid, token, 0).max())
        raise ValueError(f"token: id {bad} is outside the speech vocabulary [0, {cfg.vocab_size})")
    noise = np.asarray(noise)
    if noise.ndim != 3 or noise.shape[:2] != (1, channels):
        raise ValueError(f"noise: expected shape (1, {channels}, frames), found {noise.shape}")

    total_tokens = prompt_token_len + token_len
    held_back = 0 if finalize else cfg.pre_lookahead_len
    mel_len = cfg.token_mel_ratio * (total_tokens - held_back)
    out_len = mel_len - feat_len
    for b in range(batch):
        if total_tokens[b] <= held_back:
            raise ValueError(f"row {b}: {total_tokens[b]} tokens in all, but finalize=False holds back "
                             f"{held_back} look-ahead tokens")
        if out_len[b] < 0:
            raise ValueError(f"row {b}: prompt_feat has {feat_len[b]} frames but the tokens give only "
                             f"{mel_len[b]} mel frames (upstream fails here)")
        if out_len[b] == 0:
            raise ValueError(f"row {b}: nothing to generate ({mel_len[b]} mel frames, all prompt)")
        if mel_len[b] > noise.shape[2]:
            raise ValueError(f"row {b}: {mel_len[b]} mel frames exceed the {noise.shape[2]}-frame noise buffer")

    num_tokens = token_bucket(int(total_tokens.max()))
    frames = cfg.token_mel_ratio * num_tokens
    tokens = np.zeros((batch, num_tokens), np.int32)
    feat = np.zeros((batch, frames, channels), np.float32)
    for b in range(batch):
        np_, nt = prompt_token_len[b], token_len[b]
        tokens[b, :np_] = prompt_token[b, :np_]
        tokens[b, np_:np_ + nt] = token[b, :nt]
        feat[b, :feat_len[b]] = prompt_feat[b, :feat_len[b]]
    noise_t = np.zeros((1, frames, channels), np.float32)  # frames past the buffer are never valid
    used = min(frames, noise.shape[2])
    noise_t[0, :used] = np.transpose(noise[0, :, :used])
    mel, _ = run_program(programs, _flow_core, params, tokens, total_tokens.astype(np.int32), feat,
                         feat_len.astype(np.int32), mel_len.astype(np.int32), embedding.astype(np.float32), noise_t,
                         cfg=cfg, streaming=bool(streaming), trajectory=False, precision=precision)
    # Sliced on the host: a device slice to a request-dependent length would compile per length.
    return np.asarray(mel)[:, :int(out_len.max())]


def programs(cfg: FlowConfig, params: Any, *, max_tokens: int, batch: int = 1, streaming: bool = False,
             precision: Precision = FLOAT32) -> list[tuple[Any, tuple, dict]]:
    """Every ``_flow_core`` program ``flow_inference`` can run for up to ``max_tokens`` prompt + target
    tokens: (function, argument specs, static arguments) per token bucket (``cosyjax.programs``)."""
    p = specs_of(params)
    i32, f32 = np.int32, np.float32
    out = []
    for n in bucket_table(max_tokens, TOKEN_BUCKET_MIN):
        frames = cfg.token_mel_ratio * n
        args = (p, jax.ShapeDtypeStruct((batch, n), i32), jax.ShapeDtypeStruct((batch,), i32),
                jax.ShapeDtypeStruct((batch, frames, cfg.output_size), f32), jax.ShapeDtypeStruct((batch,), i32),
                jax.ShapeDtypeStruct((batch,), i32), jax.ShapeDtypeStruct((batch, cfg.spk_embed_dim), f32),
                jax.ShapeDtypeStruct((1, frames, cfg.output_size), f32))
        out.append((_flow_core, args, dict(cfg=cfg, streaming=bool(streaming), trajectory=False, precision=precision)))
    return out
