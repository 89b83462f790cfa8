"""Groups ``llm`` (teacher-forced logits, KV-cache decode) and ``llm_greedy`` (argmax decode), and the
llm_decoder row gains that make a random-weight greedy run stop by a token."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from cosyjax.parity.reference.capture import Arrays, hook
from cosyjax.parity.reference.config import MakeCaseError


def lm_prefix(lm: Any, prompt_text: Any, text: Any, prompt_speech: Any) -> Any:
    """Upstream ``Qwen2LM.inference``'s lm_input for CosyVoice3LM: [sos, text, task_id, prompt speech].

    Built with the same module calls as upstream; ``inference`` itself cannot be called because it
    asserts the full-size ``<|endofprompt|>`` id 151646, which a small vocabulary cannot hold.
    """
    import torch

    with torch.inference_mode():  # upstream's inference is decorated the same way
        text_all = torch.cat([prompt_text, text], dim=1)
        text_emb = lm.llm.model.model.embed_tokens(text_all)
        sos_emb = lm.speech_embedding.weight[lm.sos].reshape(1, 1, -1)
        task_id_emb = lm.speech_embedding.weight[lm.task_id].reshape(1, 1, -1)
        prompt_speech_emb = lm.speech_embedding(prompt_speech)
        return torch.cat([sos_emb, text_emb, task_id_emb, prompt_speech_emb], dim=1)


def _decode_loop(lm: Any, prefix: Any, min_len: int, max_len: int,
                 choose: Callable[[int, Any], int]) -> dict[str, Any]:
    """Run upstream ``Qwen2LM.inference_wrapper`` with ``choose(step, scores)`` as the sampler.

    Captures the llm_decoder output of every step (forward hook) and the scores as handed to the
    sampler (after upstream's min_len masking of index speech_token_size).
    """
    import torch

    step_logits: list[Any] = []
    step_scores: list[Any] = []
    chosen: list[int] = []

    def sampler(weighted_scores, decoded_tokens, sampling):  # upstream's self.sampling signature
        step_scores.append(weighted_scores.detach().clone())
        tok = int(choose(len(chosen), weighted_scores))
        chosen.append(tok)
        return tok

    def on_decoder(_module, case_inputs, output):
        step_logits.append(output.detach().clone())

    saved = lm.sampling
    lm.sampling = sampler
    try:
        with hook(lm.llm_decoder, on_decoder), torch.inference_mode():
            tokens = list(lm.inference_wrapper(prefix, 25, min_len, max_len, "cosyjax-make-case"))
    finally:
        lm.sampling = saved
    return {"tokens": tokens, "chosen": chosen,
            "step_logits": torch.cat([x.reshape(1, -1) for x in step_logits], dim=0),
            "step_scores": torch.stack([x.reshape(-1) for x in step_scores], dim=0)}


def _full_logits(lm: Any, lm_input: Any) -> tuple[Any, Any]:
    import torch

    with torch.inference_mode():
        hidden, _ = lm.llm(lm_input, torch.tensor([lm_input.shape[1]], dtype=torch.int32))
        return hidden, lm.llm_decoder(hidden)


def _greedy(lm: Any, prefix: Any, min_len: int, max_len: int) -> dict[str, Any]:
    import torch

    out = _decode_loop(lm, prefix, min_len, max_len, lambda step, scores: int(torch.argmax(scores)))
    n = len(out["tokens"])
    stopped = len(out["chosen"]) == n + 1
    scores = out["step_scores"]
    top2 = torch.topk(scores, 2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    raw = torch.log_softmax(out["step_logits"], dim=-1)
    changed = [i for i in range(min(min_len, scores.shape[0])) if int(torch.argmax(raw[i])) != out["chosen"][i]]
    out.update(n_tokens=n, stopped_by_token=stopped, stop_token=out["chosen"][-1] if stopped else -1,
               min_top2_margin=margin, min_len_mask_changed_steps=changed)
    return out


def _set_row_gain(lm: Any, w0: Any, speech_token_size: int, gain: dict[str, float]) -> None:
    import torch

    scale = torch.ones(w0.shape[0], 1)
    scale[speech_token_size] = gain["sos"]
    scale[speech_token_size + 1] = gain["eos"]
    scale[speech_token_size + 2:] = gain["special"]
    with torch.no_grad():
        lm.llm_decoder.weight.copy_(w0 * scale)


def choose_decoder_gain(lm: Any, prefix: Any, min_len: int, max_len: int, cfg: dict[str, Any],
                        log: Callable[[str], None]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Scale llm_decoder's special rows so argmax decoding stops by a token within max_len.

    With random weights the 200 special rows (all stop ids) against speech_token_size speech rows
    make a greedy run stop at once or never.  Gains are tried in the order special (outer), eos,
    sos (inner); the first whose greedy run stops by a token after min_len with a top-2 score margin
    >= greedy_min_margin where the min_len mask changed an argmax (upstream's quirk exercised) is
    kept; else the first clean run after min_len; else the first that stops earlier with that
    margin.  The gains are applied to the weights that llm.pt stores.
    """
    import itertools

    gains = cfg["llm_decoder_row_gain"]
    s = cfg["speech_token_size"]
    w0 = lm.llm_decoder.weight.detach().clone()
    best = fallback = None
    tried = []
    for g_special, g_eos, g_sos in itertools.product(gains["special"], gains["eos"], gains["sos"]):
        gain = {"sos": float(g_sos), "eos": float(g_eos), "special": float(g_special)}
        _set_row_gain(lm, w0, s, gain)
        res = _greedy(lm, prefix, min_len, max_len)
        tried.append({**gain, "n_tokens": res["n_tokens"], "stopped_by_token": res["stopped_by_token"],
                      "min_top2_margin": res["min_top2_margin"],
                      "min_len_mask_changed_steps": res["min_len_mask_changed_steps"]})
        log(f"  llm_decoder row gains {gain}: {res['n_tokens']} tokens, stopped_by_token="
            f"{res['stopped_by_token']}, min top-2 margin {res['min_top2_margin']:.3g}, min_len mask changed "
            f"steps {res['min_len_mask_changed_steps']}")
        if res["stopped_by_token"] and res["min_top2_margin"] >= cfg["greedy_min_margin"]:
            if res["n_tokens"] >= min_len:
                if res["min_len_mask_changed_steps"]:  # upstream's min_len quirk is exercised: take it
                    return gain, tried
                best = best or gain
            fallback = fallback or gain
    fallback = best or fallback
    if fallback is None:
        raise MakeCaseError(f"no llm_decoder_row_gain in {gains} makes the greedy run stop by a token within "
                            f"max_len={max_len} with a top-2 margin >= {cfg['greedy_min_margin']}: {tried}; "
                            "try other gains or another seed")
    _set_row_gain(lm, w0, s, fallback)
    return fallback, tried


def run_llm(lm: Any, inp: dict[str, Any], out: Arrays) -> dict[str, Any]:
    """Group ``llm``: full-sequence logits and the KV-cache decode loop teacher-forced with the case's speech."""
    import torch

    text_len = inp["text"].shape[1]
    nt = inp["speech"].shape[1]
    min_len, max_len = int(text_len * 2), int(text_len * 20)
    prefix = lm_prefix(lm, inp["prompt_text"], inp["text"], inp["prompt_speech"])
    with torch.inference_mode():
        lm_input = torch.cat([prefix, lm.speech_embedding(inp["speech"])], dim=1)
    hidden, logits = _full_logits(lm, lm_input)
    p = prefix.shape[1]
    positions = torch.arange(p - 1, p - 1 + nt)
    logp = torch.log_softmax(logits[0, positions], dim=-1)
    target = inp["speech"][0].tolist()
    stop = lm.speech_token_size + 1  # any id >= speech_token_size ends upstream's loop

    step = _decode_loop(lm, prefix, min_len, max_len, lambda i, _scores: target[i] if i < nt else stop)
    if step["tokens"] != target:
        raise MakeCaseError("llm: the teacher-forced decode loop did not yield the target tokens")
    step_logits = step["step_logits"][:nt]
    step_scores = step["step_scores"][:nt]
    kv_diff = float((step_logits - logits[0, positions]).abs().max())

    v = lm.speech_token_size + 200
    out.put("llm/prompt_text", inp["prompt_text"], "prompt text token ids (1, Lp)")
    out.put("llm/text", inp["text"], "target text token ids (1, Lt)")
    out.put("llm/prompt_speech_token", inp["prompt_speech"], "prompt speech token ids (1, Np)")
    out.put("llm/speech_token", inp["speech"], "target speech token ids, teacher-forced (1, Nt)")
    out.put("llm/lm_input", lm_input,
            "(1, T, H) = [sos_emb, embed_tokens(prompt_text+text), task_id_emb, speech_embedding(prompt_speech), "
            "speech_embedding(speech)]; sos=speech_token_size+0, task_id=speech_token_size+2 rows of speech_embedding")
    out.put("llm/hidden", hidden, "(1, T, H) Qwen2Encoder.forward output = HF hidden_states[-1] (after final RMSNorm)")
    out.put("llm/logits", logits, f"(1, T, speech_token_size+200={v}) llm_decoder(hidden), full sequence, no KV cache")
    out.put("llm/speech_pred_positions", positions,
            "positions of llm/logits whose next-token prediction is speech_token[j], j=0..Nt-1 "
            "(first one is the last prefix position)")
    out.put("llm/speech_logp", logp, "(Nt, V) log_softmax of logits at speech_pred_positions")
    out.put("llm/step_logits", step_logits,
            "(Nt, V) llm_decoder output per step of upstream inference_wrapper (KV-cache decode, "
            "forward_one_step), teacher-forced with llm/speech_token")
    out.put("llm/step_scores", step_scores,
            "(Nt, V) log_softmax as handed to the sampler; for step < min_len upstream sets index "
            "speech_token_size (= sos for CosyVoice3LM!) to -inf")
    out.put("llm/min_len", np.int64(min_len), "int((text_len) * 2) as in Qwen2LM.inference (prompt text excluded)")
    return {"kv_cache_max_abs_diff": kv_diff}


def run_llm_greedy(lm: Any, inp: dict[str, Any], out: Arrays) -> dict[str, Any]:
    """Group ``llm_greedy``: upstream's decode loop with argmax as the sampler, until a stop id or max_len."""
    import torch

    text_len = inp["text"].shape[1]
    min_len, max_len = int(text_len * 2), int(text_len * 20)
    prefix = lm_prefix(lm, inp["prompt_text"], inp["text"], inp["prompt_speech"])
    res = _greedy(lm, prefix, min_len, max_len)
    tokens = torch.tensor([res["tokens"]], dtype=torch.int64).reshape(1, -1)
    n = res["n_tokens"]
    # Checks: every chosen id is the argmax of the scores the sampler got, and the KV-cache logits
    # equal full-sequence logits over prefix + yielded ids.
    argmax = torch.argmax(res["step_scores"], dim=-1).tolist()
    if argmax != res["chosen"]:
        raise MakeCaseError("llm_greedy: a chosen id is not the argmax of its scores")
    with torch.inference_mode():
        full_in = torch.cat([prefix, lm.speech_embedding(tokens)], dim=1) if n else prefix
    _, full = _full_logits(lm, full_in)
    s = res["step_logits"].shape[0]
    p = prefix.shape[1]
    kv_diff = float((res["step_logits"] - full[0, p - 1:p - 1 + s]).abs().max())

    out.put("llm_greedy/lm_input", prefix,
            "(1, P, H) decode prefix = [sos_emb, embed_tokens(prompt_text+text), task_id_emb, "
            "speech_embedding(prompt_speech)] (= llm/lm_input[:, :P], no target speech)")
    out.put("llm_greedy/min_len", np.int64(min_len),
            "int(text_len * 2) as in Qwen2LM.inference (prompt text excluded); for decode step i < min_len "
            "upstream sets index speech_token_size (= sos) to -inf")
    out.put("llm_greedy/max_len", np.int64(max_len),
            "int(text_len * 20) as in Qwen2LM.inference; the loop runs at most max_len steps")
    out.put("llm_greedy/tokens", tokens,
            "(1, N) ids yielded by upstream inference_wrapper with argmax as the sampler (stop token excluded)")
    out.put("llm_greedy/step_logits", res["step_logits"],
            "(S, V) llm_decoder output per decode step; S = N+1 when a stop token ended the run (last row "
            "chose it), S = N when max_len did. tokens[i] = argmax of log_softmax(row i) with index "
            "speech_token_size set to -inf when i < min_len")
    out.put("llm_greedy/stopped_by_token", np.bool_(res["stopped_by_token"]),
            "True: the argmax at step N was an id >= speech_token_size (stop); False: the loop reached max_len")
    out.put("llm_greedy/stop_token", np.int64(res["stop_token"]),
            "the stop id chosen at the last step, -1 if max_len ended the run")
    return {"n_tokens": n, "stopped_by_token": res["stopped_by_token"], "stop_token": res["stop_token"],
            "distinct_tokens": len(set(res["tokens"])), "min_top2_margin": res["min_top2_margin"],
            "min_len_mask_changed_steps": res["min_len_mask_changed_steps"], "kv_cache_max_abs_diff": kv_diff}
