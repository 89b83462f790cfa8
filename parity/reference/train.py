"""Training-loss groups ``train_llm``, ``train_llm_lsm``, ``train_flow`` and ``train_flow_stream``:
upstream's training forwards on a padded batch, their losses and the torch autograd gradient of every
parameter, with every random draw forced and recorded (see ``run_train``)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from cosyjax.parity.reference.capture import (Arrays, RandomTap, TorchRandomTap, loss_and_grads, patched,
                                              perturb_global_rngs, same_run)
from cosyjax.parity.reference.config import MakeCaseError


def _train_inputs(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Padded training batches (upstream's ``padding`` layout: ids right-padded with 0, int32 lengths)."""
    import torch

    t = cfg["train_case"]
    gen = torch.Generator().manual_seed(seed * 1000003 + 41)
    vocab, s = cfg["qwen"]["vocab_size"], cfg["speech_token_size"]

    def padded(lengths, upper):
        rows = [torch.randint(0, upper, (n,), generator=gen) for n in lengths]
        width = max(lengths)
        out = torch.zeros(len(rows), width, dtype=torch.int64)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out, torch.tensor(lengths, dtype=torch.int32)

    text, text_len = padded(t["llm_text_len"], vocab)
    speech, speech_len = padded(t["llm_speech_len"], s)
    instruct, instruct_len = padded(t["llm_instruct_len"], vocab) if max(t["llm_instruct_len"]) else (
        torch.zeros(len(t["llm_instruct_len"]), 0, dtype=torch.int64),
        torch.tensor(t["llm_instruct_len"], dtype=torch.int32))
    llm = {"text_token": text, "text_token_len": text_len, "speech_token": speech, "speech_token_len": speech_len,
           "instruct_token": instruct, "instruct_token_len": instruct_len}

    token, token_len = padded(t["flow_token_len"], s)
    ratio = 2  # token_mel_ratio in the rendered yaml
    feat_len = token_len * ratio
    frames = ratio * token.shape[1]
    base = -2.0 - 6.0 * torch.arange(80, dtype=torch.float32) / 79.0
    noise = torch.randn(len(feat_len), frames + 1, 80, generator=gen)
    feat = (base + 2.0 * 0.5 * (noise[:, 1:] + noise[:, :-1])).clamp(min=-11.5129)
    feat = feat * (torch.arange(frames)[None, :, None] < feat_len[:, None, None])  # zero padding
    flow = {"speech_token": token, "speech_token_len": token_len, "speech_feat": feat.contiguous(),
            "speech_feat_len": feat_len.to(torch.int32),
            "embedding": torch.randn(len(feat_len), cfg["spk_embed_dim"], generator=gen)}
    return {"llm": llm, "flow": flow}


def _put_grads(out: Arrays, group: str, grads: dict[str, Any], what: str) -> None:
    for name, g in grads.items():
        out.put(f"{group}/grad/{name}", g, f"d {what} / d {name} (torch autograd, torch layout)")


