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
from cosyjax.parity import bf16
from cosyjax.parity import error_model as em
from cosyjax.parity.compare import Comparison, compare_equal, compare_probed
from cosyjax.parity.stages import GroupResult

# float32: lm_input is exact (embedding rows are copied); the other float keys' tolerances come
# from cosyjax.parity.error_model (one-ulp weight probes through our own LLM, x KAPPA).  Next to the
# values: argmax agreement where the reference's top-2 gap exceeds the tie margin 2 tau, top-k set
# agreement (k = the sampler's top_k) outside ties at the k-th value, and KL(ref || ours) per
# position within the KL a logit error of tau allows (error_model.kl_bound).
# bfloat16: bf16 compute against the float32 reference, to the targets of cosyjax.parity.bf16 (SNR
# of every float key, teacher-forced argmax agreement); the greedy decode's tokens are reported.
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


def distribution_checks(key: str, ours: np.ndarray, ref: np.ndarray, tau: float, top_k: int) -> list:
    """Argmax, top-k and KL agreement of logit rows [..., V] whose entries may each be off by ``tau``.

    Rows where the reference is -inf everywhere are skipped; -inf entries (masked ids) must coincide
    (checked by the caller) and carry no probability.
    """
    ours = np.asarray(ours, np.float64).reshape(-1, np.shape(ours)[-1])
    ref = np.asarray(ref, np.float64).reshape(-1, np.shape(ref)[-1])
    margin = em.logit_tie_margin(tau)
    finite = np.isfinite(ref)
    o = np.where(finite, ours, -np.inf)
    r = np.where(finite, ref, -np.inf)
    ranked = np.sort(r, axis=-1)[:, ::-1]
    # argmax: must agree unless the reference's two best are within the tie margin
    tie1 = (ranked[:, 0] - ranked[:, 1]) <= margin
    # top-k: the sets must agree except ids whose reference logit is within the margin of the k-th
    k = min(top_k, r.shape[-1])
    kth = ranked[:, k - 1:k]
    top_o = np.argsort(-o, axis=-1, kind="stable")[:, :k]
    top_r = np.argsort(-r, axis=-1, kind="stable")[:, :k]
    bad_topk = np.zeros(len(r), bool)
    for i in range(len(r)):
        for j in set(top_o[i]) ^ set(top_r[i]):
            if abs(r[i, j] - kth[i, 0]) > margin:
                bad_topk[i] = True
    # KL(ref || ours) per row, in float64 from the logits
    def log_softmax(x):
        m = np.max(x, -1, keepdims=True)
        z = x - m
        return z - np.log(np.sum(np.exp(z), -1, keepdims=True))
    lp, lq = log_softmax(r), log_softmax(o)
    kl = np.sum(np.where(finite, np.exp(lp) * (lp - np.where(finite, lq, 0.0)), 0.0), -1)
    limit = em.kl_bound(tau)
    out = [compare_equal(f"{key}#argmax", np.where(tie1, -1, np.argmax(o, -1)), np.where(tie1, -1, np.argmax(r, -1))),
           Comparison(f"{key}#top{k}", bool(not bad_topk.any()), atol=margin, shape=[len(r)],
                      message=(f"{int(bad_topk.sum())} of {len(r)} rows' top-{k} sets differ beyond ties"
                               if bad_topk.any() else f"top-{k} sets agree (ties within {margin:.3g} aside)"),
                      model="ties: reference logits within 2 tau of the k-th"),
           Comparison(f"{key}#kl", bool(kl.max() <= limit), atol=limit, max_abs=float(kl.max()),
                      index=[int(np.argmax(kl))], shape=[len(r)],
                      model=f"kl_bound(tau={tau:.3g}) = e^4tau (e^2tau - 1)^2 / 2")]
    return out


def _compute_llm(case: Case, group: str, model: ConvertedModel) -> dict[str, np.ndarray]:
    cfg = model.config.llm
    ref = case.group(group)
    params = jax.tree.map(jax.numpy.asarray, model.params["llm"])
    request = _request(case)
    targets = [int(t) for t in ref["speech_token"][0]]
    fwd = lm.llm_forward(params, cfg, [request], [targets])
    prefix = int(fwd["prefix_lengths"][0])
    positions = prefix - 1 + np.arange(len(targets))
    logits = fwd["logits"][0]
    speech_logp = np.asarray(jax.nn.log_softmax(logits[positions], axis=-1))
    min_len, _ = lm.length_limits(request)

    # KV-cache path, teacher-forced: prefill the prefix, then feed the target tokens one by one.
    settings = SamplerSettings(method="greedy")
    state = lm.start(params, cfg, [request], jax.random.key(0)[None], settings)
    _, step_logits = decode.decode_forced(params, state, np.asarray([targets], np.int32), cfg=cfg)
    step_logits = np.asarray(step_logits[0])
    # Step j's scores are masked while j < min_len; rows here are steps, so the step index is per row.
    scores = np.asarray(decode.step_scores(cfg, settings, step_logits, np.arange(len(targets), dtype=np.int32),
                                           np.full(len(targets), min_len, np.int32)))
    return {
        f"{group}/lm_input": fwd["lm_input"], f"{group}/hidden": fwd["hidden"],
        f"{group}/logits": fwd["logits"], f"{group}/speech_pred_positions": positions.astype(np.int64),
        f"{group}/speech_logp": speech_logp, f"{group}/step_logits": step_logits,
        f"{group}/step_scores": scores, f"{group}/min_len": np.asarray(min_len, np.int64),
    }


def _value(key: str, ours: np.ndarray, ref: np.ndarray, sigma: float | None, dtype: str):
    if dtype == "bfloat16":
        return bf16.compare_snr(key, ours, ref)
    return compare_probed(key, ours, ref, sigma)


