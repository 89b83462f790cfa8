"""Upstream-matching training losses of CosyVoice3: the LLM (``CosyVoice3LM.forward``) and the flow
(``CausalMaskedDiffWithDiT.forward`` + ``ConditionalCFM.compute_loss``).

Both losses are pure functions of the converted param pytrees (``ConvertedModel.llm`` / ``.flow``)
and a batch of padded arrays, so ``loss(params)`` equals upstream's loss on the same weights, and
``jax.grad`` of it equals torch's autograd gradients (parity groups ``train_llm`` / ``train_flow``).

LLM (``Qwen2LM.prepare_lm_input_target`` / ``forward``; ids from ``CosyVoice3LM.__init__``:
sos = S, eos = S+1, task_id = S+2, fill = S+3 with S = speech_token_size, all rows of
``speech_embedding``).  Per row, with I instruct, L text and N speech tokens:

- unistream: input ``[sos, instruct, text, task_id, speech]``, target
  ``[IGNORE] * (1 + I + L) + speech + [eos]``;
- bistream (mix_ratio = (m0, m1) = (5, 15)): input ``[sos, instruct]`` then, for each full chunk of
  m0 text tokens, ``text[m0 chunk] + speech[m1 chunk]`` with target ``[IGNORE] * (m0-1) + speech
  chunk + [fill]``; the last (partial, possibly empty) text chunk is followed by ``task_id`` and the
  remaining speech, target ``[IGNORE] * len(chunk) + rest + [eos]``.  There are ceil((L+1)/m0) chunks.
  Upstream picks bistream with probability 0.5, only for rows with N / L > m1 / m0.

Instruct and text tokens read ``embed_tokens``; sos, task_id and speech tokens read
``speech_embedding``.  The loss is ``LabelSmoothingLoss`` (KL to the smoothed one-hot over all
speech_token_size + 200 outputs; plain cross entropy at lsm_weight 0, the release config) summed over
target positions and divided by their count (``length_normalized``) or by the batch size;
accuracy is ``th_accuracy`` (argmax == target over target positions).

Flow: what upstream actually does, which differs from what its yaml suggests:

- t is drawn **uniformly** in [0, 1) (``torch.rand``); the ``t_scheduler: cosine`` setting only
  shapes the inference time grid, never the training t;
- the loss is the **mean squared error** ``sum(((pred - u) * mask)^2) / (sum(mask) * C)``
  (``F.mse_loss``); ``reg_loss_type: l1`` is never read;
- the loss mask is the *token* mask repeated ``token_mel_ratio`` times (prompt frames included;
  ``only_mask_loss`` is never read);
- ``streaming`` (chunked attention) is drawn once per batch with probability 0.5;
- per row, with probability 0.5 the row gets prompt conditioning: ``cond[:k] = feat[:k]`` with
  k uniform in ``0 .. int(0.3 * speech_feat_len)`` (both ends included), else cond is zero;
- ``y = (1 - (1 - sigma_min) t) z + t x1``, target velocity ``u = x1 - (1 - sigma_min) z``;
- classifier-free-guidance dropout: a row keeps mu, spks and cond when ``rand > training_cfg_rate``
  (rate 0.2), else all three are zeroed;
- the DiT runs with dropout (``FlowConfig.dropout``, 0.1) in training: ``deterministic=False``.

What the yaml suggests is there as opt-in research options, off by default so the loss stays
upstream's: ``sample_flow_draws(..., t_schedule="cosine")`` draws ``t = 1 - cos(pi/2 * u)`` with u
uniform (the warp upstream's inference applies to its time grid), ``flow_loss(..., loss_type="l1")``
uses ``sum(|pred - u| * mask) / (sum(mask) * C)``.

All random draws are explicit (``FlowLossDraws``) so parity replays upstream's recorded draws.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.config import FlowConfig, LLMConfig
from cosyjax.flow.flow import Flow, make_flow
from cosyjax.llm.lm import embed_layout, forward_embeddings

Array = jax.Array
IGNORE_ID = -1  # cosyvoice/utils/common.py::IGNORE_ID

# Salts of jax.random.fold_in(rng, salt) in sample_flow_draws / flow_loss.
_SALT_STREAMING, _SALT_ROWS, _SALT_DROPOUT = 0, 1, 2
_ROW_PROMPT_ON, _ROW_PROMPT_LEN, _ROW_T, _ROW_CFG, _ROW_Z = 0, 1, 2, 3, 4
PROMPT_PROBABILITY = 0.5  # CausalMaskedDiffWithDiT.forward: `if random.random() < 0.5: continue`
PROMPT_MAX_FRACTION = (3, 10)  # index = random.randint(0, int(0.3 * feat_len))
STREAMING_PROBABILITY = 0.5  # streaming = random.random() < 0.5
BISTREAM_PROBABILITY = 0.5  # Qwen2LM.prepare_lm_input_target: random.random() < 0.5 and ratio > ...


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


# --------------------------------------------------------------------------------------------
# LLM
# --------------------------------------------------------------------------------------------
def _token_row(name: str, row: Any, upper: int, index: int) -> list[int]:
    arr = np.asarray(row)
    if arr.ndim != 1:
        raise ValueError(f"{name}[{index}]: expected a 1-D sequence of token ids, found shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}[{index}]: expected integer token ids, found dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= upper))
    if bad.size:
        j = int(bad[0])
        raise ValueError(f"{name}[{index}]: id {int(arr[j])} at position {j} is outside [0, {upper})")
    return [int(v) for v in arr]


def _mix_ratio(cfg: LLMConfig) -> tuple[int, int]:
    if len(cfg.mix_ratio) != 2 or min(cfg.mix_ratio) < 1:
        raise ValueError(f"LLMConfig.mix_ratio={cfg.mix_ratio}: expected two positive integers (text, speech)")
    return int(cfg.mix_ratio[0]), int(cfg.mix_ratio[1])


def bistream_eligible(cfg: LLMConfig, text_len: int, speech_len: int) -> bool:
    """Upstream's condition ``speech_len / text_len > mix_ratio[1] / mix_ratio[0]`` (exact integers)."""
    m0, m1 = _mix_ratio(cfg)
    return speech_len * m0 > text_len * m1


