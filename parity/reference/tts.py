"""Groups ``tts`` and ``tts_stream``: upstream CosyVoice3Model.tts end to end with a forced LLM output."""

from __future__ import annotations

from typing import Any

import numpy as np

from cosyjax.parity.reference.capture import Arrays
from cosyjax.parity.reference.config import MakeCaseError


# CosyVoice3Model.silent_tokens (cosyvoice/cli/model.py); the filter keeps a run's first 5.
_SILENT_TOKENS = (1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323)
_MAX_SILENT_RUN = 5


def _e2e_tokens(cfg: dict[str, Any], seed: int) -> tuple[Any, dict[str, Any]]:
    """The forced LLM output of the tts groups: random codes with one run of silent tokens.

    Drawn from its own generator so the other groups' inputs are unchanged.  The default length is
    the fewest tokens (after the silent-token filter) for which the first stream request runs two
    hops (base + pad, 2 base) and the second, starting at upstream's stale hop 4 base, runs one
    (4 base + its own pad), each plus the look-ahead: short, to keep the case small.
    """
    import torch

    e = cfg["e2e_case"]
    s = cfg["speech_token_size"]
    base = cfg["chunk_size"]
    p = cfg["case"]["prompt_speech_len"]
    pad = -(-p // base) * base - p
    silent = [t for t in _SILENT_TOKENS if t < s]
    run = e["silent_run"] if silent else 0
    max_hop = 4 * base
    pad_max = -(-p // max_hop) * max_hop - p
    n = e["speech_len"] or (max(pad + 3 * base, pad_max + max_hop) + cfg["pre_lookahead_len"]
                            + max(0, run - _MAX_SILENT_RUN))
    if run > n:
        raise MakeCaseError(f"e2e_case.silent_run={run} exceeds e2e_case.speech_len={n}")
    gen = torch.Generator().manual_seed(seed * 1000003 + 29)
    non_silent = torch.tensor([t for t in range(s) if t not in silent])
    tokens = non_silent[torch.randint(0, len(non_silent), (n,), generator=gen)]
    start = n // 3
    if run:
        tokens[start:start + run] = torch.tensor(silent)[torch.randint(0, len(silent), (run,), generator=gen)]
    return tokens.reshape(1, n), {"speech_len": n, "silent_run": run, "silent_run_start": start, "pad": pad}


def run_tts(models: dict[str, Any], inp: dict[str, Any], cfg: dict[str, Any], seed: int, out: Arrays
            ) -> dict[str, Any]:
    """Groups ``tts`` and ``tts_stream``: upstream ``CosyVoice3Model.tts`` (cosyvoice/cli/model.py).

    The model is built from the three stage modules (no frontend).  Its LLM is forced: the
    instance's ``llm.inference`` is replaced by a generator of a fixed token sequence (the LLM
    stage has its own groups), so upstream's ``llm_job`` (silent-token filter included), the stream
    hop schedule, ``token2wav`` (flow + mel cache + HiFT) all run unmodified.  Upstream hard-codes
    ``token_hop_len = 25`` (must match the DiT's ``static_chunk_size`` = 25 tokens * 2); for a small
    config we set the instance's ``token_hop_len`` to ``chunk_size`` and ``token_max_hop_len`` to
    4 * chunk_size (what upstream's literals are for the release), as the port derives them.
    Requests, in order, on one instance: non-stream; non-stream with ``speed``; stream (fresh hop);
    stream again (upstream's never-reset ``token_hop_len`` quirk: it starts at the max hop).
    """
    import torch
    from cosyvoice.cli.model import CosyVoice3Model

    forced, tok_info = _e2e_tokens(cfg, seed)
    speed = float(cfg["e2e_case"]["speed"])
    model = CosyVoice3Model(models["llm"], models["flow"], models["hift"], fp16=False)
    base = cfg["chunk_size"]
    model.token_hop_len = base
    model.token_max_hop_len = 4 * base
    llm_calls: list[dict[str, Any]] = []
    flow_calls: list[tuple[Any, bool, bool]] = []
    source_lens: list[int] = []
    flow_inference, hift_inference = models["flow"].inference, models["hift"].inference

    def fake_llm_inference(**kwargs):
        llm_calls.append(kwargs)
        yield from forced[0].tolist()

    def flow_spy(**kwargs):
        flow_calls.append((kwargs["token"].detach().clone(), bool(kwargs["streaming"]), bool(kwargs["finalize"])))
        return flow_inference(**kwargs)

    def hift_spy(**kwargs):
        speech, source = hift_inference(**kwargs)
        source_lens.append(int(source.shape[-1]))
        return speech, source

    args = dict(text=inp["text"].to(torch.int32), flow_embedding=inp["embedding"], llm_embedding=inp["embedding"],
                prompt_text=inp["prompt_text"].to(torch.int32),
                llm_prompt_speech_token=inp["prompt_speech"].to(torch.int32),
                flow_prompt_speech_token=inp["prompt_speech"].to(torch.int32), prompt_speech_feat=inp["prompt_feat"])
    runs: dict[str, Any] = {}
    models["llm"].inference = fake_llm_inference
    models["flow"].inference = flow_spy
    models["hift"].inference = hift_spy
    try:
        with torch.inference_mode():
            for name, stream, spd in (("offline", False, 1.0), ("speed", False, speed), ("stream", True, 1.0),
                                      ("stream_2", True, 1.0)):
                first_call = len(flow_calls)
                hop_before = model.token_hop_len
                chunks = [c["tts_speech"] for c in model.tts(**args, stream=stream, speed=spd)]
                runs[name] = {"chunks": chunks, "flow_calls": flow_calls[first_call:], "hop_before": hop_before}
    finally:
        for m in ("llm", "flow", "hift"):
            del models[m].inference  # back to the class method
    for call in llm_calls:  # upstream handed the zero-shot layout to the LLM
        for key, ref in (("text", args["text"]), ("prompt_text", args["prompt_text"]),
                         ("prompt_speech_token", args["llm_prompt_speech_token"])):
            if not torch.equal(call[key].cpu(), ref):
                raise MakeCaseError(f"tts: llm.inference got another {key} than the request's")
    flow_tokens = runs["offline"]["flow_calls"][0][0]
    n_after = tok_info["speech_len"] - max(0, tok_info["silent_run"] - _MAX_SILENT_RUN)
    if flow_tokens.shape[1] != n_after:
        raise MakeCaseError(f"tts: {flow_tokens.shape[1]} tokens reached the flow, expected {n_after} after the "
                            "silent-token filter")
    length = max(source_lens)
    sine_gen = models["hift"].m_source.l_sin_gen

    def calls_array(calls):
        return np.array([[c[0].shape[1], c[1], c[2]] for c in calls], dtype=np.int64)

    def audio(chunks):
        return torch.cat(chunks, dim=1), np.array([c.shape[1] for c in chunks], dtype=np.int64)

    out.put("tts/text", inp["text"], "(1, Lt) text ids passed to CosyVoice3Model.tts (zero-shot layout)")
    out.put("tts/prompt_text", inp["prompt_text"], "(1, Lp) prompt text ids")
    out.put("tts/llm_prompt_speech_token", inp["prompt_speech"], "(1, Np) LLM prompt speech tokens")
    out.put("tts/flow_prompt_speech_token", inp["prompt_speech"], "(1, P) flow prompt speech tokens")
    out.put("tts/prompt_speech_feat", inp["prompt_feat"], "(1, 2P, 80) flow prompt mel, time-major")
    out.put("tts/flow_embedding", inp["embedding"], "(1, spk_embed_dim) speaker embedding")
    out.put("tts/llm_tokens", forced,
            "(1, N) forced LLM output: llm.inference was replaced by a generator of these ids (random codes "
            f"with a run of {tok_info['silent_run']} silent tokens at {tok_info['silent_run_start']})")
    out.put("tts/flow_tokens", flow_tokens, "(1, N') tokens that reached the flow after upstream's silent-token filter")
    a, n = audio(runs["offline"]["chunks"])
    out.put("tts/audio", a, "(1, samples) tts(stream=False) output (one yield)")
    out.put("tts/chunk_lengths", n, "(K,) samples per yield")
    out.put("tts/speed", np.float32(speed), "speed of the second non-stream request")
    a, n = audio(runs["speed"]["chunks"])
    out.put("tts/audio_speed", a, "(1, samples) tts(stream=False, speed=tts/speed): mel resized by F.interpolate "
            "(linear, align_corners=False) to int(T/speed) frames before HiFT")
    out.put("tts/noise_rand_ini", sine_gen.rand_ini, "(1, 9) SineGen2.rand_ini of the model's HiFT")
    # The hift group already holds this buffer's first H samples (same model); store only the rest.
    held = out.arrays["hift/noise_sine_waves"].shape[1]
    if not np.array_equal(out.arrays["hift/noise_sine_waves"], sine_gen.sine_waves[:, :held].numpy()):
        raise MakeCaseError("tts: the HiFT sine_waves buffer differs from the hift group's")
    out.put("tts/noise_sine_waves_tail", sine_gen.sine_waves[:, held:max(held, length)],
            "(1, L - H, 9) SineGen2.sine_waves[:, H:L]: concatenate after hift/noise_sine_waves (1, H, 9), the same "
            "buffer's first H samples, to get the (1, L, 9) prefix; L = the longest source of any HiFT call of tts "
            "and tts_stream")
    out.put("tts/noise_samples", np.int64(length), "L, samples of sine_waves the tts groups use")
    out.put("tts_stream/token_hop_len", np.int64(base),
            "token_hop_len the fresh instance starts with (upstream literal 25 = static_chunk_size / token_mel_ratio; "
            "set to chunk_size here); token_max_hop_len = 4x, stream_scale_factor 2")
    for suffix, name in (("", "stream"), ("_2", "stream_2")):
        a, n = audio(runs[name]["chunks"])
        which = "first stream request on a fresh instance" if not suffix else (
            "second stream request on the same instance (token_hop_len not reset: starts at "
            f"{runs[name]['hop_before']})")
        out.put(f"tts_stream/audio{suffix}", a, f"(1, samples) concatenated yields of the {which}")
        out.put(f"tts_stream/chunk_lengths{suffix}", n, "(K,) samples per yield")
        out.put(f"tts_stream/flow_calls{suffix}", calls_array(runs[name]["flow_calls"]),
                "(K, 3) per flow.inference call: [target tokens, streaming, finalize]")
    return {"forced": tok_info, "hops_second_request_start": runs["stream_2"]["hop_before"],
            "stream_yields": [len(runs["stream"]["chunks"]), len(runs["stream_2"]["chunks"])],
            "noise_samples": length}
