"""The case config (CONFIG.yaml): sizes of the upstream modules, input lengths, forced draws.

``load_case_config(path)`` reads and validates one; defaults are filled in.

CONFIG.yaml (plain yaml; ``~`` marks an optional key and its default)::

    name: tiny-b                    # ~ file stem; recorded as meta["config_name"]
    qwen:                           # CosyVoice-BlankEN/config.json (Qwen2)
      hidden_size: 96               # = llm_input_size = llm_output_size in the yaml
      num_hidden_layers: 3
      num_attention_heads: 6        # hidden_size % heads == 0, head_dim even
      num_key_value_heads: 2        # divides num_attention_heads
      intermediate_size: 160
      vocab_size: 600
      tie_word_embeddings: true     # ~ true
      rms_norm_eps: 1.0e-6          # ~ 1e-6
      rope_theta: 1000000.0         # ~ 1e6
    speech_token_size: 80           # llm.speech_token_size and flow.vocab_size
    spk_embed_dim: 192              # ~ 192
    chunk_size: 5                   # streaming chunk in tokens; DiT static_chunk_size = 2 * chunk_size
    pre_lookahead_len: 3            # ~ 3
    pre_lookahead_channels: 48
    dit: {dim: 96, depth: 3, heads: 6, dim_head: 16, ff_mult: 2}   # dim % 16 == 0 (conv pos groups);
                                                                   # ff_mult ~ 2
    hift_base_channels: 48          # % 8 == 0 (three upsampling stages halve it)
    hift_f0_cond_channels: 48       # ~ hift_base_channels
    llm_decoder_row_gain:           # ~ as below. llm_decoder rows are scaled so that the greedy run stops
      sos: [1.0, 1.5, 2.0, 3.0, 4.0]             # by a token within max_len: row speech_token_size
      eos: [1.0, 0.5]                            # (sos), +1 (eos), +2..+199 (special). Combinations
      special: [0.5, 0.25, 1.0, 0.1, 1.5, 2.0]   # are tried (special outer, sos inner); the one kept
                                                 # is recorded in meta.json (see llm.choose_decoder_gain)
    greedy_min_margin: 1.0e-3       # ~ smallest accepted top-1/top-2 score gap of the greedy run
    f0_median: 15.0                 # ~ HiFT f0 classifier is scaled so that median(f0) is this (Hz);
                                    #   the voiced threshold is 10, so f0 spans voiced and unvoiced
    hift_conv_post_std: 0.3         # ~ HiFT conv_post is scaled to this output std (no clamped audio)
    e2e: false                      # ~ also write groups tts and tts_stream: upstream
                                    #   CosyVoice3Model.tts end to end (non-stream and stream), with the
                                    #   LLM output forced to a fixed token sequence (see tts.run_tts)
    e2e_case:                       # ~ used when e2e is true
      speech_len: ~                 # ~ forced LLM tokens; default: enough for three stream hops
      silent_run: 8                 # ~ length of a run of silent tokens in them (filter drops run - 5)
      speed: 1.5                    # ~ speed of the extra non-stream run (tts/audio_speed)
    train: false                    # ~ also write groups train_llm, train_llm_lsm, train_flow and
                                    #   train_flow_stream: upstream's training forward (CosyVoice3LM.forward,
                                    #   CausalMaskedDiffWithDiT.forward) on a padded batch, its loss and
                                    #   torch autograd gradients of every parameter (see train.run_train)
    train_case:                     # ~ used when train is true; per-row lists (one entry per batch row)
      llm_text_len: [6, 3, 5, 5]    # ~ text tokens per row
      llm_speech_len: [20, 11, 8, 16]  # ~ speech tokens per row (bistream needs speech/text > 15/5)
      llm_instruct_len: [2, 0, 3, 0]   # ~ instruct tokens per row (through embed_tokens)
      llm_draws: [0.3, 0.7, 0.1, 0.4]  # ~ what upstream's per-row random.random() returns (forced;
                                       #   bistream iff < 0.5 and the row is eligible)
      lsm_weight: 0.1               # ~ train_llm_lsm: LabelSmoothingLoss(smoothing) normalised by batch size
      flow_token_len: [7, 4, 6]     # ~ speech tokens per flow row (speech_feat_len = 2 * this)
      flow_draws: [0.9, 0.8, 0.2, 0.6]     # ~ train_flow: forced random.random() values: streaming
                                           #   (< 0.5: True), then per row (< 0.5: no prompt)
      flow_stream_draws: [0.1, 0.3, 0.7, 0.55]  # ~ the same for train_flow_stream
      flow_prompt_fraction: [1.0, 0.5]     # ~ forced random.randint(0, m) results, as fractions of m
                                           #   (used in turn, cycling)
      flow_cfg_rand: [0.9, 0.5, 0.1]       # ~ train_flow: forced torch.rand(b) of the CFG dropout
                                           #   (row dropped where <= training_cfg_rate = 0.2)
      flow_stream_cfg_rand: [0.05, 0.6, 0.8]  # ~ the same for train_flow_stream
    dpo: false                      # ~ also write group train_dpo: upstream's DPO step (Qwen2LM.forward_dpo on
                                    #   the policy and on a frozen reference model, DPOLoss, + the sft loss) and
                                    #   torch autograd gradients of every policy parameter (see train.run_train_dpo);
                                    #   the reference weights are model/llm.ref.pt (the policy's, perturbed)
    dpo_case:                       # ~ used when dpo is true; per-row lists (one entry per preference pair)
      text_len: [6, 3]              # ~ text tokens per row
      chosen_len: [20, 9]           # ~ chosen speech tokens per row
      rejected_len: [19, 16]        # ~ rejected speech tokens per row
      policy_draws: [0.3, 0.7, 0.2, 0.1]   # ~ forced random.random() of the policy's forward_dpo: 2B rows,
                                           #   chosen then rejected (bistream iff < 0.5 and eligible)
      ref_draws: [0.6, 0.2, 0.4, 0.8]      # ~ the same for the reference model's forward_dpo
      beta: 1.0                     # ~ DPOLoss beta (upstream trains with 0.01; 1.0 makes the preference
                                    #   term's gradient as large as the sft term's, so the check covers it)
      ref_noise: 0.1                # ~ reference weights = policy + ref_noise * std(param) * N(0, 1)
    case:                           # input lengths
      prompt_text_len: 5
      text_len: 7                   # min_len = 2*text_len, max_len = 20*text_len (upstream)
      prompt_speech_len: 9          # flow prompt mel has 2*prompt_speech_len frames
      speech_len: 18                # > pre_lookahead_len, < 20*text_len
      hift_mel_len: 36              # ~ 2*speech_len (the whole flow/mel); the HiFT input is the first
                                    #   hift_mel_len frames of flow/mel; >= 9 (finalize=False holds 8 back)

Everything else in ``cosyvoice3.yaml`` (classes, the HiFT upsampling/iSTFT layout, the CFM
"""

