"""Parity of the flow stage: groups ``flow``, ``flow_stream``, ``flow_stream_partial``.

Per group we compare, against the reference arrays of the same name:
  spk_proj, h, mu, cond      the front (our encode on the case's tokens, prompt mel and embedding);
  noise_z                    the converted model's fixed noise buffer, sliced to the case's frames;
  est_t                      our Euler t schedule (must be bit-exact);
  est_out                    the DiT alone, fed the reference's own est_x/est_t/est_mu/est_spks/
                             est_cond/est_mask for every step and CFG row (isolates the estimator);
  est_x                      the x our full solver fed the estimator at each step (row 0 = row 1);
  mel                        our full flow (front + solver), started from the case's noise_z.

The streaming groups hold only their flags and outputs; their inputs are the ``flow`` group's
(token, prompt_token, prompt_feat, embedding), as manifest.json's shapes show (same Np + Nt).
A group's own input array wins when present.
"""

from __future__ import annotations

import numpy as np

from cosyjax.checkpoint import ConvertedModel
from cosyjax.flow.flow import _flow_core, estimator_forward, flow_encode, token_bucket
from cosyjax.flow.solver import cosine_t_schedule
from cosyjax.parity.case import Case
from cosyjax.parity.compare import compare_close
from cosyjax.parity.stages import GroupResult

# Max abs error, float32 CPU.  The front is a handful of float32 ops (1e-5 is a few ulp at its
# magnitudes); est_out is 10 x 2 DiT evaluations on identical inputs (SPEC: <= 1e-4); est_x and
# mel carry 10 chained Euler steps with CFG amplifying differences by 1.7 + 0.7.
TOLERANCES = {
    # Measured on tiny-a/tiny-b: est_out 2.5e-5 (torch's float32 exp in the time sinusoid is not
    # correctly rounded; see cosyjax/flow/dit.py), est_x 8.3e-6, mel 8.6e-6, h/mu 1.3e-6.
    "float32": {"spk_proj": 1e-5, "h": 1e-5, "mu": 1e-5, "cond": 0.0, "noise_z": 0.0, "est_t": 0.0,
                "est_out": 1e-4, "est_x": 5e-5, "mel": 5e-5},
    # bf16 weights (rounded at conversion, run in float32): the weight rounding dominates.
    # Measured: spk_proj 6.8e-4, h/mu 1.3e-2, est_out 0.13, est_x 6.7e-2, mel 7.2e-2.
    "bfloat16": {"spk_proj": 2e-3, "h": 3e-2, "mu": 3e-2, "cond": 0.0, "noise_z": 0.0, "est_t": 0.0,
                 "est_out": 2e-1, "est_x": 1.5e-1, "mel": 1.5e-1},
}


def _input(case: Case, group: str, name: str) -> np.ndarray:
    own = f"{group}/{name}"
    return case.arrays[own] if own in case.arrays else case.arrays[f"flow/{name}"]


def run(case: Case, group: str, model: ConvertedModel) -> GroupResult:
    """Run one flow group of ``case`` with ``model``'s flow params; compare every intermediate."""
    cfg = model.config.flow
    params = model.params["flow"]
    tol = TOLERANCES["bfloat16" if model.dtype == "bfloat16" else "float32"]
    ref = case.group(group)
    streaming, finalize = bool(ref["streaming"]), bool(ref["finalize"])
    token = _input(case, group, "token")
    prompt_token = _input(case, group, "prompt_token")
    prompt_feat = _input(case, group, "prompt_feat").astype(np.float32)  # (1, F1, C)
    embedding = _input(case, group, "embedding").astype(np.float32)
    n_tokens = prompt_token.shape[1] + token.shape[1]
    n_h = n_tokens - (0 if finalize else cfg.pre_lookahead_len)
    frames = cfg.token_mel_ratio * n_h
    f1 = prompt_feat.shape[1]
    out: dict[str, np.ndarray] = {}

    # Front.
    tokens = np.concatenate([prompt_token, token], axis=1).astype(np.int32)
    spk_proj, h = flow_encode(params, tokens, np.ones(tokens.shape, bool), embedding, cfg=cfg)
    h = np.asarray(h)[:, :n_h]
    mu = np.repeat(h, cfg.token_mel_ratio, axis=1)  # [1, T, C]
    cond = np.zeros_like(mu)
    cond[:, :f1] = prompt_feat
    out["spk_proj"] = np.asarray(spk_proj)
    out["h"] = h
    out["mu"] = np.transpose(mu, (0, 2, 1))
    out["cond"] = np.transpose(cond, (0, 2, 1))
    out["noise_z"] = np.asarray(model.buffers["flow_rand_noise"], np.float32)[:, :, :frames]

    # Estimator alone, on the reference's own inputs of every step.
    est_x = ref["est_x"]  # (S, 2, C, T)
    steps = est_x.shape[0]
    lengths = ref["est_mask"][:, 0, :].sum(-1).astype(np.int32)  # (2,)
    est_mu = np.transpose(ref["est_mu"], (0, 2, 1))
    est_cond = np.transpose(ref["est_cond"], (0, 2, 1))
    est_out = [np.asarray(estimator_forward(params, np.transpose(est_x[k], (0, 2, 1)), est_mu, ref["est_t"][k],
                                            ref["est_spks"], est_cond, lengths, cfg=cfg, streaming=streaming))
               for k in range(steps)]
    out["est_out"] = np.transpose(np.stack(est_out), (0, 1, 3, 2))

    # Full flow from the case's noise, padded like flow_inference pads it.
    num_tokens = token_bucket(n_tokens)
    padded_frames = cfg.token_mel_ratio * num_tokens
    tokens_p = np.zeros((1, num_tokens), np.int32)
    tokens_p[:, :n_tokens] = tokens
    feat_p = np.zeros((1, padded_frames, cfg.output_size), np.float32)
    feat_p[:, :f1] = prompt_feat
    noise_p = np.zeros((1, padded_frames, cfg.output_size), np.float32)
    noise_p[:, :frames] = np.transpose(ref["noise_z"], (0, 2, 1))
    mel, xs = _flow_core(params, tokens_p, np.array([n_tokens], np.int32), feat_p, np.array([f1], np.int32),
                         np.array([frames], np.int32), embedding, noise_p, cfg=cfg, streaming=streaming,
                         trajectory=True)
    out["mel"] = np.transpose(np.asarray(mel)[:, :frames - f1], (0, 2, 1))
    xs = np.transpose(np.asarray(xs)[:, :, :frames], (0, 1, 3, 2))  # (S, 1, C, T)
    out["est_x"] = np.concatenate([xs, xs], axis=1)
    ts, _ = cosine_t_schedule(cfg.n_timesteps)
    out["est_t"] = np.stack([ts, ts], axis=1)

    names = ["spk_proj", "h", "mu", "cond", "noise_z", "est_t", "est_out", "est_x", "mel"]
    comparisons = [compare_close(f"{group}/{n}", out[n], ref[n], tol[n]) for n in names if n in ref]
    return GroupResult(outputs={f"{group}/{n}": v for n, v in out.items()}, comparisons=comparisons,
                       plots=[(f"{group} mel (frame 0..)", f"{group}/mel"),
                              (f"{group} estimator output, last step", f"{group}/est_out")])


RUNNERS = {"flow": run, "flow_stream": run, "flow_stream_partial": run}