def run_llm(case: Case, group: str, model: ConvertedModel) -> GroupResult:
    cfg = model.config.llm
    ref = case.group(group)
    dtype = model.dtype
    if dtype == "bfloat16":
        outputs, sigma = _compute_llm(case, group, model), {}
    else:
        outputs, sigma = em.probe_sigmas(lambda m, _seed: _compute_llm(case, group, m), model)
    comparisons = [compare_equal(f"{group}/lm_input", outputs[f"{group}/lm_input"], ref["lm_input"])
                   if dtype == "float32" else bf16.compare_snr(f"{group}/lm_input", outputs[f"{group}/lm_input"],
                                                               ref["lm_input"])]
    for name in ("hidden", "logits", "speech_logp", "step_logits"):
        key = f"{group}/{name}"
        comparisons.append(_value(key, outputs[key], ref[name], sigma.get(key), dtype))
    # step_scores holds -inf where the min_len mask applies: the masked entries must coincide
    # exactly, and the finite ones are compared with the tolerance (compare_close rejects -inf).
    key = f"{group}/step_scores"
    scores = outputs[key]
    ours_masked, ref_masked = np.isneginf(scores), np.isneginf(ref["step_scores"])
    comparisons.append(compare_equal(key + "#masked", ours_masked, ref_masked))
    comparisons.append(_value(key, np.where(ref_masked, 0.0, scores), np.where(ref_masked, 0.0, ref["step_scores"]),
                              sigma.get(key), dtype))
    if dtype == "bfloat16":
        comparisons.append(bf16.compare_agreement(f"{group}/step_logits#greedy_agreement",
                                                  outputs[f"{group}/step_logits"], ref["step_logits"]))
    else:
        for name in ("logits", "step_logits"):
            key = f"{group}/{name}"
            tau = em.tolerance(sigma[key], ref[name])
            comparisons.extend(distribution_checks(key, outputs[key], ref[name], tau, cfg.sampling.top_k))
    for name in ("speech_pred_positions", "min_len"):
        comparisons.append(compare_equal(f"{group}/{name}", outputs[f"{group}/{name}"], ref[name]))
    plots = [("speech log-probs (teacher-forced)", f"{group}/speech_logp"),
             ("step logits (KV-cache decode)", f"{group}/step_logits")]
    return GroupResult(outputs=outputs, comparisons=comparisons, plots=plots)


def _compute_greedy(case: Case, group: str, model: ConvertedModel) -> dict[str, np.ndarray]:
    cfg = model.config.llm
    params = jax.tree.map(jax.numpy.asarray, model.params["llm"])
    request = _request(case)
    min_len, max_len = lm.length_limits(request)
    ids, is_speech = lm.build_layout(cfg, request)
    lm_input = np.asarray(lm.embed_layout(params, ids[None], is_speech[None], cfg=cfg))
    result = lm.generate(params, cfg, [request], jax.random.key(0)[None], SamplerSettings(method="greedy"),
                         chunk_size=GREEDY_CHUNK, record_logits=True)[0]
    return {
        f"{group}/lm_input": lm_input,
        f"{group}/min_len": np.asarray(min_len, np.int64),
        f"{group}/max_len": np.asarray(max_len, np.int64),
        f"{group}/tokens": result.tokens[None].astype(np.int64),
        f"{group}/step_logits": result.step_logits,
        f"{group}/stopped_by_token": np.asarray(result.stopped_by_token),
        f"{group}/stop_token": np.asarray(result.stop_token, np.int64),
    }


def run_llm_greedy(case: Case, group: str, model: ConvertedModel) -> GroupResult:
    ref = case.group(group)
    base = _compute_greedy(case, group, model)
    key = f"{group}/step_logits"
    if model.dtype == "bfloat16":  # the free-running decode is reported; agreement is checked on llm
        n = min(len(base[f"{group}/tokens"][0]), ref["tokens"].shape[-1])
        same = float(np.mean(base[f"{group}/tokens"][0][:n] == ref["tokens"][0][:n])) if n else 1.0
        comparisons = [bf16.compare_snr(f"{group}/lm_input", base[f"{group}/lm_input"], ref["lm_input"])]
        for name in ("min_len", "max_len"):
            comparisons.append(compare_equal(f"{group}/{name}", base[f"{group}/{name}"], ref[name]))
        note = (f"free-running bf16 greedy tokens equal the reference's on {same:.1%} of the first {n} "
                "(not required; the llm group checks teacher-forced agreement)")
        return GroupResult(outputs=base, comparisons=comparisons, plots=[("greedy step logits", key)], notes=[note])
    # A probe's greedy run may take another path at a near-tie; step j's logits depend on tokens[:j],
    # so a probe's step logits count only up to the first token where its path leaves ours.
    sigma = 0.0
    for seed in range(1, em.PROBES + 1):
        probe = _compute_greedy(case, group, em.perturb_model(model, seed))
        a, b = base[f"{group}/tokens"][0], probe[f"{group}/tokens"][0]
        common = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        steps = min(common + 1, len(base[key]), len(probe[key]))
        sigma = max(sigma, float(np.max(np.abs(probe[key][:steps] - base[key][:steps]))))
    comparisons = [compare_equal(f"{group}/lm_input", base[f"{group}/lm_input"], ref["lm_input"]),
                   compare_probed(key, base[key], ref["step_logits"], sigma)]
    for name in ("tokens", "stopped_by_token", "stop_token", "min_len", "max_len"):
        comparisons.append(compare_equal(f"{group}/{name}", base[f"{group}/{name}"], ref[name]))
    return GroupResult(outputs=base, comparisons=comparisons,
                       plots=[("greedy step logits", f"{group}/step_logits")])


RUNNERS = {"llm": run_llm, "llm_greedy": run_llm_greedy}