def _run_train_llm(lm: Any, batch: dict[str, Any], cfg: dict[str, Any], out: Arrays) -> dict[str, Any]:
    import torch
    from cosyvoice.transformer.label_smoothing_loss import LabelSmoothingLoss

    llm_module = sys.modules[type(lm).prepare_lm_input_target.__module__]  # where `random` is looked up
    t = cfg["train_case"]
    v = lm.speech_token_size + 200
    info: dict[str, Any] = {}
    for group, smoothing, normalize in (("train_llm", None, None), ("train_llm_lsm", float(t["lsm_weight"]), False)):

        def run(tap):
            captured = {}
            original = lm.prepare_lm_input_target

            def spy(*args, **kwargs):
                target, lm_input, lm_input_len = original(*args, **kwargs)
                captured["target"], captured["len"] = target.detach().clone(), lm_input_len.detach().clone()
                return target, lm_input, lm_input_len

            lm.prepare_lm_input_target = spy
            try:
                with patched(llm_module, "random", tap):
                    res = loss_and_grads(lm, lambda: lm(batch, torch.device("cpu")))
            finally:
                del lm.prepare_lm_input_target
            return res, captured

        saved_criterion = lm.criterion_ce
        if smoothing is not None:
            lm.criterion_ce = LabelSmoothingLoss(size=v, padding_idx=-1, smoothing=smoothing,
                                                 normalize_length=normalize)
        criterion = lm.criterion_ce
        try:
            tap = RandomTap(script=t["llm_draws"])
            first, captured = run(tap)
            perturb_global_rngs()
            replayed, _ = run(RandomTap(replay=tap.calls))
        finally:
            lm.criterion_ce = saved_criterion
        if not same_run(first, replayed):
            raise MakeCaseError(f"{group}: replaying the recorded draws does not reproduce the loss and gradients")
        rows = batch["text_token"].shape[0]
        if [c[0] for c in tap.calls] != ["random"] * rows:
            raise MakeCaseError(f"{group}: expected one random.random() per row, upstream drew {tap.calls}")
        draws = [c[2] for c in tap.calls]
        m0, m1 = lm.mix_ratio
        text_len, speech_len = batch["text_token_len"].tolist(), batch["speech_token_len"].tolist()
        bistream = [d < 0.5 and n / max(lt, 1) > m1 / m0 for d, lt, n in zip(draws, text_len, speech_len)]
        # what upstream actually laid out: a bistream row with a full text chunk has fill tokens
        target = captured["target"]
        for i in range(rows):
            has_fill = bool((target[i] == lm.fill_token).any())
            if has_fill != (bistream[i] and text_len[i] >= m0):
                raise MakeCaseError(f"{group}: row {i} layout (fill tokens: {has_fill}) disagrees with its draw "
                                    f"{draws[i]} and eligibility")
        (res, grads) = first
        g = group
        if g == "train_llm":
            for key in ("text_token", "speech_token", "instruct_token"):
                out.put(f"{g}/{key}", batch[key], f"(B, max len) {key} ids, right-padded with 0 (upstream's padding)")
                out.put(f"{g}/{key}_len", batch[f"{key}_len"], "(B,) valid ids per row")
        out.put(f"{g}/lsm_weight", np.float32(criterion.smoothing),
                "LabelSmoothingLoss smoothing of this run (train_llm: the yaml's lsm_weight; train_llm_lsm: "
                "train_case.lsm_weight, with train_llm's inputs and draws)")
        out.put(f"{g}/length_normalized", np.bool_(criterion.normalize_length),
                "LabelSmoothingLoss normalize_length: loss / number of target positions (True) or / B (False)")
        out.put(f"{g}/bistream_draw", np.asarray(draws, np.float32),
                "(B,) value upstream's per-row random.random() returned in Qwen2LM.prepare_lm_input_target (forced "
                "by make-case, recorded by a tap on cosyvoice.llm.llm.random)")
        out.put(f"{g}/bistream", np.asarray(bistream, np.int64),
                "(B,) 1 where the row was laid out bistream: draw < 0.5 and speech_len / text_len > mix_ratio[1] / "
                "mix_ratio[0] (checked against the fill tokens of lm_target)")
        out.put(f"{g}/lm_target", target, "(B, T) lm_target from prepare_lm_input_target, padded with IGNORE_ID = -1")
        out.put(f"{g}/lm_input_len", captured["len"], "(B,) lm_input length per row")
        out.put(f"{g}/loss", res["loss"], "CosyVoice3LM.forward loss (LabelSmoothingLoss over llm_decoder logits)")
        out.put(f"{g}/acc", res["acc"], "th_accuracy: argmax == lm_target over non-ignored positions")
        _put_grads(out, g, grads, f"{g}/loss")
        info[g] = {"loss": float(res["loss"]), "acc": float(res["acc"]), "bistream": bistream}
    return info


