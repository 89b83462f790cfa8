"""DPO for the LLM: upstream's ``Qwen2LM.forward_dpo`` + ``DPOLoss`` against a frozen reference model.

Upstream (``cosyvoice/bin/train.py --dpo --ref_model``; ``cosyvoice/utils/train_utils.py::batch_forward``):

- a batch of B (text, chosen speech, rejected speech) rows is laid out as 2B LLM rows, chosen then
  rejected, with the text repeated and no instruct tokens, each row unistream or bistream by its own
  draw (``prepare_lm_input_target``); the reference model's forward draws its own layouts;
- per row, the mean log-probability ``logp`` of the row's targets (see *mask* below), for the policy
  and (no gradient) for the reference;
- ``DPOLoss(beta=0.01, label_smoothing=0, ipo=False)``: ``z = (pc - pr) - (rc - rr)``, row loss
  ``-logsigmoid(beta z) (1 - ls) - logsigmoid(-beta z) ls`` (IPO: ``(z - 1 / (2 beta))^2``), averaged
  over rows; rewards ``beta (pc - rc)``, ``beta (pr - rr)``;
- the step's loss is ``dpo_loss + sft_loss``, sft_loss the usual ``LabelSmoothingLoss`` on the chosen
  rows; logged: sft_loss, dpo_loss, dpo_acc (chosen reward > rejected reward), the mean rewards.

Mask.  Upstream's ``chosen_lm_mask = chosen_lm_target == IGNORE_ID`` averages the log-probability of
token 0 over the positions *without* a target (text, the bistream fill positions, padding), not over
the speech targets (reported upstream as CV#1449).  That mean depends on the padded length and on
what the LLM computes at padded positions (upstream pads lm_input with -1.0).  ``mask="upstream"``
reproduces it exactly (given the same padded length; parity group ``train_dpo``); the default
``mask="target"`` averages over the target positions, which is what the DPO objective means and what
padding and bucketing cannot change.

CosyVoice3LM specifics upstream's forward_dpo does not handle (it was written for CosyVoice2's Qwen2LM:
it reads ``llm_embedding``, which CosyVoice3LM does not have, and builds the empty instruct embedding
with a hard-coded width of 896): sos and task_id come from ``speech_embedding`` as in
``CosyVoice3LM.forward``, and the instruct part is empty at the model's width.

Legend: B preference rows (each a chosen and a rejected LLM row), T layout length, V outputs.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from cosyjax.config import LLMConfig
from cosyjax.train.losses import IGNORE_ID, label_smoothing_loss, llm_logits

Array = jax.Array
MASKS = ("target", "upstream")
UPSTREAM_BETA = 0.01  # cosyvoice/bin/train.py: DPOLoss(beta=0.01, label_smoothing=0.0, ipo=False)


def sequence_logps(logits: Array, targets: Array, *, mask: str = "target") -> Array:
    """Per-row mean log-probability of the targets, ``forward_dpo``'s chosen_logps / rejected_logps.

    Args:
      logits: [R, T, V] float32.  targets: [R, T] with IGNORE_ID where no target (padding included).
      mask: "target" (over the target positions) or "upstream" (over the IGNORE_ID positions, of
        token 0; see the module docstring).
    Returns:
      [R] float32 (0 for a row with no position in its mask).
    """
    if mask not in MASKS:
        raise ValueError(f"mask={mask!r}: expected one of {MASKS}")
    ignored = targets == IGNORE_ID
    keep = ~ignored if mask == "target" else ignored
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(ignored, 0, targets)[..., None], axis=-1)[..., 0]  # [R, T]
    count = jnp.sum(keep, axis=-1)
    return jnp.sum(jnp.where(keep, picked, 0.0), axis=-1) / jnp.maximum(count, 1).astype(jnp.float32)


def preference_loss(policy_chosen: Array, policy_rejected: Array, ref_chosen: Array, ref_rejected: Array,
                    row_valid: Array, *, beta: float = UPSTREAM_BETA, label_smoothing: float = 0.0,
                    ipo: bool = False) -> tuple[Array, Array, Array]:
    """Upstream ``DPOLoss.forward`` over the valid rows: (loss, chosen_rewards [B], rejected_rewards [B])."""
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if ipo:
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        losses = -jax.nn.log_sigmoid(beta * z) * (1 - label_smoothing) - jax.nn.log_sigmoid(-beta * z) * label_smoothing
    rows = jnp.maximum(jnp.sum(row_valid), 1).astype(jnp.float32)
    loss = jnp.sum(jnp.where(row_valid, losses, 0.0)) / rows
    chosen = jax.lax.stop_gradient(beta * (policy_chosen - ref_chosen))
    rejected = jax.lax.stop_gradient(beta * (policy_rejected - ref_rejected))
    return loss, chosen, rejected


def _check_dpo_batch(batch: Mapping[str, Any]) -> None:
    keys = ("ids", "is_speech", "targets", "lengths")
    missing = [p + k for p in ("", "ref_") for k in keys if p + k not in batch]
    if missing:
        raise ValueError(f"dpo batch: missing key(s) {', '.join(missing)} (see cosyjax.train.data.pad_llm_batch)")
    ids = batch["ids"]
    if ids.ndim != 3 or ids.shape[1] != 2:
        raise ValueError(f"dpo batch: ids has shape {ids.shape}; expected [B, 2, T] (axis 1: chosen, rejected)")
    for p in ("", "ref_"):
        for k in ("is_speech", "targets"):
            if batch[p + k].shape != ids.shape:
                raise ValueError(f"dpo batch: {p}{k} has shape {batch[p + k].shape}, ids {ids.shape}")
        if batch[p + "ids"].shape != ids.shape or batch[p + "lengths"].shape != ids.shape[:2]:
            raise ValueError(f"dpo batch: {p}ids / {p}lengths shapes {batch[p + 'ids'].shape} / "
                             f"{batch[p + 'lengths'].shape} do not fit ids {ids.shape}")


def _rows(x: Any) -> Array:
    """[B, 2, ...] -> [2B, ...]: chosen rows, then rejected rows (forward_dpo's order)."""
    x = jnp.asarray(x)
    return jnp.concatenate([x[:, 0], x[:, 1]], axis=0)


def dpo_loss(params: Mapping[str, Any], ref_params: Mapping[str, Any], batch: Mapping[str, Any], *,
             cfg: LLMConfig, beta: float = UPSTREAM_BETA, label_smoothing: float = 0.0, ipo: bool = False,
             mask: str = "target", lsm_weight: float = 0.0,
             length_normalized: bool = True) -> tuple[Array, dict[str, Array]]:
    """``forward_dpo`` + ``DPOLoss`` + the sft term, as upstream's DPO step.  Pure, jittable.

    Args:
      params: the policy's CosyVoice3LM params (trained).
      ref_params: the reference model's params (frozen: no gradient flows into them).
      batch: ``ids``, ``is_speech``, ``targets`` [B, 2, T], ``lengths`` [B, 2] for the policy and the
        same with a ``ref_`` prefix for the reference (its own layout draws); axis 1 is (chosen,
        rejected) of one text (``cosyjax.train.data.pad_llm_batch``).
      beta, label_smoothing, ipo: ``DPOLoss`` arguments (upstream: 0.01, 0, False).
      mask: "target" or "upstream" (see the module docstring).  Static.
      lsm_weight, length_normalized: the sft term's ``LabelSmoothingLoss`` (upstream: the yaml's).
    Returns:
      (dpo_loss + sft_loss, {"sft_loss", "dpo_loss", "acc", "dpo_acc", "chosen_reward", "reject_reward",
      "num_tokens", "num_rows"}); rows without targets (bucket padding) are left out of every mean.
    """
    if mask not in MASKS:
        raise ValueError(f"mask={mask!r}: expected one of {MASKS}")
    _check_dpo_batch(batch)
    pad_value = float(IGNORE_ID) if mask == "upstream" else None
    half = batch["ids"].shape[0]

    def logps(p, prefix):
        lengths = _rows(batch[prefix + "lengths"]).astype(jnp.int32)
        targets = _rows(batch[prefix + "targets"]).astype(jnp.int32)
        logits = llm_logits(p, _rows(batch[prefix + "ids"]).astype(jnp.int32),
                            _rows(batch[prefix + "is_speech"]).astype(bool), lengths, cfg=cfg, pad_value=pad_value)
        return logits, targets, lengths, sequence_logps(logits, targets, mask=mask)

    logits, targets, lengths, policy = logps(params, "")
    _, _, _, ref = logps(jax.lax.stop_gradient(ref_params), "ref_")
    ref = jax.lax.stop_gradient(ref)
    sft, aux = label_smoothing_loss(logits[:half], targets[:half], lengths[:half], lsm_weight=lsm_weight,
                                    length_normalized=length_normalized)
    row_valid = jnp.any(targets[:half] != IGNORE_ID, axis=1)
    pref, chosen_reward, reject_reward = preference_loss(policy[:half], policy[half:], ref[:half], ref[half:],
                                                         row_valid, beta=beta, label_smoothing=label_smoothing,
                                                         ipo=ipo)
    rows = jnp.maximum(jnp.sum(row_valid), 1).astype(jnp.float32)

    def row_mean(x):
        return jnp.sum(jnp.where(row_valid, x, 0.0)) / rows

    return pref + sft, {"sft_loss": jax.lax.stop_gradient(sft), "dpo_loss": jax.lax.stop_gradient(pref),
                        "acc": aux["acc"], "dpo_acc": row_mean((chosen_reward > reject_reward).astype(jnp.float32)),
                        "chosen_reward": row_mean(chosen_reward), "reject_reward": row_mean(reject_reward),
                        "num_tokens": aux["num_tokens"], "num_rows": jnp.sum(row_valid.astype(jnp.int32))}


__all__ = ["MASKS", "UPSTREAM_BETA", "dpo_loss", "preference_loss", "sequence_logps"]