def llm_row_layout(cfg: LLMConfig, text: Sequence[int], speech: Sequence[int], instruct: Sequence[int] = (),
                   bistream: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row's (ids [T] int32, is_speech [T] bool, targets [T] int32) in upstream's layout.

    ``targets[i]`` is the id that position i predicts (IGNORE_ID where there is no loss).  Ids are
    not range-checked here (``prepare_llm_batch`` does it).
    """
    text, speech, instruct = list(text), list(speech), list(instruct)
    ids = [cfg.sos] + instruct
    is_speech = [True] + [False] * len(instruct)
    targets = [IGNORE_ID] * (1 + len(instruct))
    if not bistream:
        ids += text + [cfg.task_id] + speech
        is_speech += [False] * len(text) + [True] * (1 + len(speech))
        targets += [IGNORE_ID] * len(text) + speech + [cfg.eos]
    else:
        m0, m1 = _mix_ratio(cfg)
        for j in range((len(text) + m0) // m0):  # ceil((L + 1) / m0)
            text_chunk = text[j * m0:(j + 1) * m0]
            if len(text_chunk) == m0:
                speech_chunk = speech[j * m1:(j + 1) * m1]
                if len(speech_chunk) != m1:  # upstream asserts; bistream_eligible rules it out
                    raise ValueError(f"bistream: text chunk {j} is full but speech has only {len(speech_chunk)} "
                                     f"of {m1} tokens there")
                ids += text_chunk + speech_chunk
                is_speech += [False] * m0 + [True] * m1
                targets += [IGNORE_ID] * (m0 - 1) + speech_chunk + [cfg.fill_token]
            else:
                rest = speech[j * m1:]
                ids += text_chunk + [cfg.task_id] + rest
                is_speech += [False] * len(text_chunk) + [True] * (1 + len(rest))
                targets += [IGNORE_ID] * len(text_chunk) + rest + [cfg.eos]
    assert len(ids) == len(is_speech) == len(targets)
    return np.asarray(ids, np.int32), np.asarray(is_speech, bool), np.asarray(targets, np.int32)


def prepare_llm_batch(cfg: LLMConfig, text_tokens: Sequence[Sequence[int]], speech_tokens: Sequence[Sequence[int]],
                      instruct_tokens: Sequence[Sequence[int]] | None = None, *,
                      bistream: Sequence[bool] | None = None, rng: np.random.Generator | None = None,
                      pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Host-side (numpy) teacher-forcing layout of a batch, as ``Qwen2LM.prepare_lm_input_target``.

    Args:
      cfg: the LLM config (special ids, vocabularies, mix_ratio).
      text_tokens: B sequences of text ids in [0, vocab_size), each non-empty.
      speech_tokens: B sequences of speech ids in [0, speech_token_size), each non-empty.
      instruct_tokens: None or B sequences of text ids (may be empty) placed after sos.
      bistream: per-row layout flags.  When None and ``rng`` is given, drawn as upstream does: one
        ``rng.random()`` per row, bistream iff it is < 0.5 and the row is eligible (N/L > m1/m0).
        When both are None every row is unistream.
      rng: numpy Generator for the bistream draws (ignored when ``bistream`` is given).
      pad_to: padded length T (default: the longest row).
    Returns:
      {"ids": [B, T] int32, "is_speech": [B, T] bool, "targets": [B, T] int32 (IGNORE_ID where no
      loss, and at padding), "lengths": [B] int32}.  Padding has id 0 and is_speech False.
    Raises:
      ValueError for mismatched batch sizes, empty rows, ids out of range, a bistream flag on a row
      upstream would never lay out as bistream, or rows longer than ``pad_to``.
    """
    batch = len(text_tokens)
    if batch == 0:
        raise ValueError("text_tokens: empty batch")
    if len(speech_tokens) != batch:
        raise ValueError(f"speech_tokens: {len(speech_tokens)} rows for {batch} text rows")
    if instruct_tokens is not None and len(instruct_tokens) != batch:
        raise ValueError(f"instruct_tokens: {len(instruct_tokens)} rows for {batch} text rows")
    if bistream is not None and len(bistream) != batch:
        raise ValueError(f"bistream: {len(bistream)} flags for {batch} rows")
    rows = []
    for b in range(batch):
        text = _token_row("text_tokens", text_tokens[b], cfg.vocab_size, b)
        speech = _token_row("speech_tokens", speech_tokens[b], cfg.speech_token_size, b)
        instruct = [] if instruct_tokens is None else _token_row("instruct_tokens", instruct_tokens[b],
                                                                 cfg.vocab_size, b)
        if not text:
            raise ValueError(f"text_tokens[{b}]: empty row")
        if not speech:
            raise ValueError(f"speech_tokens[{b}]: empty row")
        eligible = bistream_eligible(cfg, len(text), len(speech))
        if bistream is not None:
            flag = bool(bistream[b])
            if flag and not eligible:
                raise ValueError(f"bistream[{b}]: row has {len(speech)} speech / {len(text)} text tokens; upstream "
                                 f"lays out bistream only when speech/text > {cfg.mix_ratio[1]}/{cfg.mix_ratio[0]}")
        elif rng is not None:
            flag = bool(rng.random() < BISTREAM_PROBABILITY) and eligible
        else:
            flag = False
        rows.append(llm_row_layout(cfg, text, speech, instruct, flag))
    lengths = np.asarray([len(r[0]) for r in rows], np.int32)
    length = int(lengths.max()) if pad_to is None else int(pad_to)
    if lengths.max() > length:
        raise ValueError(f"pad_to={pad_to}: row {int(np.argmax(lengths))} has {int(lengths.max())} positions")
    ids = np.zeros((batch, length), np.int32)
    is_speech = np.zeros((batch, length), bool)
    targets = np.full((batch, length), IGNORE_ID, np.int32)
    for b, (row_ids, row_speech, row_targets) in enumerate(rows):
        n = len(row_ids)
        ids[b, :n], is_speech[b, :n], targets[b, :n] = row_ids, row_speech, row_targets
    return {"ids": ids, "is_speech": is_speech, "targets": targets, "lengths": lengths}


def _check_llm_batch(cfg: LLMConfig, batch: Mapping[str, Any]) -> tuple[int, int]:
    missing = [k for k in ("ids", "is_speech", "targets", "lengths") if k not in batch]
    if missing:
        raise ValueError(f"llm batch: missing key(s) {', '.join(missing)}")
    ids, is_speech, targets, lengths = (batch[k] for k in ("ids", "is_speech", "targets", "lengths"))
    if ids.ndim != 2:
        raise ValueError(f"llm batch: ids must be [B, T], found shape {ids.shape}")
    b, t = ids.shape
    for name, arr in (("is_speech", is_speech), ("targets", targets)):
        if arr.shape != (b, t):
            raise ValueError(f"llm batch: {name} has shape {arr.shape}, ids {ids.shape}")
    if lengths.shape != (b,):
        raise ValueError(f"llm batch: lengths has shape {lengths.shape}, expected ({b},)")
    if all(_is_concrete(batch[k]) for k in ("ids", "is_speech", "targets", "lengths")):
        ids, is_speech, targets, lengths = (np.asarray(batch[k]) for k in ("ids", "is_speech", "targets", "lengths"))
        if (lengths < 1).any() or (lengths > t).any():
            raise ValueError(f"llm batch: lengths {lengths.tolist()} must lie in [1, {t}]")
        upper = np.where(is_speech, cfg.speech_vocab_size, cfg.vocab_size)
        valid = np.arange(t)[None, :] < lengths[:, None]
        bad = valid & ((ids < 0) | (ids >= upper))
        if bad.any():
            i, j = (int(v) for v in np.argwhere(bad)[0])
            raise ValueError(f"llm batch: ids[{i}, {j}]={int(ids[i, j])} is outside its table [0, {int(upper[i, j])})")
        bad = (targets != IGNORE_ID) & ((targets < 0) | (targets >= cfg.speech_vocab_size) | ~valid)
        if bad.any():
            i, j = (int(v) for v in np.argwhere(bad)[0])
            raise ValueError(f"llm batch: targets[{i}, {j}]={int(targets[i, j])} is neither IGNORE_ID nor a speech "
                             f"output id in [0, {cfg.speech_vocab_size}) at a valid position")
    return b, t


def llm_logits(params: Mapping[str, Any], ids: Array, is_speech: Array, lengths: Array, *, cfg: LLMConfig,
               pad_value: float | None = None) -> Array:
    """llm_decoder logits [B, T, V] (float32) of a token layout [B, T] with valid lengths [B].

    ``pad_value``: the lm_input value at padded positions (upstream's ``pad_sequence(...,
    padding_value=IGNORE_ID)`` gives -1.0); None keeps our padding embeddings.  Only what reads
    logits at padded positions (upstream's DPO mask) needs it.
    """
    x = embed_layout(params, ids, is_speech, cfg=cfg)  # [B, T, D]
    if pad_value is not None:
        valid = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
        x = jnp.where(valid[..., None], x, jnp.asarray(pad_value, x.dtype))
    _, logits = forward_embeddings(params, x, lengths, cfg=cfg)  # [B, T, V] float32
    return logits


def label_smoothing_loss(logits: Array, targets: Array, lengths: Array, *, lsm_weight: float = 0.0,
                         length_normalized: bool = True) -> tuple[Array, dict[str, Array]]:
    """Upstream's ``LabelSmoothingLoss`` and ``th_accuracy`` over the positions with a target.

    Args:
      logits: [B, T, V] float32.  targets: [B, T] (IGNORE_ID where no loss).  lengths: [B].
      lsm_weight, length_normalized: as ``llm_loss``.
    Returns:
      (loss, {"acc", "num_tokens", "num_rows"}); num_rows counts rows with a target (the batch size
      upstream divides by when not length-normalised; padding rows of a bucketed batch have none).
    """
    length = logits.shape[1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    valid = (targets != IGNORE_ID) & (jnp.arange(length)[None, :] < lengths[:, None])  # [B, T]
    safe = jnp.where(valid, targets, 0)
    target_logp = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]  # [B, T]
    vocab = logits.shape[-1]
    if lsm_weight == 0.0:
        per_position = -target_logp
    else:
        # KLDivLoss(log_softmax, true_dist) summed over classes, true_dist = confidence at the target
        # and lsm_weight / (V - 1) elsewhere: sum t log t - sum t logp.
        confidence, low = 1.0 - lsm_weight, lsm_weight / (vocab - 1)
        entropy_term = confidence * math.log(confidence) + (vocab - 1) * low * math.log(low)
        per_position = entropy_term - (confidence - low) * target_logp - low * jnp.sum(logp, axis=-1)
    num = jnp.sum(valid.astype(jnp.int32))
    rows = jnp.sum(jnp.any(valid, axis=1).astype(jnp.int32))
    denom = jnp.maximum(num if length_normalized else rows, 1).astype(jnp.float32)
    loss = jnp.sum(jnp.where(valid, per_position, 0.0)) / denom
    correct = jnp.sum(valid & (jnp.argmax(logits, axis=-1) == targets))
    acc = jax.lax.stop_gradient(correct.astype(jnp.float32) / jnp.maximum(num, 1).astype(jnp.float32))
    return loss, {"acc": acc, "num_tokens": num, "num_rows": rows}


def llm_loss(params: Mapping[str, Any], batch: Mapping[str, Any], *, cfg: LLMConfig, lsm_weight: float = 0.0,
             length_normalized: bool = True) -> tuple[Array, dict[str, Array]]:
    """``CosyVoice3LM.forward``'s loss and accuracy on a ``prepare_llm_batch`` batch.  Pure, jittable.

    Args:
      params: CosyVoice3LM params (``ConvertedModel.llm``).
      batch: {"ids", "is_speech", "targets": [B, T], "lengths": [B]} (other keys are ignored).
      cfg: the LLM config (static).
      lsm_weight: label smoothing (upstream ``lsm_weight``; 0 in the release config).  Static.
      length_normalized: divide by the number of target positions (True, upstream's
        ``length_normalized_loss``) or by the rows that have targets (upstream's B).  Static.
    Returns:
      (loss scalar float32, {"acc": scalar float32 (no gradient), "num_tokens", "num_rows": int32 scalars}).
      A batch without targets gives loss 0 and acc 0 (upstream would give nan).
    Raises:
      ValueError for missing keys or mismatched shapes; with concrete (non-traced) arrays also for
      ids outside their table, targets that are neither IGNORE_ID nor an output id, or bad lengths.
    """
    if not 0.0 <= lsm_weight < 1.0:
        raise ValueError(f"lsm_weight={lsm_weight} must lie in [0, 1)")
    _check_llm_batch(cfg, batch)
    lengths = jnp.asarray(batch["lengths"], jnp.int32)
    logits = llm_logits(params, jnp.asarray(batch["ids"], jnp.int32), jnp.asarray(batch["is_speech"], bool), lengths,
                        cfg=cfg)
    return label_smoothing_loss(logits, jnp.asarray(batch["targets"], jnp.int32), lengths, lsm_weight=lsm_weight,
                                length_normalized=length_normalized)


# --------------------------------------------------------------------------------------------
# Flow
# --------------------------------------------------------------------------------------------
@flax.struct.dataclass
class FlowLossDraws:
    """Every random quantity of one flow loss evaluation.

    Attributes:
      streaming: [] bool, chunked (streaming) attention for the whole batch.
      prompt_len: [B] int32, frames of ``speech_feat`` copied into cond (0 = no prompt conditioning).
      t: [B] float32 flow time in [0, 1).
      z: [B, T, C] float32 noise x0 (time-major; upstream's ``randn_like(x1)`` is [B, C, T]).
      cfg_keep: [B] bool, False where the row's mu, spks and cond are dropped (CFG training).
    """

    streaming: Array
    prompt_len: Array
    t: Array
    z: Array
    cfg_keep: Array


_FLOW_KEYS = ("speech_token", "speech_token_len", "speech_feat", "speech_feat_len", "embedding")


def _check_flow_batch(cfg: FlowConfig, batch: Mapping[str, Any]) -> tuple[int, int, int]:
    missing = [k for k in _FLOW_KEYS if k not in batch]
    if missing:
        raise ValueError(f"flow batch: missing key(s) {', '.join(missing)}")
    token, feat, emb = batch["speech_token"], batch["speech_feat"], batch["embedding"]
    if token.ndim != 2:
        raise ValueError(f"flow batch: speech_token must be [B, N], found shape {token.shape}")
    b, n = token.shape
    frames = cfg.token_mel_ratio * n
    if feat.shape != (b, frames, cfg.output_size):
        raise ValueError(f"flow batch: speech_feat has shape {feat.shape}, expected [B={b}, token_mel_ratio*N="
                         f"{frames}, {cfg.output_size}] (time-major mel, padded like the tokens)")
    if emb.shape != (b, cfg.spk_embed_dim):
        raise ValueError(f"flow batch: embedding has shape {emb.shape}, expected ({b}, {cfg.spk_embed_dim})")
    for name in ("speech_token_len", "speech_feat_len"):
        if batch[name].shape != (b,):
            raise ValueError(f"flow batch: {name} has shape {batch[name].shape}, expected ({b},)")
    for name in ("example_index", "row_valid"):
        if name in batch and batch[name].shape != (b,):
            raise ValueError(f"flow batch: {name} has shape {batch[name].shape}, expected ({b},)")
    if all(_is_concrete(batch[k]) for k in _FLOW_KEYS):
        token_len, feat_len = np.asarray(batch["speech_token_len"]), np.asarray(batch["speech_feat_len"])
        if (token_len < 1).any() or (token_len > n).any():
            raise ValueError(f"flow batch: speech_token_len {token_len.tolist()} must lie in [1, {n}]")
        if (feat_len < 0).any() or (feat_len > frames).any():
            raise ValueError(f"flow batch: speech_feat_len {feat_len.tolist()} must lie in [0, {frames}]")
        tok = np.asarray(token)
        valid = np.arange(n)[None, :] < token_len[:, None]
        if (valid & (tok >= cfg.vocab_size)).any():
            raise ValueError(f"flow batch: speech_token id {int(np.where(valid, tok, 0).max())} is outside the "
                             f"speech vocabulary [0, {cfg.vocab_size})")
        for name in ("speech_feat", "embedding"):
            if not np.isfinite(np.asarray(batch[name])).all():
                raise ValueError(f"flow batch: {name} contains NaN or inf")
    return b, n, frames


T_SCHEDULES = ("uniform", "cosine")
LOSS_TYPES = ("mse", "l1")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, choices))}")