def _run_train_flow(flow: Any, batch: dict[str, Any], cfg: dict[str, Any], seed: int, out: Arrays
                    ) -> dict[str, Any]:
    import torch

    flow_module = sys.modules[type(flow).forward.__module__]
    cfm_module = sys.modules[type(flow.decoder).compute_loss.__module__]  # where compute_loss finds `torch`
    t = cfg["train_case"]
    rows = batch["speech_token"].shape[0]
    info: dict[str, Any] = {}
    for index, (group, draws_key, cfg_key) in enumerate((("train_flow", "flow_draws", "flow_cfg_rand"),
                                                         ("train_flow_stream", "flow_stream_draws",
                                                          "flow_stream_cfg_rand"))):

        def run(tap, torch_tap):
            captured: dict[str, Any] = {}
            original = flow.decoder.compute_loss

            def spy(x1, mask, mu, spks=None, cond=None, streaming=False):
                captured.update(cond=cond.detach().clone(), streaming=streaming, mask=mask.detach().clone())
                return original(x1, mask, mu, spks, cond=cond, streaming=streaming)

            flow.decoder.compute_loss = spy
            try:
                with patched(flow_module, "random", tap), patched(cfm_module, "torch", torch_tap):
                    res = loss_and_grads(flow, lambda: flow(batch, torch.device("cpu")))
            finally:
                del flow.decoder.compute_loss
            return res, captured

        torch_seed = seed * 1000003 + 53 + index  # the global RNG that t and z come from
        torch.manual_seed(torch_seed)
        tap = RandomTap(script=t[draws_key], fractions=t["flow_prompt_fraction"])
        torch_tap = TorchRandomTap(torch, forced_1d=t[cfg_key])
        first, captured = run(tap, torch_tap)
        perturb_global_rngs()
        replayed, _ = run(RandomTap(replay=tap.calls), TorchRandomTap(torch, replay=torch_tap.calls))
        if not same_run(first, replayed):
            raise MakeCaseError(f"{group}: replaying the recorded draws does not reproduce the loss and gradients")

        # parse what upstream drew: streaming, then per row random() (+ randint when >= 0.5)
        calls = list(tap.calls)
        name, _, streaming_draw = calls.pop(0)
        prompt_draw, prompt_max, prompt_len = [], [], []
        for i in range(rows):
            name, _, d = calls.pop(0)
            if name != "random":
                raise MakeCaseError(f"{group}: unexpected draw order {tap.calls}")
            prompt_draw.append(d)
            if d < 0.5:
                prompt_max.append(-1)
                prompt_len.append(0)
            else:
                name, (a, b), k = calls.pop(0)
                if name != "randint" or a != 0:
                    raise MakeCaseError(f"{group}: unexpected draw order {tap.calls}")
                prompt_max.append(b)
                prompt_len.append(k)
        if calls:
            raise MakeCaseError(f"{group}: unexpected extra draws {calls}")
        if captured["streaming"] != (streaming_draw < 0.5):
            raise MakeCaseError(f"{group}: streaming={captured['streaming']} but the draw was {streaming_draw}")
        feat = batch["speech_feat"]
        for i, k in enumerate(prompt_len):  # the cond upstream built is the recorded prompt region
            expect = torch.zeros_like(feat[i])
            expect[:k] = feat[i, :k]
            if not torch.equal(captured["cond"][i].transpose(0, 1), expect):
                raise MakeCaseError(f"{group}: row {i} cond is not the first {k} feat frames")
        kinds = [(c[0], c[1]) for c in torch_tap.calls]
        frames = feat.shape[1]
        expected = [("rand", (rows, 1, 1)), ("randn_like", (rows, 80, frames)), ("rand", (rows,))]
        if kinds != expected:
            raise MakeCaseError(f"{group}: torch draws {kinds}, expected {expected}")
        t_draw, z, cfg_rand = (c[2] for c in torch_tap.calls)
        cfg_keep = cfg_rand > flow.decoder.training_cfg_rate

        res, grads = first
        g = group
        if g == "train_flow":
            out.put(f"{g}/speech_token", batch["speech_token"], "(B, N) speech tokens, right-padded with 0")
            out.put(f"{g}/speech_token_len", batch["speech_token_len"], "(B,) tokens per row (the loss mask is "
                    "token_mel_ratio * this frames)")
            out.put(f"{g}/speech_feat", feat, "(B, T = 2N, 80) target mel, time-major (upstream's batch layout), "
                    "zero-padded")
            out.put(f"{g}/speech_feat_len", batch["speech_feat_len"], "(B,) mel frames per row (bounds the prompt "
                    "region draw)")
            out.put(f"{g}/embedding", batch["embedding"], "(B, spk_embed_dim) raw speaker embedding")
        out.put(f"{g}/streaming_draw", np.float32(streaming_draw),
                "random.random() value of CausalMaskedDiffWithDiT.forward's streaming draw (forced, recorded)")
        out.put(f"{g}/streaming", np.bool_(captured["streaming"]), "streaming flag passed to compute_loss (draw < 0.5)")
        out.put(f"{g}/prompt_draw", np.asarray(prompt_draw, np.float32),
                "(B,) per-row random.random() of the prompt-region choice (< 0.5: no prompt conditioning)")
        out.put(f"{g}/prompt_max", np.asarray(prompt_max, np.int64),
                "(B,) upper bound m of random.randint(0, m), m = int(0.3 * speech_feat_len); -1 where not drawn")
        out.put(f"{g}/prompt_len", np.asarray(prompt_len, np.int64),
                "(B,) k: cond[i, :k] = speech_feat[i, :k] (0 = no prompt conditioning); checked against the cond "
                "compute_loss received")
        out.put(f"{g}/t", t_draw.reshape(-1), "(B,) flow time t = torch.rand([B, 1, 1]) in compute_loss (uniform; no "
                                               "cosine schedule in training)")
        out.put(f"{g}/z", z, "(B, 80, T) noise x0 = torch.randn_like(x1) in compute_loss, channel-major")
        out.put(f"{g}/cfg_rand", cfg_rand, "(B,) torch.rand(B) of the CFG dropout (forced by make-case)")
        out.put(f"{g}/cfg_keep", cfg_keep.to(torch.int64),
                "(B,) 1 where cfg_rand > training_cfg_rate: the row keeps mu, spks and cond (0: all three zeroed)")
        out.put(f"{g}/loss", res["loss"], "CausalMaskedDiffWithDiT.forward loss: sum(((pred - u) * mask)^2) / "
                                          "(sum(mask) * 80), F.mse_loss; estimator in eval mode (no dropout)")
        _put_grads(out, g, grads, f"{g}/loss")
        info[g] = {"loss": float(res["loss"]), "streaming": bool(captured["streaming"]), "prompt_len": prompt_len,
                   "cfg_keep": cfg_keep.tolist(), "torch_seed": torch_seed}
    return info


