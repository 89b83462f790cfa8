"""Groups ``flow``, ``flow_stream`` and ``flow_stream_partial``: CausalMaskedDiffWithDiT.inference with
every Euler step's estimator inputs and output captured."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from cosyjax.parity.reference.capture import Arrays, hook
from cosyjax.parity.reference.config import MakeCaseError


_FLOW_GROUPS = (("flow", False, True), ("flow_stream", True, True), ("flow_stream_partial", True, False))


def run_flow(flow: Any, inp: dict[str, Any], out: Arrays) -> dict[str, Any]:
    """The three flow groups (offline, streaming, streaming partial); returns {group: mel (1, 80, T)}."""
    import torch

    token, prompt_token = inp["speech"], inp["prompt_speech"]
    args = dict(token=token, token_len=torch.tensor([token.shape[1]], dtype=torch.int32),
                prompt_token=prompt_token, prompt_token_len=torch.tensor([prompt_token.shape[1]], dtype=torch.int32),
                prompt_feat=inp["prompt_feat"],
                prompt_feat_len=torch.tensor([inp["prompt_feat"].shape[1]], dtype=torch.int32),
                embedding=inp["embedding"])
    out.put("flow/token", token, "(1, Nt) target speech tokens")
    out.put("flow/token_len", np.array([token.shape[1]]), "(1,)")
    out.put("flow/prompt_token", prompt_token, "(1, Np)")
    out.put("flow/prompt_token_len", np.array([prompt_token.shape[1]]), "(1,)")
    out.put("flow/prompt_feat", inp["prompt_feat"], "(1, 2*Np, 80) prompt mel, time-major")
    out.put("flow/prompt_feat_len", np.array([inp["prompt_feat"].shape[1]]), "(1,)")
    out.put("flow/embedding", inp["embedding"], "(1, spk_embed_dim) raw speaker embedding (inference L2-normalises it)")

    mels = {}
    for group, streaming, finalize in _FLOW_GROUPS:
        cap: dict[str, list] = {"spk": [], "h": [], "dec": [], "est": [], "est_out": []}
        est = flow.decoder.estimator

        def on_est(_m, a, kw, o, cap=cap):
            names = ("x", "mask", "mu", "t", "spks", "cond")
            vals = dict(zip(names, a))
            vals.update({k: v for k, v in kw.items() if k in names})
            # solve_euler reuses x_in/mu_in/... buffers across steps: clone now
            cap["est"].append({k: v.detach().clone() for k, v in vals.items()})
            cap["est_out"].append(o.detach().clone())

        with contextlib.ExitStack() as stack:
            stack.enter_context(hook(flow.spk_embed_affine_layer, lambda _m, _a, o, cap=cap: cap["spk"].append(o.clone())))
            stack.enter_context(hook(flow.pre_lookahead_layer, lambda _m, _a, o, cap=cap: cap["h"].append(o.clone())))
            stack.enter_context(hook(flow.decoder, lambda _m, a, kw, o, cap=cap: cap["dec"].append(
                {k: v.detach().clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}), with_kwargs=True))
            stack.enter_context(hook(est, on_est, with_kwargs=True))
            stack.enter_context(torch.inference_mode())
            mel, _ = flow.inference(streaming=streaming, finalize=finalize, **args)
        if len(cap["dec"]) != 1 or len(cap["spk"]) != 1 or len(cap["h"]) != 1:
            raise MakeCaseError(f"{group}: expected one decoder call, got {len(cap['dec'])}")
        dec = cap["dec"][0]
        tm = dec["mu"].shape[2]
        steps = cap["est"]
        for name in ("mu", "spks", "cond", "mask"):
            for k, st in enumerate(steps):
                if not torch.equal(st[name], steps[0][name]):
                    raise MakeCaseError(f"{group}: estimator input {name} changed at Euler step {k}")
        noise = flow.decoder.rand_noise[:, :, :tm]
        g = group
        out.put(f"{g}/streaming", np.bool_(streaming), "flag passed to CausalMaskedDiffWithDiT.inference")
        out.put(f"{g}/finalize", np.bool_(finalize), "flag passed to CausalMaskedDiffWithDiT.inference")
        out.put(f"{g}/spk_proj", cap["spk"][0], "(1, 80) spk_embed_affine_layer(normalize(embedding))")
        out.put(f"{g}/h", cap["h"][0], "(1, Np+Nt', 80) pre_lookahead_layer output, before repeat_interleave(2)")
        out.put(f"{g}/mu", dec["mu"], "(1, 80, Tm) decoder mu (h repeated x token_mel_ratio, channel-major)")
        out.put(f"{g}/cond", dec["cond"], "(1, 80, Tm) prompt mel in the first 2*Np frames, zeros after")
        out.put(f"{g}/mask", dec["mask"], "(1, 1, Tm)")
        out.put(f"{g}/noise_z", noise,
                "(1, 80, Tm) initial x = CausalConditionalCFM.rand_noise[:, :, :Tm] (temperature 1); rand_noise is "
                "torch.manual_seed(0); torch.randn([1, 80, 15000]) drawn in CFM __init__ (not in state_dict)")
        n = len(steps)
        out.put(f"{g}/est_x", torch.stack([st["x"] for st in steps]),
                f"({n}, 2, 80, Tm) estimator input x per Euler step (batch row 1 is the CFG-unconditional copy)")
        out.put(f"{g}/est_mu", steps[0]["mu"], "(2, 80, Tm) estimator mu (row 1 zeros)")
        out.put(f"{g}/est_t", torch.stack([st["t"] for st in steps]), f"({n}, 2) estimator t per step")
        out.put(f"{g}/est_spks", steps[0]["spks"], "(2, 80) estimator spks (row 1 zeros)")
        out.put(f"{g}/est_cond", steps[0]["cond"], "(2, 80, Tm) estimator cond (row 1 zeros)")
        out.put(f"{g}/est_mask", steps[0]["mask"], "(2, 1, Tm)")
        out.put(f"{g}/est_out", torch.stack(cap["est_out"]), f"({n}, 2, 80, Tm) estimator (DiT) output per step")
        out.put(f"{g}/mel", mel, "(1, 80, Tm - 2*Np) CausalMaskedDiffWithDiT.inference output")
        mels[group] = mel
    return mels
