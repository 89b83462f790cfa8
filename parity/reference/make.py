"""Make a reference case (shared/golden/FORMAT.md) from the upstream PyTorch CosyVoice3 code.

``make_case(reference_repo, config_path, seed, out_dir)`` imports upstream unmodified from a source
checkout (``cosyjax.parity.upstream``), writes a release-layout model directory at the sizes a
CONFIG.yaml gives, builds the three stages through ``hyperpyyaml.load_hyperpyyaml`` exactly as
upstream's ``CosyVoice3`` does (the construction order fixes the random buffers: the flow noise and
the HiFT sine/uv buffers), gives them random weights from ``seed``, saves ``llm.pt``/``flow.pt``/
``hift.pt``, and runs every group of the case format in float32 on CPU with one torch thread and
deterministic algorithms, capturing the inputs, every intermediate listed in ``manifest.json`` and
the outputs.  It then rebuilds the model from the written directory (``load_hyperpyyaml`` + strict
``load_state_dict``) and checks that every array reproduces bitwise, and that upstream's KV-cache
decode loop agrees with the full-sequence forward.  The output directory is written atomically.

The CONFIG.yaml keys are described in ``cosyjax.parity.reference.config``; each group is captured by the
module of its stage (``llm``, ``flow``, ``hift``, ``tts``, ``train``), as ``cosyjax.parity.stages`` checks it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from cosyjax.atomic import staged_dir
from cosyjax.parity.reference.capture import Arrays, torch_reference_mode
from cosyjax.parity.reference.config import MakeCaseError, load_case_config
from cosyjax.parity.reference.flow import run_flow
from cosyjax.parity.reference.hift import run_hift, scale_hift
from cosyjax.parity.reference.llm import choose_decoder_gain, lm_prefix, run_llm, run_llm_greedy
from cosyjax.parity.reference.release import (QWEN_DIR, build_models, load_weights, randomize, render_yaml,
                                              write_qwen_dir)
from cosyjax.parity.reference.train import REF_FILE, run_train, run_train_dpo, write_dpo_reference
from cosyjax.parity.reference.tts import run_tts


def case_inputs(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Random case inputs (token ids, prompt mel, speaker embedding) from ``seed``."""
    import torch

    c, q = cfg["case"], cfg["qwen"]
    gen = torch.Generator().manual_seed(seed * 1000003 + 17)
    s = cfg["speech_token_size"]
    np_ = c["prompt_speech_len"]
    prompt_text = torch.randint(0, q["vocab_size"], (1, c["prompt_text_len"]), generator=gen)
    text = torch.randint(0, q["vocab_size"], (1, c["text_len"]), generator=gen)
    prompt_speech = torch.randint(0, s, (1, np_), generator=gen)
    speech = torch.randint(0, s, (1, c["speech_len"]), generator=gen)
    # a log-mel-like prompt: level falling with the mel index, frame-to-frame correlated
    base = -2.0 - 6.0 * torch.arange(80, dtype=torch.float32) / 79.0
    noise = torch.randn(1, 2 * np_ + 1, 80, generator=gen)
    smooth = 0.5 * (noise[:, 1:] + noise[:, :-1])
    prompt_feat = (base + 2.0 * smooth).clamp(min=-11.5129)  # log(1e-5), matcha's floor
    embedding = torch.randn(1, cfg["spk_embed_dim"], generator=gen)
    return {"prompt_text": prompt_text, "text": text, "prompt_speech": prompt_speech, "speech": speech,
            "prompt_feat": prompt_feat, "embedding": embedding}