def run_train(models: dict[str, Any], cfg: dict[str, Any], seed: int, out: Arrays) -> dict[str, Any]:
    """Groups ``train_llm``, ``train_llm_lsm``, ``train_flow`` and ``train_flow_stream``.

    Upstream's training forwards run unmodified (modules in eval mode, so the DiT's dropout is off
    and the losses are deterministic given the draws) with autograd on.  Their randomness is
    captured by taps: ``random`` in ``cosyvoice.llm.llm`` / ``cosyvoice.flow.flow`` returns forced
    values (``train_case``) and records every call; ``torch`` in ``cosyvoice.flow.flow_matching``
    records ``torch.rand`` / ``torch.randn_like`` (t and z from the seeded global RNG, the CFG
    dropout ``rand(b)`` forced).  Each group is then run again replaying the recorded draws after
    reseeding every global RNG, and must reproduce the loss and gradients bitwise (so nothing
    random went unrecorded).
    """
    batch = _train_inputs(cfg, seed)
    return {**_run_train_llm(models["llm"], batch["llm"], cfg, out),
            **_run_train_flow(models["flow"], batch["flow"], cfg, seed, out)}


# --------------------------------------------------------------------------------------------
# DPO (group train_dpo)
# --------------------------------------------------------------------------------------------
REF_FILE = "llm.ref.pt"  # the frozen reference model of the DPO group, beside the case's llm.pt


def write_dpo_reference(lm: Any, cfg: dict[str, Any], seed: int, path: str) -> None:
    """The reference weights: each policy parameter plus ``ref_noise * std(param) * N(0, 1)``.

    Perturbed per parameter (``named_parameters``), so tied tensors (Qwen's lm_head and embed_tokens)
    stay equal, as a real checkpoint's are.
    """
    import copy

    import torch

    gen = torch.Generator().manual_seed(seed * 1000003 + 67)
    noise = float(cfg["dpo_case"]["ref_noise"])
    ref = copy.deepcopy(lm)
    with torch.no_grad():
        for _, p in ref.named_parameters():
            if p.numel() > 1:
                p.add_(noise * float(p.std()) * torch.randn(p.shape, generator=gen))
    torch.save({k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}, path)