from __future__ import annotations

import copy
import os
from typing import Any

import yaml

from cosyjax.parity.case import CaseError


class MakeCaseError(CaseError):
    """Bad arguments or config for ``make_case``, or a self-check that failed."""


_REQ = object()

_SCHEMA: dict[str, Any] = {
    "name": None,
    "qwen": {
        "hidden_size": _REQ, "num_hidden_layers": _REQ, "num_attention_heads": _REQ,
        "num_key_value_heads": _REQ, "intermediate_size": _REQ, "vocab_size": _REQ,
        "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    },
    "speech_token_size": _REQ,
    "spk_embed_dim": 192,
    "chunk_size": _REQ,
    "pre_lookahead_len": 3,
    "pre_lookahead_channels": _REQ,
    "dit": {"dim": _REQ, "depth": _REQ, "heads": _REQ, "dim_head": _REQ, "ff_mult": 2},
    "hift_base_channels": _REQ,
    "hift_f0_cond_channels": None,
    "llm_decoder_row_gain": {"sos": [1.0, 1.5, 2.0, 3.0, 4.0], "eos": [1.0, 0.5],
                             "special": [0.5, 0.25, 1.0, 0.1, 1.5, 2.0]},
    "greedy_min_margin": 1e-3,
    "f0_median": 15.0,
    "hift_conv_post_std": 0.3,
    "case": {"prompt_text_len": _REQ, "text_len": _REQ, "prompt_speech_len": _REQ, "speech_len": _REQ,
             "hift_mel_len": None},
    "e2e": False,
    "e2e_case": {"speech_len": None, "silent_run": 8, "speed": 1.5},
    "train": False,
    "train_case": {"llm_text_len": [6, 3, 5, 5], "llm_speech_len": [20, 11, 8, 16], "llm_instruct_len": [2, 0, 3, 0],
                   "llm_draws": [0.3, 0.7, 0.1, 0.4], "lsm_weight": 0.1, "flow_token_len": [7, 4, 6],
                   "flow_draws": [0.9, 0.8, 0.2, 0.6], "flow_stream_draws": [0.1, 0.3, 0.7, 0.55],
                   "flow_prompt_fraction": [1.0, 0.5], "flow_cfg_rand": [0.9, 0.5, 0.1],
                   "flow_stream_cfg_rand": [0.05, 0.6, 0.8]},
    "dpo": False,
    "dpo_case": {"text_len": [6, 3], "chosen_len": [20, 9], "rejected_len": [19, 16],
                 "policy_draws": [0.3, 0.7, 0.2, 0.1], "ref_draws": [0.6, 0.2, 0.4, 0.8], "beta": 1.0,
                 "ref_noise": 0.1},
}


def _fill(given: Any, schema: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(given, dict):
        raise MakeCaseError(f"{where}: expected a mapping, found {type(given).__name__}")
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise MakeCaseError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(schema)}")
    out: dict[str, Any] = {}
    for key, default in schema.items():
        sub = f"{where}.{key}" if where else key
        if isinstance(default, dict):
            out[key] = _fill(given.get(key, {}), default, sub)
        elif key in given:
            out[key] = given[key]
        elif default is _REQ:
            raise MakeCaseError(f"{sub}: required")
        else:
            out[key] = copy.deepcopy(default)
    return out


def _pos_int(cfg: dict[str, Any], path: str, minimum: int = 1) -> int:
    node: Any = cfg
    for part in path.split("."):
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int) or node < minimum:
        raise MakeCaseError(f"{path}={node!r}: expected an integer >= {minimum}")
    return node