def run_all(models: dict[str, Any], inp: dict[str, Any], hift_mel_len: int,
            e2e: tuple[dict[str, Any], int] | None = None,
            train: tuple[dict[str, Any], int] | None = None,
            dpo: tuple[dict[str, Any], int, str] | None = None) -> tuple[Arrays, dict[str, Any]]:
    """Run every group on ``models`` with the case inputs ``inp``; (golden arrays, per-group info).

    ``e2e`` / ``train`` = (case config, seed) add the tts / training groups; ``dpo`` = (case config,
    seed, model dir) the DPO group (its reference weights are read from the model dir).
    """
    out = Arrays()
    info: dict[str, Any] = {}
    info["llm"] = run_llm(models["llm"], inp, out)
    info["llm_greedy"] = run_llm_greedy(models["llm"], inp, out)
    mels = run_flow(models["flow"], inp, out)
    info["hift"] = run_hift(models["hift"], mels["flow"][:, :, :hift_mel_len].contiguous(), out)
    if e2e is not None:  # last: the groups above are unchanged by it
        info["tts"] = run_tts(models, inp, e2e[0], e2e[1], out)
    if train is not None:  # last: the groups above are unchanged by it
        info["train"] = run_train(models, train[0], train[1], out)
    if dpo is not None:  # last: the groups above are unchanged by it
        info["train_dpo"] = run_train_dpo(models["llm"], dpo[2], dpo[0], dpo[1], out)
    return out, info


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _compare(a: Arrays, b: Arrays) -> list[str]:
    bad = []
    if list(a.arrays) != list(b.arrays):
        return [f"key lists differ: {sorted(set(a.arrays) ^ set(b.arrays))}"]
    for k, x in a.arrays.items():
        y = b.arrays[k]
        if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=True):
            bad.append(k)
    return bad