def _dpo_inputs(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """A padded DPO batch (upstream's ``padding(dpo=True)``: reject_speech_token beside speech_token)."""
    import torch

    d = cfg["dpo_case"]
    gen = torch.Generator().manual_seed(seed * 1000003 + 71)

    def padded(lengths, upper):
        rows = [torch.randint(0, upper, (n,), generator=gen) for n in lengths]
        out = torch.zeros(len(rows), max(lengths), dtype=torch.int64)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out, torch.tensor(lengths, dtype=torch.int32)

    text, text_len = padded(d["text_len"], cfg["qwen"]["vocab_size"])
    chosen, chosen_len = padded(d["chosen_len"], cfg["speech_token_size"])
    rejected, rejected_len = padded(d["rejected_len"], cfg["speech_token_size"])
    return {"text_token": text, "text_token_len": text_len, "speech_token": chosen, "speech_token_len": chosen_len,
            "reject_speech_token": rejected, "reject_speech_token_len": rejected_len}


def run_train_dpo(lm: Any, model_dir: str, cfg: dict[str, Any], seed: int, out: Arrays) -> dict[str, Any]:
    """Group ``train_dpo``: upstream's DPO step (``batch_forward`` with ``ref_model`` and ``dpo_loss``).

    ``Qwen2LM.forward_dpo`` runs unmodified on the policy (the case's LLM) and, under no_grad, on the
    reference (``model/llm.ref.pt``), then ``DPOLoss(beta)`` and ``loss = preference + sft``, with
    autograd.  forward_dpo was written for CosyVoice2's Qwen2LM and fails on CosyVoice3LM in two
    places; the capture supplies what it reads, as CosyVoice3LM.forward does it:

    - ``self.llm_embedding.weight[sos / task_id]``: CosyVoice3LM has no llm_embedding; its sos and
      task_id rows are in ``speech_embedding`` (CosyVoice3LM.forward reads them there), so
      ``llm_embedding`` is given as a holder of ``speech_embedding.weight`` (the same tensor);
    - ``prepare_lm_input_target`` without instruct tokens builds ``torch.empty(0, 896)``, the
      full-size width; the capture passes empty instruct tensors of the model's width instead (the
      same zero rows at any width);
    - ``th_accuracy(chosen_logits.view(-1, self.speech_token_size + 3), ...)`` assumes CosyVoice2's
      output width; ``speech_token_size`` (read nowhere else in forward_dpo) is set to the decoder's
      width - 3 for the call, so the view is CosyVoice3LM's ``speech_token_size + 200``.

    The bistream draws (2B per forward, policy first) are forced and recorded by a tap on
    ``random`` in ``cosyvoice.llm.llm``; the group is replayed with reseeded global RNGs and must
    reproduce loss and gradients bitwise.
    """
    import copy
    import os
    import types

    import torch
    from cosyvoice.llm.llm import Qwen2LM
    from cosyvoice.utils.losses import DPOLoss

    d = cfg["dpo_case"]
    llm_module = sys.modules[Qwen2LM.forward_dpo.__module__]
    batch = _dpo_inputs(cfg, seed)
    ref = copy.deepcopy(lm)
    ref.load_state_dict(torch.load(os.path.join(model_dir, REF_FILE), map_location="cpu", weights_only=True),
                        strict=True)
    ref.eval()
    width = lm.llm_input_size
    criterion = DPOLoss(beta=float(d["beta"]), label_smoothing=0.0, ipo=False)

    def shimmed(module: Any, layouts: list) -> None:
        original = module.prepare_lm_input_target

        def prepare(*args, **kwargs):
            if len(args) < 9 and kwargs.get("instruct_token") is None:  # forward_dpo passes no instruct
                rows = args[1].shape[0]
                kwargs.update(instruct_token=torch.zeros(rows, 0, dtype=args[1].dtype),
                              instruct_token_emb=torch.zeros(rows, 0, width, dtype=args[2].dtype),
                              instruct_token_len=torch.zeros(rows, dtype=args[3].dtype))
            target, lm_input, lm_input_len = original(*args, **kwargs)
            layouts.append((target.detach().clone(), lm_input_len.detach().clone()))
            return target, lm_input, lm_input_len

        module.prepare_lm_input_target = prepare
        module.llm_embedding = types.SimpleNamespace(weight=module.speech_embedding.weight)
        module.speech_token_size = module.llm_decoder.out_features - 3  # read only by th_accuracy's view

    def unshim(module: Any) -> None:
        del module.prepare_lm_input_target
        del module.llm_embedding
        module.speech_token_size = module.llm_decoder.out_features - 200

    def run(tap):
        layouts: list = []
        shimmed(lm, layouts)
        shimmed(ref, layouts)

        def step():
            policy = Qwen2LM.forward_dpo(lm, batch, torch.device("cpu"))
            with torch.no_grad():
                reference = Qwen2LM.forward_dpo(ref, batch, torch.device("cpu"))
            pref, chosen_reward, reject_reward = criterion(policy["chosen_logps"], policy["rejected_logps"],
                                                           reference["chosen_logps"], reference["rejected_logps"])
            return {"loss": pref + policy["loss"], "sft_loss": policy["loss"], "dpo_loss": pref, "acc": policy["acc"],
                    "chosen_logps": policy["chosen_logps"], "rejected_logps": policy["rejected_logps"],
                    "ref_chosen_logps": reference["chosen_logps"], "ref_rejected_logps": reference["rejected_logps"],
                    "chosen_reward": chosen_reward, "reject_reward": reject_reward}

        try:
            with patched(llm_module, "random", tap):
                res = loss_and_grads(lm, step)
        finally:
            unshim(lm)
            unshim(ref)
        return res, layouts

    tap = RandomTap(script=list(d["policy_draws"]) + list(d["ref_draws"]))
    first, layouts = run(tap)
    perturb_global_rngs()
    replayed, _ = run(RandomTap(replay=tap.calls))
    if not same_run(first, replayed):
        raise MakeCaseError("train_dpo: replaying the recorded draws does not reproduce the loss and gradients")
    rows = batch["text_token"].shape[0]
    if [c[0] for c in tap.calls] != ["random"] * (4 * rows) or len(layouts) != 2:
        raise MakeCaseError(f"train_dpo: expected 2B random.random() per forward and two layouts, upstream drew "
                            f"{tap.calls}")
    draws = [c[2] for c in tap.calls]
    m0, m1 = lm.mix_ratio
    text_len = batch["text_token_len"].tolist() * 2
    speech_len = batch["speech_token_len"].tolist() + batch["reject_speech_token_len"].tolist()
    flags = []
    for part, (target, _) in enumerate(layouts):
        part_draws = draws[2 * rows * part:2 * rows * (part + 1)]
        bistream = [x < 0.5 and n / max(lt, 1) > m1 / m0 for x, lt, n in zip(part_draws, text_len, speech_len)]
        for i in range(2 * rows):  # the layout upstream made agrees with the draw
            if bool((target[i] == lm.fill_token).any()) != (bistream[i] and text_len[i] >= m0):
                raise MakeCaseError(f"train_dpo: layout row {i} of forward {part} disagrees with its draw")
        flags.append((part_draws, bistream))
    (res, grads) = first
    g = "train_dpo"
    for key in ("text_token", "speech_token", "reject_speech_token"):
        out.put(f"{g}/{key}", batch[key], f"(B, max len) {key} ids, right-padded with 0 (upstream's padding, dpo=True)")
        out.put(f"{g}/{key}_len", batch[f"{key}_len"], "(B,) valid ids per row")
    for name, (part_draws, bistream), (target, lengths) in zip(("policy", "ref"), flags, layouts):
        out.put(f"{g}/{name}_draw", np.asarray(part_draws, np.float32),
                f"(2B,) random.random() per row of the {name} forward_dpo (chosen rows, then rejected), forced")
        out.put(f"{g}/{name}_bistream", np.asarray(bistream, np.int64),
                "(2B,) 1 where the row was laid out bistream (draw < 0.5 and speech/text > 15/5)")
        out.put(f"{g}/{name}_lm_target", target, f"(2B, T) lm_target of the {name} forward (IGNORE_ID = -1 padding)")
        out.put(f"{g}/{name}_lm_input_len", lengths, f"(2B,) lm_input length per row of the {name} forward")
    out.put(f"{g}/beta", np.float32(d["beta"]), "DPOLoss beta of this case (upstream trains with 0.01)")
    for key in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
        out.put(f"{g}/{key}", res[key], f"(B,) forward_dpo {key.replace('ref_', '')} of the "
                f"{'reference' if key.startswith('ref_') else 'policy'}: mean log-prob of token 0 over the "
                "lm_target == IGNORE_ID positions (upstream's mask, padding included)")
    out.put(f"{g}/chosen_reward", res["chosen_reward"], "(B,) beta * (policy - reference) chosen logps")
    out.put(f"{g}/reject_reward", res["reject_reward"], "(B,) beta * (policy - reference) rejected logps")
    out.put(f"{g}/sft_loss", res["sft_loss"], "forward_dpo loss: LabelSmoothingLoss on the chosen rows")
    out.put(f"{g}/dpo_loss", res["dpo_loss"], "DPOLoss: mean over rows of -logsigmoid(beta * logit ratio difference)")
    out.put(f"{g}/loss", res["loss"], "dpo_loss + sft_loss (train_utils.batch_forward)")
    out.put(f"{g}/acc", res["acc"], "th_accuracy on the chosen rows")
    _put_grads(out, g, grads, f"{g}/loss")
    return {g: {"loss": float(res["loss"]), "dpo_loss": float(res["dpo_loss"]), "sft_loss": float(res["sft_loss"]),
                "policy_bistream": flags[0][1], "ref_bistream": flags[1][1]}}
