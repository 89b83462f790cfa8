"""Seeded random case configs: the dims a parity tolerance has never seen.

A tolerance that was fitted to the committed cases fails on cases made at other dims.  The
``upstream``-marked test (tests/test_random_configs.py) therefore draws case configs
(``make_case``'s CONFIG.yaml schema) from a seed, makes each case with upstream and runs
``cosyjax parity check`` on it: every group must pass.

What is drawn, per seed (ranges chosen to cover what the issue lists: wide HiFT, deep/wide DiT, GQA
ratios 1-8, tied and untied Qwen heads, prompt and target lengths up to a few hundred tokens, while
each case stays a few seconds of upstream work):

- Qwen: head_dim in {8, 12, 16, 32}, kv heads 1-2, GQA ratio 1-8, 1-4 layers, MLP width 1.5-4x;
- speech vocabulary 40-400 codes; streaming chunk 2-8 tokens;
- DiT: width a multiple of 16 (32-192), depth 1-6, 1-8 heads of 8-64, ff_mult 1-4;
- HiFT: base channels 16-128 (a multiple of 8), f0 condnet 16-128;
- lengths: prompt text 2-40, text 3-60, prompt speech 2-300, target speech up to 300 (under the
  max_len = 20 * text limit), HiFT mel up to the whole flow output.

``long`` draws from the upper half of the length ranges only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

HEAD_DIMS = (8, 12, 16, 32)
DIT_HEAD_DIMS = (8, 16, 32, 64)


def random_case_config(seed: int, *, long: bool = False, e2e: bool = True) -> dict[str, Any]:
    """A ``make_case`` CONFIG (as a dict) drawn from ``seed``; see the module docstring for the ranges."""
    rng = np.random.default_rng(seed)

    def pick(values):
        return values[int(rng.integers(len(values)))]

    def between(low, high):  # inclusive
        if long:
            low = (low + high) // 2
        return int(rng.integers(low, high + 1))

    head_dim = int(pick(HEAD_DIMS))
    kv_heads = int(rng.integers(1, 3))
    ratio = int(rng.integers(1, 9))
    heads = kv_heads * ratio
    hidden = heads * head_dim
    qwen = {"hidden_size": hidden, "num_hidden_layers": int(rng.integers(1, 5)), "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "intermediate_size": int(2 * round(hidden * float(rng.uniform(1.5, 4.0)) / 2)),
            "vocab_size": int(rng.integers(200, 700)), "tie_word_embeddings": bool(rng.integers(2))}
    dit_heads = int(rng.integers(1, 9))
    dit = {"dim": 16 * int(rng.integers(2, 13)), "depth": int(rng.integers(1, 7)), "heads": dit_heads,
           "dim_head": int(pick(DIT_HEAD_DIMS)), "ff_mult": int(rng.integers(1, 5))}
    base = 8 * int(rng.integers(2, 17))
    text_len = between(3, 60)
    speech_len = min(between(8, 300), 20 * text_len - 1)
    lookahead = 3
    speech_len = max(speech_len, lookahead + 1)
    case = {"prompt_text_len": between(2, 40), "text_len": text_len, "prompt_speech_len": between(2, 300),
            "speech_len": speech_len}
    case["hift_mel_len"] = int(rng.integers(max(9, speech_len), 2 * speech_len + 1))
    return {
        "name": f"random-{seed}{'-long' if long else ''}",
        "qwen": qwen,
        "speech_token_size": int(rng.integers(40, 401)),
        "chunk_size": int(rng.integers(2, 9)),
        "pre_lookahead_len": lookahead,
        "pre_lookahead_channels": 8 * int(rng.integers(2, 17)),
        "dit": dit,
        "hift_base_channels": base,
        "hift_f0_cond_channels": 8 * int(rng.integers(2, 17)),
        "e2e": bool(e2e),
        "case": case,
    }


__all__ = ["random_case_config"]