def load_case_config(path: str) -> dict[str, Any]:
    """Read and validate a CONFIG.yaml (see the module docstring); defaults filled in."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: config file not found")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise MakeCaseError(f"{path}: not valid yaml: {e}") from None
    cfg = _fill(raw if raw is not None else {}, _SCHEMA, "")
    if cfg["name"] is None:
        cfg["name"] = os.path.splitext(os.path.basename(path))[0]
    if cfg["hift_f0_cond_channels"] is None:
        cfg["hift_f0_cond_channels"] = cfg["hift_base_channels"]
    gains = cfg["llm_decoder_row_gain"]
    for key in ("sos", "eos", "special"):
        if not isinstance(gains[key], list):
            gains[key] = [gains[key]]
        if not gains[key] or not all(isinstance(g, (int, float)) and not isinstance(g, bool) for g in gains[key]):
            raise MakeCaseError(f"llm_decoder_row_gain.{key}={gains[key]!r}: expected a number or a list of numbers")
    for key in ("qwen.hidden_size", "qwen.num_hidden_layers", "qwen.num_attention_heads",
                "qwen.num_key_value_heads", "qwen.intermediate_size", "qwen.vocab_size", "speech_token_size",
                "spk_embed_dim", "chunk_size", "pre_lookahead_len", "pre_lookahead_channels", "dit.dim",
                "dit.depth", "dit.heads", "dit.dim_head", "dit.ff_mult", "hift_base_channels",
                "hift_f0_cond_channels", "case.prompt_text_len", "case.text_len", "case.prompt_speech_len",
                "case.speech_len"):
        _pos_int(cfg, key)
    q, d, c = cfg["qwen"], cfg["dit"], cfg["case"]
    if q["hidden_size"] % q["num_attention_heads"]:
        raise MakeCaseError(f"qwen.hidden_size={q['hidden_size']} is not divisible by "
                            f"num_attention_heads={q['num_attention_heads']}")
    if (q["hidden_size"] // q["num_attention_heads"]) % 2:
        raise MakeCaseError(f"qwen head_dim={q['hidden_size'] // q['num_attention_heads']} must be even (RoPE)")
    if q["num_attention_heads"] % q["num_key_value_heads"]:
        raise MakeCaseError(f"qwen.num_key_value_heads={q['num_key_value_heads']} does not divide "
                            f"num_attention_heads={q['num_attention_heads']}")
    if d["dim"] % 16:
        raise MakeCaseError(f"dit.dim={d['dim']} must be a multiple of 16 (DiT CausalConvPositionEmbedding "
                            "uses groups=16)")
    if d["dim_head"] % 2:
        raise MakeCaseError(f"dit.dim_head={d['dim_head']} must be even (rotary embedding)")
    if cfg["hift_base_channels"] % 8:
        raise MakeCaseError(f"hift_base_channels={cfg['hift_base_channels']} must be a multiple of 8 "
                            "(three upsampling stages halve it)")
    if c["speech_len"] <= cfg["pre_lookahead_len"]:
        raise MakeCaseError(f"case.speech_len={c['speech_len']} must exceed pre_lookahead_len="
                            f"{cfg['pre_lookahead_len']} (flow_stream_partial holds those tokens back)")
    if c["speech_len"] >= 20 * c["text_len"]:
        raise MakeCaseError(f"case.speech_len={c['speech_len']} must be < max_len=20*text_len={20 * c['text_len']}")
    mel_frames = 2 * c["speech_len"]
    if c["hift_mel_len"] is None:
        c["hift_mel_len"] = mel_frames
    hl = _pos_int(cfg, "case.hift_mel_len", 9)
    if hl > mel_frames:
        raise MakeCaseError(f"case.hift_mel_len={hl} exceeds the flow mel length 2*speech_len={mel_frames}")
    if not isinstance(cfg["e2e"], bool):
        raise MakeCaseError(f"e2e={cfg['e2e']!r}: expected true or false")
    e = cfg["e2e_case"]
    if e["speech_len"] is not None:
        _pos_int(cfg, "e2e_case.speech_len", cfg["pre_lookahead_len"] + 1)
    _pos_int(cfg, "e2e_case.silent_run", 0)
    if not isinstance(e["speed"], (int, float)) or isinstance(e["speed"], bool) or e["speed"] <= 0:
        raise MakeCaseError(f"e2e_case.speed={e['speed']!r}: expected a positive number")
    _check_train_case(cfg)
    _check_dpo_case(cfg)
    for key in ("greedy_min_margin", "f0_median", "hift_conv_post_std"):
        if not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool) or cfg[key] <= 0:
            raise MakeCaseError(f"{key}={cfg[key]!r}: expected a positive number")
    return cfg


def _number_lists(section: str, values: dict[str, Any]):
    """A checker of ``section.key`` lists: ``numbers(key, kind, low, high=None, length=None)``."""
    def numbers(key: str, kind: type, low: float, high: float | None = None, length: int | None = None) -> list:
        v = values[key]
        ok = isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        if ok and kind is int:
            ok = all(isinstance(x, int) for x in v)
        if ok:
            ok = all(x >= low and (high is None or x < high) for x in v)
        if not ok:
            bound = f"[{low}, {high})" if high is not None else f">= {low}"
            raise MakeCaseError(f"{section}.{key}={v!r}: expected a non-empty list of {kind.__name__}s {bound}")
        if length is not None and len(v) != length:
            raise MakeCaseError(f"{section}.{key}: {len(v)} entries, expected {length} (one per row)")
        return v

    return numbers


def _check_dpo_case(cfg: dict[str, Any]) -> None:
    """Validate ``dpo`` / ``dpo_case`` (lists per row; 2B forced draws per model in [0, 1))."""
    if not isinstance(cfg["dpo"], bool):
        raise MakeCaseError(f"dpo={cfg['dpo']!r}: expected true or false")
    d = cfg["dpo_case"]
    numbers = _number_lists("dpo_case", d)
    rows = len(numbers("text_len", int, 1))
    numbers("chosen_len", int, 1, length=rows)
    numbers("rejected_len", int, 1, length=rows)
    for key in ("policy_draws", "ref_draws"):
        numbers(key, float, 0.0, 1.0, length=2 * rows)
    for key in ("beta", "ref_noise"):
        if not isinstance(d[key], (int, float)) or isinstance(d[key], bool) or d[key] <= 0:
            raise MakeCaseError(f"dpo_case.{key}={d[key]!r}: expected a positive number")


def _check_train_case(cfg: dict[str, Any]) -> None:
    """Validate ``train`` / ``train_case`` (lists per row, forced draws in [0, 1))."""
    if not isinstance(cfg["train"], bool):
        raise MakeCaseError(f"train={cfg['train']!r}: expected true or false")
    t = cfg["train_case"]
    numbers = _number_lists("train_case", t)

    rows = len(numbers("llm_text_len", int, 1))
    numbers("llm_speech_len", int, 1, length=rows)
    numbers("llm_instruct_len", int, 0, length=rows)
    numbers("llm_draws", float, 0.0, 1.0, length=rows)
    lsm = t["lsm_weight"]
    if not isinstance(lsm, (int, float)) or isinstance(lsm, bool) or not 0.0 < lsm < 1.0:
        raise MakeCaseError(f"train_case.lsm_weight={lsm!r}: expected a number in (0, 1)")
    flow_rows = len(numbers("flow_token_len", int, 1))
    for key in ("flow_draws", "flow_stream_draws"):
        numbers(key, float, 0.0, 1.0, length=flow_rows + 1)
    numbers("flow_prompt_fraction", float, 0.0, 1.0 + 1e-9)
    for key in ("flow_cfg_rand", "flow_stream_cfg_rand"):
        numbers(key, float, 0.0, 1.0, length=flow_rows)