def make_case(reference_repo: str, config_path: str, seed: int, out_dir: str, *, overwrite: bool = False,
              upstream_commit: str | None = None, progress: bool = True) -> str:
    """Generate a reference case directory from upstream CosyVoice3 (see the module docstring).

    Args:
      reference_repo: upstream CosyVoice source checkout (holds ``cosyvoice/``).
      config_path: CONFIG.yaml with the case sizes and lengths.
      seed: integer seed for the weights and the inputs.
      out_dir: directory to create (``model/``, ``golden.npz``, ``manifest.json``, ``meta.json``).
      overwrite: replace an existing ``out_dir``.
      upstream_commit: commit id to record; default: ``git rev-parse HEAD`` of ``reference_repo``, else
        ``$COSYJAX_REFERENCE_COMMIT``, else "unknown".
      progress: print progress lines to stderr.
    Returns:
      The absolute path of ``out_dir``.
    Raises:
      MakeCaseError: bad config/arguments, an existing ``out_dir`` without ``overwrite``, or a failed
        self-check. FileNotFoundError: the config file is missing.
    """
    t_start = time.time()

    def log(msg: str) -> None:
        if progress:
            print(f"[make-case {time.time() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise MakeCaseError(f"seed={seed!r}: expected a non-negative integer")
    seed = int(seed)
    cfg = load_case_config(config_path)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise MakeCaseError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)

    from cosyjax.parity.upstream import import_upstream

    log(f"importing upstream from {reference_repo}")
    info = import_upstream(reference_repo)
    commit = upstream_commit or info.commit or os.environ.get("COSYJAX_REFERENCE_COMMIT") or "unknown"
    if info.stand_ins:
        log(f"stand-ins for packages not importable here: {', '.join(info.stand_ins)}")
    import torch

    with staged_dir(out_dir) as tmp:
        with torch_reference_mode():
            model_dir = os.path.join(tmp, "model")
            os.makedirs(model_dir)
            write_qwen_dir(cfg, seed, os.path.join(model_dir, QWEN_DIR))
            with open(os.path.join(model_dir, "cosyvoice3.yaml"), "w", encoding="utf-8") as f:
                f.write(render_yaml(cfg, seed))

            log("building upstream modules (load_hyperpyyaml, upstream construction order)")
            models = build_models(model_dir)
            for m in models.values():
                m.eval()
            attn_impl = getattr(models["llm"].llm.model.config, "_attn_implementation", None)
            gen = torch.Generator().manual_seed(seed)
            randomize(models["llm"], gen, {"llm_decoder": 1.5})
            randomize(models["flow"], gen)
            randomize(models["hift"], gen)
            inp = case_inputs(cfg, seed)

            log("llm: choosing llm_decoder row gains for a greedy run that stops by a token")
            text_len = inp["text"].shape[1]
            prefix = lm_prefix(models["llm"], inp["prompt_text"], inp["text"], inp["prompt_speech"])
            row_gain, gain_search = choose_decoder_gain(models["llm"], prefix, int(text_len * 2), int(text_len * 20),
                                                        cfg, log)

            log("hift: scaling the f0 classifier and conv_post")
            with torch.inference_mode():
                probe = run_flow(models["flow"], inp, Arrays())["flow"][:, :, :cfg["case"]["hift_mel_len"]]
            hift_gains = scale_hift(models["hift"], probe, float(cfg["f0_median"]), float(cfg["hift_conv_post_std"]))

            log("saving llm.pt, flow.pt, hift.pt")
            for stage, module in models.items():
                sd = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
                torch.save(sd, os.path.join(model_dir, f"{stage}.pt"))
            if cfg["dpo"]:
                write_dpo_reference(models["llm"], cfg, seed, os.path.join(model_dir, REF_FILE))

            log("running every group on the in-memory model")
            e2e = (cfg, seed) if cfg["e2e"] else None
            train = (cfg, seed) if cfg["train"] else None
            dpo = (cfg, seed, model_dir) if cfg["dpo"] else None
            first, _ = run_all(models, inp, cfg["case"]["hift_mel_len"], e2e, train, dpo)
            del models

            log("rebuilding from the written release dir (load_hyperpyyaml + strict load_state_dict)")
            models = build_models(model_dir)
            load_weights(models, model_dir)
            log("running every group on the reloaded model")
            golden, run_info = run_all(models, inp, cfg["case"]["hift_mel_len"], e2e, train, dpo)
            del models
            bad = _compare(first, golden)
            if bad:
                raise MakeCaseError(f"self-check: reloaded release dir does not reproduce {', '.join(bad)}")
            kv = run_info["llm"]["kv_cache_max_abs_diff"]
            kv_g = run_info["llm_greedy"]["kv_cache_max_abs_diff"]
            if not (kv < 1e-3 and kv_g < 1e-3):
                raise MakeCaseError(f"self-check: KV-cache logits differ from full-sequence logits by {kv} / {kv_g}")
            hift_stats = run_info["hift"]
            h = hift_stats["hift"]
            if not (0.05 <= h["voiced_fraction"] <= 0.95) or h["audio_clipped_fraction"] > 0.05 or h["audio_std"] < 1e-3:
                raise MakeCaseError(f"self-check: degenerate HiFT output {h}; try another seed or f0_median")

        log("writing golden.npz, manifest.json, meta.json")
        np.savez_compressed(os.path.join(tmp, "golden.npz"), **golden.arrays)
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(golden.manifest(), f, indent=1)
            f.write("\n")
        greedy = {k: run_info["llm_greedy"][k] for k in ("n_tokens", "stopped_by_token", "stop_token",
                                                          "distinct_tokens", "min_top2_margin",
                                                          "min_len_mask_changed_steps")}
        meta = {
            "config_name": cfg["name"],
            "seed": seed,
            "config": {**{k: v for k, v in cfg.items() if k not in ("name", "llm_decoder_row_gain")},
                       "llm_decoder_row_gain": row_gain},
            "upstream_commit": commit,
            "upstream_path": info.path,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": info.versions.get("transformers"),
                         "x_transformers": info.versions.get("x-transformers"),
                         "numpy": np.__version__, "hyperpyyaml": info.versions.get("hyperpyyaml")},
            "stand_ins": info.stand_ins,
            "torch_threads": 1,
            "deterministic_algorithms": True,
            "qwen_attn_implementation": attn_impl,
            "command": f"cosyjax parity make-case --config {os.path.basename(config_path)} --seed {seed} "
                       "(upstream imported unmodified from a source checkout)",
            "init": {"scheme": "embeddings N(0,1); linear/conv N(0, gain/sqrt(fan_in)) (gain 1, llm_decoder 1.5); "
                               "biases N(0,0.05); norm weights 1+N(0,0.1); Snake alpha U(0.5,1.5); weight norm "
                               "v N(0,1/sqrt(fan_in)), g = |v|*U(0.75,1.25); buffers as constructed",
                     "llm_decoder_row_gain_search": gain_search,
                     "hift": hift_gains},
            "checks": [
                "release dir rebuilt with load_hyperpyyaml + strict load_state_dict, all stages re-run, every "
                "golden array bitwise identical to the in-memory model's",
                f"llm: upstream KV-cache decode loop logits == full-sequence logits (max abs diff {kv:.3g} < 1e-3)",
                "llm_greedy: yielded ids == argmax of the scores the sampler got; step_logits == full-sequence "
                f"logits over prefix + yielded ids (max abs diff {kv_g:.3g} < 1e-3)",
                "flow*: estimator mu/spks/cond/mask identical at every Euler step",
                f"hift: voiced fraction {h['voiced_fraction']:.2f} in [0.05, 0.95], clipped fraction "
                f"{h['audio_clipped_fraction']:.3f} <= 0.05",
            ] + ([
                "train_*: every draw of upstream's training forward recorded by taps (random in cosyvoice.llm.llm / "
                "cosyvoice.flow.flow, torch.rand/randn_like in cosyvoice.flow.flow_matching); replaying the recorded "
                "draws after reseeding every global RNG reproduces loss and gradients bitwise; the bistream flags "
                "agree with lm_target's fill tokens, the prompt lengths with the cond compute_loss received",
            ] if "train" in run_info else []) + ([
                "train_dpo: Qwen2LM.forward_dpo run unmodified on the policy and the reference (model/llm.ref.pt), "
                "with llm_embedding given as speech_embedding's weight and the empty instruct at the model's width "
                "(forward_dpo reads CosyVoice2's llm_embedding and builds a 896-wide empty instruct); every draw "
                "recorded, the replay after reseeding reproduces loss and gradients bitwise; layouts agree with "
                "the draws",
            ] if "train_dpo" in run_info else []),
            "llm_greedy": greedy,
            **({"tts": run_info["tts"]} if "tts" in run_info else {}),
            **({"train": run_info["train"]} if "train" in run_info else {}),
            **({"train_dpo": run_info["train_dpo"]} if "train_dpo" in run_info else {}),
            "hift_stats": hift_stats,
            "noise": {
                "flow": "CausalConditionalCFM.__init__ calls set_all_random_seed(0) (random, numpy, torch global "
                        "seeds) then rand_noise = torch.randn([1, 80, 50*300]); independent of model size. inference "
                        "uses z = rand_noise[:, :, :Tm] (recorded as */noise_z).",
                "hift": "SineGen2(causal=True).__init__: rand_ini = torch.rand(1, 9) with [:, 0] = 0, sine_waves = "
                        "torch.rand(1, 300*24000, 9); SourceModuleHnNSF.__init__: uv = torch.rand(1, 300*24000, 1). "
                        "Drawn from the global torch RNG after the seed(0) in CFM.__init__ and every module init "
                        "built after it, so they depend on the config sizes. Slices used are recorded as "
                        "hift*/noise_*.",
            },
            "seconds": round(time.time() - t_start, 1),
        }
        files = {}
        for root, _dirs, names in os.walk(tmp):
            for name in sorted(names):
                p = os.path.join(root, name)
                rel = os.path.relpath(p, tmp).replace(os.sep, "/")
                files[rel] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
        meta["files"] = dict(sorted(files.items()))
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")

        umask = os.umask(0)
        os.umask(umask)
        # mkdtemp makes the directory 0700 and save_pretrained may write 0600 files
        for root, dirs, names in os.walk(tmp):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~umask)
            for name in names:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
    log(f"wrote {out_dir} in {time.time() - t_start:.1f}s")
    return out_dir

