"""Parity runners for the LLM groups ``llm`` (teacher-forced) and ``llm_greedy`` (decode loop).

``llm``: from the case's token ids we build lm_input, run the cache-free forward (lm_input, hidden,
logits, speech_logp at the speech prediction positions), then our KV-cache decode path fed the same
target tokens (step_logits) and the scores as handed to the sampler with upstream's min_len mask
(step_scores).

``llm_greedy``: our jitted greedy decode from the prefix rebuilt from the ``llm`` group's ids
(llm/prompt_text, llm/text, llm/prompt_speech_token), in chunks of 25 steps as streaming runs.
Tokens, stop flag and stop id must match exactly.
"""

from __future__ import annotations

import jax
import numpy as np

from cosyjax.checkpoint import ConvertedModel
from cosyjax.llm import decode, lm
from cosyjax.llm.sampling import SamplerSettings
from cosyjax.parity.case import Case
from cosyjax.parity.compare import compare_close, compare_equal
from cosyjax.parity.stages import GroupResult

# Max abs error per key and param dtype.  float32: measured on tiny-a (1 thread reference, 2 thread
# XLA) at <= 3.4e-6 for hidden/logits/step_logits; the bound leaves room for deeper cases and
# thread-count noise (~1e-5, see ENV.md).  Embedding lookups are exact.  bfloat16: params and
# activations in bf16 (norm statistics, softmax, logits in float32); measured on tiny-a at <= 0.083
# for logits-like keys and 0.0077 for the bf16-rounded embeddings (|x| * 2^-8).  Exact argmax
# agreement is only required in float32: bf16 may flip near-ties.
TOLERANCES = {
    # Measured on tiny-a/tiny-b (float32): hidden 2.6e-6, logits 4.7e-6, step_* 3.8e-6.  The bound leaves
    # room for the full-size model (24 layers, 896 wide), whose logits agree with torch within 2e-5.
    "float32": {"lm_input": 0.0, "hidden": 5e-5, "logits": 5e-5, "speech_logp": 5e-5,
                "step_logits": 5e-5, "step_scores": 5e-5},
    # bf16 weights: measured lm_input 7.7e-3, hidden 6.5e-2, logits 0.106, speech_logp 6.1e-2,
    # step_logits 8.3e-2, step_scores 6.1e-2.
    "bfloat16": {"lm_input": 2e-2, "hidden": 0.15, "logits": 0.25, "speech_logp": 0.15,
                 "step_logits": 0.2, "step_scores": 0.15},
}
GREEDY_CHUNK = 25  # the streaming chunk size
# Reference arrays that are inputs to a group's run (everything else is an output we compare).
INPUT_KEYS = {"llm": ("prompt_text", "text", "prompt_speech_token", "speech_token"), "llm_greedy": ()}


def _request(case: Case) -> lm.LMRequest:
    g = case.group("llm")
    missing = [k for k in ("prompt_text", "text", "prompt_speech_token") if k not in g]
    if missing:
        raise ValueError(f"{case.path}: llm group lacks {', '.join('llm/' + k for k in missing)}")
    for k in ("prompt_text", "text", "prompt_speech_token"):
        if g[k].shape[0] != 1:
            raise ValueError(f"{case.path}: llm/{k} has batch {g[k].shape[0]}; the runner expects 1")
    return lm.LMRequest.zero_shot(g["text"][0], g["prompt_text"][0], g["prompt_speech_token"][0])


def _argmax_check(key: str, ours: np.ndarray, ref: np.ndarray):
    return compare_equal(key + "#argmax", np.argmax(ours, -1), np.argmax(ref, -1))