def sample_flow_draws(rng: Array, batch: Mapping[str, Any], *, cfg: FlowConfig,
                      t_schedule: str = "uniform") -> FlowLossDraws:
    """Draw ``FlowLossDraws`` with upstream's distributions (see the module docstring).  Jittable.

    ``t_schedule``: "uniform" (upstream's training t) or "cosine" (``1 - cos(pi/2 * u)``, opt-in).

    Per-example: row b's draws come from ``fold_in(fold_in(rng, 1), i_b)`` with i_b =
    ``batch["example_index"][b]`` when present (the index in the global batch, so data-parallel
    shards draw what one device would) else b; noise frame f of a row from a further
    ``fold_in(., f)``.  So a row's draws depend on neither the batch size, the padded length, nor
    the other rows.  ``streaming`` is one draw per batch from ``fold_in(rng, 0)``.

    The prompt length k is uniform in ``0 .. floor(0.3 * speech_feat_len)`` (computed as
    ``3 * len // 10``, which is what upstream's float32 ``int(0.3 * len)`` gives).
    """
    _check_choice("t_schedule", t_schedule, T_SCHEDULES)
    batch_size, _, frames = _check_flow_batch(cfg, batch)
    index = (jnp.asarray(batch["example_index"], jnp.int32) if "example_index" in batch
             else jnp.arange(batch_size, dtype=jnp.int32))
    feat_len = jnp.asarray(batch["speech_feat_len"], jnp.int32)
    streaming = jax.random.uniform(jax.random.fold_in(rng, _SALT_STREAMING), ()) < STREAMING_PROBABILITY
    rows_key = jax.random.fold_in(rng, _SALT_ROWS)
    channels = cfg.output_size
    num, den = PROMPT_MAX_FRACTION

    def row(i, length):
        key = jax.random.fold_in(rows_key, i)
        prompt_on = jax.random.uniform(jax.random.fold_in(key, _ROW_PROMPT_ON), ()) >= PROMPT_PROBABILITY
        k = jax.random.randint(jax.random.fold_in(key, _ROW_PROMPT_LEN), (), 0, num * length // den + 1)
        t = jax.random.uniform(jax.random.fold_in(key, _ROW_T), (), jnp.float32)
        if t_schedule == "cosine":
            t = 1 - jnp.cos(t * (0.5 * jnp.pi))
        if cfg.training_cfg_rate > 0:
            keep = jax.random.uniform(jax.random.fold_in(key, _ROW_CFG), ()) > cfg.training_cfg_rate
        else:
            keep = jnp.bool_(True)
        z_key = jax.random.fold_in(key, _ROW_Z)
        z = jax.vmap(lambda f: jax.random.normal(jax.random.fold_in(z_key, f), (channels,), jnp.float32))(
            jnp.arange(frames))  # [T, C]
        return jnp.where(prompt_on, k, 0).astype(jnp.int32), t, keep, z

    prompt_len, t, keep, z = jax.vmap(row)(index, feat_len)
    return FlowLossDraws(streaming=streaming, prompt_len=prompt_len, t=t, z=z, cfg_keep=keep)


def flow_loss(params: Mapping[str, Any], batch: Mapping[str, Any], rng: Array, *, cfg: FlowConfig,
              draws: FlowLossDraws | None = None, deterministic: bool = True, t_schedule: str = "uniform",
              loss_type: str = "mse") -> tuple[Array, dict[str, Array]]:
    """``CausalMaskedDiffWithDiT.forward``'s conditional flow-matching loss.  Pure, jittable.

    Args:
      params, batch, rng, cfg, draws, deterministic, t_schedule: as for ``flow_residual``.
      loss_type: "mse" (upstream) or "l1".  Static.
    Returns:
      (loss scalar float32, {"num_frames": int32 scalar, the loss-mask frame count}).  The loss is
      the MSE over the frames ``< token_mel_ratio * speech_token_len`` and all C channels,
      ``sum(residual^2) / (num_frames * C)`` as upstream's ``F.mse_loss(reduction="sum") / (sum(mask) * C)``
      (L1: ``sum(|residual|) / (num_frames * C)``).
    Raises:
      ValueError as ``flow_residual``, and for an unknown ``loss_type``.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    err, num_frames = flow_residual(params, batch, rng, cfg=cfg, draws=draws, deterministic=deterministic,
                                    t_schedule=t_schedule)
    per_element = jnp.square(err) if loss_type == "mse" else jnp.abs(err)
    loss = jnp.sum(per_element) / (jnp.maximum(num_frames, 1) * cfg.output_size).astype(jnp.float32)
    return loss, {"num_frames": num_frames}


def flow_residual(params: Mapping[str, Any], batch: Mapping[str, Any], rng: Array, *, cfg: FlowConfig,
                  draws: FlowLossDraws | None = None, deterministic: bool = True,
                  t_schedule: str = "uniform") -> tuple[Array, Array]:
    """The masked velocity residual ``pred - u`` that ``flow_loss`` reduces.  Pure, jittable.

    Args:
      params: flow params (``ConvertedModel.flow``).
      batch: {"speech_token": [B, N] int, "speech_token_len": [B], "speech_feat": [B, T, C] float32
        with T = token_mel_ratio * N (time-major mel), "speech_feat_len": [B], "embedding": [B, E]}
        (optional "example_index" [B], see ``sample_flow_draws``; optional "row_valid" [B] bool, False for
        padding rows, which then have no loss frames; other keys are ignored).
      rng: PRNG key; the draws come from it when ``draws`` is None (``sample_flow_draws(rng, ...)``)
        and the DiT dropout from ``fold_in(rng, 2)`` (further folded with ``example_index[0]``
        when given, so shards and micro-batches draw different masks) when ``deterministic`` is
        False; dropout masks, unlike the draws, depend on the local batch shape.  Unused (may be None) when
        ``draws`` is given and ``deterministic`` is True.
      cfg: the flow config (static).
      draws: explicit random draws (parity replays upstream's).
      deterministic: False applies the DiT's training dropout (``cfg.dropout``), as upstream's
        ``train()`` mode does.  Static.
      t_schedule: "uniform" (upstream) or "cosine", for the draws made here (not for given ``draws``).
    Returns:
      (residual [B, T, C] float32, zero at frames ``>= token_mel_ratio * speech_token_len``,
      num_frames int32 scalar: the loss-mask frame count).
    Raises:
      ValueError for missing keys or mismatched shapes; with concrete arrays also for lengths out of
      range, token ids outside the vocabulary, or non-finite features.
    """
    batch_size, num_tokens, frames = _check_flow_batch(cfg, batch)
    if draws is None:
        draws = sample_flow_draws(rng, batch, cfg=cfg, t_schedule=t_schedule)
    channels = cfg.output_size
    if draws.z.shape != (batch_size, frames, channels) or draws.t.shape != (batch_size,) or \
            draws.prompt_len.shape != (batch_size,) or draws.cfg_keep.shape != (batch_size,):
        raise ValueError(f"draws: shapes z {draws.z.shape}, t {draws.t.shape}, prompt_len {draws.prompt_len.shape}, "
                         f"cfg_keep {draws.cfg_keep.shape} do not fit B={batch_size}, T={frames}, C={channels}")
    model = make_flow(cfg)
    variables = {"params": params}
    token_len = jnp.asarray(batch["speech_token_len"], jnp.int32)
    token_mask = jnp.arange(num_tokens)[None, :] < token_len[:, None]  # [B, N]
    spks, h = model.apply(variables, jnp.asarray(batch["speech_token"], jnp.int32), token_mask,
                          jnp.asarray(batch["embedding"], jnp.float32), method=Flow.encode)
    mu = jnp.repeat(h, cfg.token_mel_ratio, axis=1)  # [B, T, C]
    mel_len = cfg.token_mel_ratio * token_len  # [B]
    frame_idx = jnp.arange(frames)[None, :]
    frame_mask = (frame_idx < mel_len[:, None])[..., None]  # [B, T, 1]
    loss_len = mel_len
    if "row_valid" in batch:  # padding rows of a fixed-shape batch: no loss frames
        loss_len = jnp.where(jnp.asarray(batch["row_valid"], bool), mel_len, 0)
        frame_mask = frame_mask & (frame_idx < loss_len[:, None])[..., None]
    x1 = jnp.asarray(batch["speech_feat"], jnp.float32)
    cond = jnp.where((frame_idx < draws.prompt_len[:, None])[..., None], x1, 0.0)
    keep = draws.cfg_keep.astype(jnp.float32)
    mu, spks, cond = mu * keep[:, None, None], spks * keep[:, None], cond * keep[:, None, None]
    t = draws.t.astype(jnp.float32)
    z = draws.z.astype(jnp.float32)
    y = (1 - (1 - cfg.sigma_min) * t[:, None, None]) * z + t[:, None, None] * x1
    u = x1 - (1 - cfg.sigma_min) * z
    rngs = None
    if not deterministic:
        dropout_key = jax.random.fold_in(rng, _SALT_DROPOUT)
        if "example_index" in batch:  # a shard / micro-batch of a global batch: its own masks
            dropout_key = jax.random.fold_in(dropout_key, jnp.asarray(batch["example_index"], jnp.int32)[0])
        rngs = {"dropout": dropout_key}

    # one DiT program for both mask kinds: the streaming draw selects the chunk mask inside it
    streaming = bool(np.asarray(draws.streaming)) if _is_concrete(draws.streaming) else draws.streaming
    pred = model.apply(variables, y, mu, t, spks, cond, mel_len, streaming=streaming,
                       deterministic=deterministic, method=Flow.estimate, rngs=rngs)
    return jnp.where(frame_mask, pred - u, 0.0), jnp.sum(loss_len)


__all__ = ["IGNORE_ID", "LOSS_TYPES", "T_SCHEDULES", "FlowLossDraws", "bistream_eligible", "flow_loss", "flow_residual",
           "label_smoothing_loss", "llm_logits", "llm_loss", "llm_row_layout", "prepare_llm_batch", "sample_flow_draws"]
