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
from cosyjax.parity import bf16
from cosyjax.parity import error_model as em
from cosyjax.parity.compare import compare_equal, compare_probed
from cosyjax.parity.stages import GroupResult

# float32: copies (cond, noise_z) and the t schedule are exact; every other key's tolerance comes
# from cosyjax.parity.error_model (one-ulp weight probes through our own flow, x KAPPA).  For the DiT
# alone (est_out) a probe also moves the timestep input by one ulp, which stands for torch's float32
# exp in the timestep frequencies (not correctly rounded; multiplied by 1000 t).
EXACT = ("cond", "noise_z", "est_t")
# bfloat16: bf16 compute against the float32 reference, to the SNR targets of cosyjax.parity.bf16.


def _input(case: Case, group: str, name: str) -> np.ndarray:
    own = f"{group}/{name}"
    return case.arrays[own] if own in case.arrays else case.arrays[f"flow/{name}"]


def _compute(case: Case, group: str, model: ConvertedModel, probe: int | None) -> dict[str, np.ndarray]:
    """Our arrays for one flow group (``probe``: the seed that moves the DiT-alone timestep input)."""
    cfg = model.config.flow
    params = model.params["flow"]
    precision = bf16.precision_for(model)
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
    spk_proj, h = flow_encode(params, tokens, np.ones(tokens.shape, bool), embedding, cfg=cfg, precision=precision)
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
    est_t = em.perturb_input(ref["est_t"], probe)
    est_out = [np.asarray(estimator_forward(params, np.transpose(est_x[k], (0, 2, 1)), est_mu, est_t[k],
                                            ref["est_spks"], est_cond, lengths, cfg=cfg, streaming=streaming,
                                            precision=precision))
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
                         trajectory=True, precision=precision)
    out["mel"] = np.transpose(np.asarray(mel)[:, :frames - f1], (0, 2, 1))
    xs = np.transpose(np.asarray(xs)[:, :, :frames], (0, 1, 3, 2))  # (S, 1, C, T)
    out["est_x"] = np.concatenate([xs, xs], axis=1)
    ts, _ = cosine_t_schedule(cfg.n_timesteps)
    out["est_t"] = np.stack([ts, ts], axis=1)

    return out


def run(case: Case, group: str, model: ConvertedModel) -> GroupResult:
    """Run one flow group of ``case`` with ``model``'s flow params; compare every intermediate."""
    ref = case.group(group)
    if model.dtype == "bfloat16":
        out, sigma = _compute(case, group, model, None), {}
    else:
        # constants: the probes also move the DiT's timestep frequencies (torch's float32 exp)
        out, sigma = em.probe_sigmas(lambda m, seed: _compute(case, group, m, seed), model, constants=True)
    names = ["spk_proj", "h", "mu", "cond", "noise_z", "est_t", "est_out", "est_x", "mel"]
    comparisons = []
    for n in (n for n in names if n in ref):
        key = f"{group}/{n}"
        if n in EXACT:
            comparisons.append(compare_equal(key, out[n], ref[n]))
        elif model.dtype == "bfloat16":
            comparisons.append(bf16.compare_snr(key, out[n], ref[n]))
        else:
            comparisons.append(compare_probed(key, out[n], ref[n], sigma[n]))
    return GroupResult(outputs={f"{group}/{n}": v for n, v in out.items()}, comparisons=comparisons,
                       plots=[(f"{group} mel (frame 0..)", f"{group}/mel"),
                              (f"{group} estimator output, last step", f"{group}/est_out")])


RUNNERS = {"flow": run, "flow_stream": run, "flow_stream_partial": run}