def run_llm(case: Case, group: str, model: ConvertedModel) -> GroupResult:
    cfg = model.config.llm
    ref = case.group(group)
    tol = TOLERANCES[model.dtype]
    params = jax.tree.map(jax.numpy.asarray, model.params["llm"])
    request = _request(case)
    targets = [int(t) for t in ref["speech_token"][0]]
    fwd = lm.llm_forward(params, cfg, [request], [targets])
    prefix = int(fwd["prefix_lengths"][0])
    positions = prefix - 1 + np.arange(len(targets))
    logits = fwd["logits"][0]
    speech_logp = np.asarray(jax.nn.log_softmax(logits[positions], axis=-1))
    min_len, max_len = lm.length_limits(request)

    # KV-cache path, teacher-forced: prefill the prefix, then feed the target tokens one by one.
    settings = SamplerSettings(method="greedy")
    state = lm.start(params, cfg, [request], jax.random.key(0)[None], settings)
    _, step_logits = decode.decode_forced(params, state, np.asarray([targets], np.int32), cfg=cfg)
    step_logits = np.asarray(step_logits[0])
    # Step j's scores are masked while j < min_len; rows here are steps, so the step index is per row.
    scores = np.asarray(decode.step_scores(cfg, settings, step_logits, np.arange(len(targets), dtype=np.int32),
                                           np.full(len(targets), min_len, np.int32)))
    outputs = {
        f"{group}/lm_input": fwd["lm_input"], f"{group}/hidden": fwd["hidden"],
        f"{group}/logits": fwd["logits"], f"{group}/speech_pred_positions": positions.astype(np.int64),
        f"{group}/speech_logp": speech_logp, f"{group}/step_logits": step_logits,
        f"{group}/step_scores": scores, f"{group}/min_len": np.asarray(min_len, np.int64),
    }
    comparisons = []
    for name in ("lm_input", "hidden", "logits", "speech_logp", "step_logits"):
        key = f"{group}/{name}"
        comparisons.append(compare_close(key, outputs[key], ref[name], tol[name]))
    # step_scores holds -inf where the min_len mask applies: the masked entries must coincide
    # exactly, and the finite ones are compared with the tolerance (compare_close rejects -inf).
    key = f"{group}/step_scores"
    ours_masked, ref_masked = np.isneginf(scores), np.isneginf(ref["step_scores"])
    comparisons.append(compare_equal(key + "#masked", ours_masked, ref_masked))
    comparisons.append(compare_close(key, np.where(ref_masked, 0.0, scores),
                                     np.where(ref_masked, 0.0, ref["step_scores"]), tol["step_scores"]))
    if model.dtype == "float32":
        for name in ("logits", "speech_logp", "step_logits", "step_scores"):
            key = f"{group}/{name}"
            comparisons.append(_argmax_check(key, outputs[key], ref[name]))
    for name in ("speech_pred_positions", "min_len"):
        comparisons.append(compare_equal(f"{group}/{name}", outputs[f"{group}/{name}"], ref[name]))
    plots = [("speech log-probs (teacher-forced)", f"{group}/speech_logp"),
             ("step logits (KV-cache decode)", f"{group}/step_logits")]
    return GroupResult(outputs=outputs, comparisons=comparisons, plots=plots)


def run_llm_greedy(case: Case, group: str, model: ConvertedModel) -> GroupResult:
    cfg = model.config.llm
    ref = case.group(group)
    tol = TOLERANCES[model.dtype]
    params = jax.tree.map(jax.numpy.asarray, model.params["llm"])
    request = _request(case)
    min_len, max_len = lm.length_limits(request)
    ids, is_speech = lm.build_layout(cfg, request)
    lm_input = np.asarray(lm.embed_layout(params, ids[None], is_speech[None], cfg=cfg))
    result = lm.generate(params, cfg, [request], jax.random.key(0)[None], SamplerSettings(method="greedy"),
                         chunk_size=GREEDY_CHUNK, record_logits=True)[0]
    outputs = {
        f"{group}/lm_input": lm_input,
        f"{group}/min_len": np.asarray(min_len, np.int64),
        f"{group}/max_len": np.asarray(max_len, np.int64),
        f"{group}/tokens": result.tokens[None].astype(np.int64),
        f"{group}/step_logits": result.step_logits,
        f"{group}/stopped_by_token": np.asarray(result.stopped_by_token),
        f"{group}/stop_token": np.asarray(result.stop_token, np.int64),
    }
    comparisons = [compare_close(f"{group}/lm_input", lm_input, ref["lm_input"], tol["lm_input"]),
                   compare_close(f"{group}/step_logits", result.step_logits, ref["step_logits"],
                                 tol["step_logits"])]
    for name in ("tokens", "stopped_by_token", "stop_token", "min_len", "max_len"):
        comparisons.append(compare_equal(f"{group}/{name}", outputs[f"{group}/{name}"], ref[name]))
    return GroupResult(outputs=outputs, comparisons=comparisons,
                       plots=[("greedy step logits", f"{group}/step_logits")])


RUNNERS = {"llm": run_llm, "llm_greedy": run_llm_greedy}
