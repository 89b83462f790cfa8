"""Parity of the training losses: groups ``train_llm``, ``train_llm_lsm``, ``train_flow``, ``train_flow_stream``,
``train_dpo``.

Each group holds a padded batch, every random draw upstream's training forward made (recorded by
make-case's taps), upstream's loss and torch's autograd gradient of every parameter
(``<group>/grad/<torch key>``).  We replay the draws through ``cosyjax.train.losses`` and compare:

  lm_target, lm_input_len   (LLM) our ``prepare_llm_batch`` layout with the recorded bistream
                            flags, exactly;
  bistream / cfg_keep /     the recorded draws against upstream's rules as our sampler implements
  streaming / prompt_max    them (bistream iff draw < 0.5 and eligible; prompt bound 3*len//10; ...),
                            exactly;
  loss, acc                 relative error |ours - ref| / |ref|;
  grad/<key>                per tensor max|ours - ref| / max|ref|, after mapping our gradient to the
                            torch layout with the converter's table (linear re-layouts).

``train_llm_lsm`` and ``train_flow_stream`` take their inputs from ``train_llm`` / ``train_flow``
unless they hold their own.  ``train_dpo`` (upstream's DPO step, ``cosyjax.train.dpo``) also holds the
reference model's layouts, both models' sequence log-probs and the sft / preference / total losses;
its reference weights are ``model/llm.ref.pt``.  A tolerance is relative: the comparison's absolute bound is
``tol * max|ref|`` (reported as ``atol``; ``rel`` is the measured relative error).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.checkpoint import ConvertedModel
from cosyjax.convert import flow as convert_flow
from cosyjax.convert import llm as convert_llm
from cosyjax.convert.common import Entry, flatten_params
from cosyjax.parity.case import Case
from cosyjax.parity.compare import Comparison, compare_close, compare_equal
from cosyjax.parity.stages import GroupResult
from cosyjax.train.losses import (FlowLossDraws, PROMPT_MAX_FRACTION, bistream_eligible, flow_loss, llm_loss,
                                  prepare_llm_batch)

# Relative tolerances (loss: |d| / |ref|; gradients: max|d| / max|ref| per tensor), float32 CPU,
# measured on tests/data/tiny-train (parity/TOLERANCES.md): loss <= 1.8e-7 (both stages); LLM
# gradients <= 1.3e-6; flow gradients <= 3.1e-5 (decoder.estimator.time_embed.time_mlp.0.weight,
# whose gradient is the timestep sinusoid times the upstream gradient; others <= 1.1e-5): torch's
# float32 exp in that sinusoid is not correctly rounded (see cosyjax/flow/dit.py).  With torch's
# frequencies substituted every flow gradient is within 1.3e-6.  The acceptance bounds are
# 1e-5 (loss) and 1e-4 (gradients).
# bfloat16: weights rounded to bf16 at conversion (the LLM also computes in bf16), reference in
# float32; measured loss 2.6e-4, gradients 2.4e-2 (LLM) / 1.2e-2 (flow).  Accuracy is a ratio of
# counts; one flipped argmax in ~60 targets moves it by 0.017.
TOLERANCES = {
    "float32": {"llm": {"loss": 1e-6, "acc": 1e-6, "grad": 1e-5},
                "flow": {"loss": 1e-6, "grad": 1e-4}},
    "bfloat16": {"llm": {"loss": 1e-3, "acc": 0.05, "grad": 5e-2},
                 "flow": {"loss": 1e-3, "grad": 5e-2}},
}


def _input(case: Case, group: str, base: str, name: str) -> np.ndarray:
    own = f"{group}/{name}"
    return case.arrays[own] if own in case.arrays else case.arrays[f"{base}/{name}"]


def compare_rel(key: str, ours: Any, ref: Any, rel_tol: float) -> Comparison:
    """``compare_close`` with the bound ``rel_tol * max|ref|`` (0 when the reference is all zeros)."""
    ref = np.asarray(ref)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return compare_close(key, ours, ref, rel_tol * scale)


def _to_torch_layout(entry: Entry, ours: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
    """Invert ``entry.transform`` (a pure re-layout: transpose / reshape) on our gradient."""
    index = np.arange(int(np.prod(torch_shape)), dtype=np.int64).reshape(torch_shape)
    moved = np.asarray(entry.transform(index))
    if moved.shape != ours.shape or np.unique(moved).size != moved.size:
        raise ValueError(f"{entry.keys[0]}: transform is not a re-layout of {torch_shape} onto {ours.shape}")
    out = np.empty(index.size, ours.dtype)
    out[moved.reshape(-1)] = ours.reshape(-1)
    return out.reshape(torch_shape)


def _compare_grads(group: str, ref: dict[str, np.ndarray], grads: Any, table: list[Entry], tol: float,
                   outputs: dict[str, np.ndarray]) -> list[Comparison]:
    flat = flatten_params(grads)
    recorded = {k[len("grad/"):] for k in ref if k.startswith("grad/")}
    comparisons = []
    for entry in table:
        if len(entry.keys) != 1:
            raise ValueError(f"{entry.path}: gradient mapping needs one torch key per param, found {entry.keys}")
        key = entry.keys[0]
        name = f"{group}/grad/{key}"
        if key not in recorded:
            comparisons.append(Comparison(name, False, message="the case holds no torch gradient for this param"))
            continue
        recorded.discard(key)
        ours = _to_torch_layout(entry, np.asarray(flat[entry.path], np.float32), ref[f"grad/{key}"].shape)
        outputs[name] = ours
        comparisons.append(compare_rel(name, ours, ref[f"grad/{key}"], tol))
    for key in sorted(recorded):
        comparisons.append(Comparison(f"{group}/grad/{key}", False,
                                      message="torch gradient of a param that the converter's table does not map"))
    return comparisons


def _value_and_grad(fn: Callable, params: Any) -> tuple[Any, Any, Any]:
    (loss, aux), grads = jax.value_and_grad(fn, has_aux=True)(jax.tree.map(jnp.asarray, params))
    return loss, aux, grads


def run_llm(case: Case, group: str, model: ConvertedModel) -> GroupResult:
    """Replay one LLM training group: layout, loss, accuracy and every gradient."""
    cfg = model.config.llm
    ref = case.group(group)
    tol = TOLERANCES["bfloat16" if model.dtype == "bfloat16" else "float32"]["llm"]

    def rows(name: str) -> list[np.ndarray]:
        ids, lens = _input(case, group, "train_llm", name), _input(case, group, "train_llm", f"{name}_len")
        return [ids[b, :int(lens[b])] for b in range(ids.shape[0])]

    text, speech, instruct = rows("text_token"), rows("speech_token"), rows("instruct_token")
    flags = [bool(f) for f in ref["bistream"]]
    batch = prepare_llm_batch(cfg, text, speech, instruct, bistream=flags, pad_to=ref["lm_target"].shape[1])
    rule = np.asarray([d < 0.5 and bistream_eligible(cfg, len(t), len(s))
                       for d, t, s in zip(ref["bistream_draw"], text, speech)], np.int64)
    lsm = float(ref["lsm_weight"]) if "lsm_weight" in ref else cfg.lsm_weight
    normalized = bool(ref["length_normalized"]) if "length_normalized" in ref else cfg.length_normalized_loss
    loss, aux, grads = _value_and_grad(
        lambda p: llm_loss(p, batch, cfg=cfg, lsm_weight=lsm, length_normalized=normalized), model.params["llm"])
    outputs = {f"{group}/lm_target": batch["targets"].astype(np.int64),
               f"{group}/lm_input_len": batch["lengths"].astype(np.int64),
               f"{group}/bistream": rule, f"{group}/loss": np.float32(loss), f"{group}/acc": np.float32(aux["acc"])}
    comparisons = [compare_equal(f"{group}/lm_target", outputs[f"{group}/lm_target"], ref["lm_target"]),
                   compare_equal(f"{group}/lm_input_len", outputs[f"{group}/lm_input_len"], ref["lm_input_len"]),
                   compare_equal(f"{group}/bistream#rule", rule, ref["bistream"]),
                   compare_rel(f"{group}/loss", outputs[f"{group}/loss"], ref["loss"], tol["loss"]),
                   compare_close(f"{group}/acc", outputs[f"{group}/acc"], ref["acc"], tol["acc"])]
    comparisons += _compare_grads(group, ref, grads, convert_llm.param_table(cfg), tol["grad"], outputs)
    return GroupResult(outputs=outputs, comparisons=comparisons)


def run_flow(case: Case, group: str, model: ConvertedModel) -> GroupResult:
    """Replay one flow training group with upstream's recorded draws: loss and every gradient."""
    cfg = model.config.flow
    ref = case.group(group)
    tol = TOLERANCES["bfloat16" if model.dtype == "bfloat16" else "float32"]["flow"]
    batch = {name: _input(case, group, "train_flow", name) for name in
             ("speech_token", "speech_token_len", "speech_feat", "speech_feat_len", "embedding")}
    batch["speech_feat"] = batch["speech_feat"].astype(np.float32)
    batch["embedding"] = batch["embedding"].astype(np.float32)
    draws = FlowLossDraws(streaming=np.bool_(ref["streaming"]), prompt_len=ref["prompt_len"].astype(np.int32),
                          t=ref["t"].astype(np.float32), z=np.transpose(ref["z"], (0, 2, 1)).astype(np.float32),
                          cfg_keep=ref["cfg_keep"].astype(bool))
    loss, _, grads = _value_and_grad(
        lambda p: flow_loss(p, batch, jax.random.key(0), cfg=cfg, draws=draws, deterministic=True),
        model.params["flow"])
    # Upstream's sampling rules as our sampler implements them, checked on what upstream drew.
    num, den = PROMPT_MAX_FRACTION
    drawn = ref["prompt_max"] >= 0
    prompt_max = np.where(drawn, num * batch["speech_feat_len"].astype(np.int64) // den, -1)
    outputs = {f"{group}/loss": np.float32(loss), f"{group}/prompt_max": prompt_max,
               f"{group}/cfg_keep": (ref["cfg_rand"] > cfg.training_cfg_rate).astype(np.int64)}
    comparisons = [
        compare_equal(f"{group}/streaming#rule", np.bool_(ref["streaming_draw"] < 0.5), ref["streaming"]),
        compare_equal(f"{group}/prompt_draw#rule", ref["prompt_draw"] >= 0.5, drawn),
        compare_equal(f"{group}/prompt_max", prompt_max, ref["prompt_max"]),
        compare_equal(f"{group}/cfg_keep", outputs[f"{group}/cfg_keep"], ref["cfg_keep"]),
        compare_rel(f"{group}/loss", outputs[f"{group}/loss"], ref["loss"], tol["loss"]),
    ]
    comparisons += _compare_grads(group, ref, grads, convert_flow.param_table(cfg), tol["grad"], outputs)
    return GroupResult(outputs=outputs, comparisons=comparisons)


def reference_params(case: Case, cfg: Any) -> dict[str, Any]:
    """The DPO group's frozen reference LLM (``model/llm.ref.pt``) through the converter's table."""
    import os

    from cosyjax.convert.common import load_state_dict
    from cosyjax.parity.reference.train import REF_FILE

    path = os.path.join(case.model_dir, REF_FILE)
    return convert_llm.convert(load_state_dict(path), cfg, path)


def dpo_batch(case: Case, group: str, cfg: Any) -> dict[str, np.ndarray]:
    """The group's rows laid out as ``dpo_loss`` takes them, with the recorded bistream flags of each model."""
    ref = case.group(group)

    def rows(name: str) -> list[np.ndarray]:
        ids, lens = ref[name], ref[f"{name}_len"]
        return [ids[b, :int(lens[b])] for b in range(ids.shape[0])]

    text, chosen, rejected = rows("text_token"), rows("speech_token"), rows("reject_speech_token")
    batch = {}
    for prefix, name in (("", "policy"), ("ref_", "ref")):
        flags = [bool(f) for f in ref[f"{name}_bistream"]]
        layout = prepare_llm_batch(cfg, text + text, chosen + rejected, bistream=flags,
                                   pad_to=ref[f"{name}_lm_target"].shape[1])
        half = len(text)
        for k, v in layout.items():
            batch[prefix + k] = np.stack([v[:half], v[half:]], axis=1)  # [B, 2, ...]
    return batch


def run_dpo(case: Case, group: str, model: ConvertedModel) -> GroupResult:
    """Replay the DPO group with upstream's mask (``dpo_loss(mask="upstream")``): layouts, logps, losses, gradients.

    Upstream pads each forward to its own longest row, so the policy and reference layouts keep their
    recorded lengths; the logps use the loss's own ``sequence_logps`` on the same logits.
    """
    from cosyjax.train.dpo import dpo_loss, sequence_logps
    from cosyjax.train.losses import llm_logits

    cfg = model.config.llm
    ref = case.group(group)
    tol = TOLERANCES["bfloat16" if model.dtype == "bfloat16" else "float32"]["llm"]
    batch = dpo_batch(case, group, cfg)
    ref_params = jax.tree.map(jnp.asarray, reference_params(case, cfg))
    beta = float(ref["beta"])
    loss, aux, grads = _value_and_grad(
        lambda p: dpo_loss(p, ref_params, batch, cfg=cfg, beta=beta, mask="upstream", lsm_weight=cfg.lsm_weight,
                           length_normalized=cfg.length_normalized_loss), model.params["llm"])
    outputs = {f"{group}/loss": np.float32(loss), f"{group}/sft_loss": np.float32(aux["sft_loss"]),
               f"{group}/dpo_loss": np.float32(aux["dpo_loss"]), f"{group}/acc": np.float32(aux["acc"])}
    comparisons = []
    for prefix, name, params in (("", "policy", model.params["llm"]), ("ref_", "ref", ref_params)):
        rows = np.concatenate([batch[prefix + "targets"][:, 0], batch[prefix + "targets"][:, 1]])
        lengths = np.concatenate([batch[prefix + "lengths"][:, 0], batch[prefix + "lengths"][:, 1]])
        outputs[f"{group}/{name}_lm_target"] = rows.astype(np.int64)
        outputs[f"{group}/{name}_lm_input_len"] = lengths.astype(np.int64)
        comparisons += [compare_equal(f"{group}/{name}_lm_target", rows.astype(np.int64), ref[f"{name}_lm_target"]),
                        compare_equal(f"{group}/{name}_lm_input_len", lengths.astype(np.int64),
                                      ref[f"{name}_lm_input_len"])]
        ids = np.concatenate([batch[prefix + "ids"][:, 0], batch[prefix + "ids"][:, 1]])
        is_speech = np.concatenate([batch[prefix + "is_speech"][:, 0], batch[prefix + "is_speech"][:, 1]])
        logits = llm_logits(jax.tree.map(jnp.asarray, params), ids, is_speech, lengths, cfg=cfg, pad_value=-1.0)
        logps = np.asarray(sequence_logps(logits, rows, mask="upstream"))
        half = len(logps) // 2
        for key, value in ((f"{prefix}chosen_logps", logps[:half]), (f"{prefix}rejected_logps", logps[half:])):
            outputs[f"{group}/{key}"] = value
            comparisons.append(compare_rel(f"{group}/{key}", value, ref[key], tol["loss"]))
    # The preference loss moves by at most beta * |d z| for an error d z in its logit-ratio difference
    # z = (pc - pr) - (rc - rr): its bound is beta times four logps bounds (each checked above at tol * |logp|).
    logp_scale = max(float(np.max(np.abs(ref[k]))) for k in
                     ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"))
    dpo_atol = beta * 4 * tol["loss"] * logp_scale
    sft_atol = tol["loss"] * abs(float(ref["sft_loss"]))
    comparisons += [compare_rel(f"{group}/sft_loss", outputs[f"{group}/sft_loss"], ref["sft_loss"], tol["loss"]),
                    compare_close(f"{group}/dpo_loss", outputs[f"{group}/dpo_loss"], ref["dpo_loss"], dpo_atol),
                    compare_close(f"{group}/loss", outputs[f"{group}/loss"], ref["loss"], dpo_atol + sft_atol)]
    comparisons.append(compare_close(f"{group}/acc", outputs[f"{group}/acc"], ref["acc"], tol["acc"]))
    comparisons += _compare_grads(group, ref, grads, convert_llm.param_table(cfg), tol["grad"], outputs)
    return GroupResult(outputs=outputs, comparisons=comparisons)


RUNNERS = {"train_llm": run_llm, "train_llm_lsm": run_llm, "train_flow": run_flow, "train_flow_stream": run_flow,
           "train_dpo": run_dpo}
