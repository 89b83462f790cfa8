"""llm.pt (``CosyVoice3LM`` state_dict) -> cosyjax CosyVoice3LM params.

| torch key                                              | JAX path                                   |
|--------------------------------------------------------|--------------------------------------------|
| llm.model.model.embed_tokens.weight [Vt, D]            | llm/embed_tokens/embedding                 |
| llm.model.model.layers.{i}.self_attn.{q,k,v}_proj.*    | llm/layers_{i}/self_attn/{q,k,v}_proj/...  |
| llm.model.model.layers.{i}.self_attn.o_proj.weight     | llm/layers_{i}/self_attn/o_proj/kernel     |
| llm.model.model.layers.{i}.mlp.{gate,up,down}_proj     | llm/layers_{i}/mlp/{gate,up,down}_proj     |
| llm.model.model.layers.{i}.{input,post_attention}_layernorm.weight | llm/layers_{i}/..._layernorm/weight |
| llm.model.model.norm.weight                            | llm/norm/weight                            |
| speech_embedding.weight [V, D]                         | speech_embedding/embedding                 |
| llm_decoder.weight [V, D]                              | llm_decoder/kernel [D, V]                  |
| llm.model.lm_head.weight                               | consumed: CosyVoice3LM never uses it       |

Linear weights [out, in] become kernels [in, out] as transposed *views*: the 0.5B model is not
copied on the host (the device transfer copies anyway), and a zero-stride shape-only state_dict
stays free.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from cosyjax.config import LLMConfig
from cosyjax.convert.common import ConversionError, Entry, apply_table, linear_t, plain
from cosyjax.llm.qwen2 import param_shapes

PREFIX = "llm.model.model."
LM_HEAD = "llm.model.lm_head.weight"


def param_table(cfg: LLMConfig) -> list[Entry]:
    """Every CosyVoice3LM param with the llm.pt key it comes from."""
    table = [plain(("llm", "embed_tokens", "embedding"), PREFIX + "embed_tokens.weight"),
             plain(("llm", "norm", "weight"), PREFIX + "norm.weight"),
             plain(("speech_embedding", "embedding"), "speech_embedding.weight"),
             plain(("llm_decoder", "kernel"), "llm_decoder.weight", linear_t)]
    for i in range(cfg.num_layers):
        src = f"{PREFIX}layers.{i}."
        dst = ("llm", f"layers_{i}")
        for proj in ("q_proj", "k_proj", "v_proj"):
            table.append(plain(dst + ("self_attn", proj, "kernel"), f"{src}self_attn.{proj}.weight", linear_t))
            table.append(plain(dst + ("self_attn", proj, "bias"), f"{src}self_attn.{proj}.bias"))
        table.append(plain(dst + ("self_attn", "o_proj", "kernel"), f"{src}self_attn.o_proj.weight", linear_t))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            table.append(plain(dst + ("mlp", proj, "kernel"), f"{src}mlp.{proj}.weight", linear_t))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            table.append(plain(dst + (norm, "weight"), f"{src}{norm}.weight"))
    return table


def _same_values(a: np.ndarray, b: np.ndarray, rows: int = 8192) -> bool:
    """Exact equality in row blocks (no full-size temporary for a 151936-row table)."""
    if a.shape != b.shape:
        return False
    if a is b or (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
                  and a.strides == b.strides and a.dtype == b.dtype):
        return True
    return all(np.array_equal(a[i:i + rows], b[i:i + rows]) for i in range(0, a.shape[0], rows))


def check_lm_head(state_dict: Mapping[str, np.ndarray], cfg: LLMConfig, source: str) -> dict[str, str]:
    """Check the unused Qwen lm_head and return the ``consumed`` entry for it (empty if absent).

    With tie_word_embeddings it must equal embed_tokens (HF ties them); otherwise it is an
    independent matrix that CosyVoice3LM computes logits with and discards (SPEC 3.1).
    """
    if LM_HEAD not in state_dict:
        return {}
    head = state_dict[LM_HEAD]
    embed = state_dict.get(PREFIX + "embed_tokens.weight")
    if cfg.tie_word_embeddings:
        if embed is not None and not _same_values(head, embed):
            raise ConversionError(f"{source}: {LM_HEAD} differs from {PREFIX}embed_tokens.weight although "
                                  f"tie_word_embeddings is true")
        return {LM_HEAD: "tied to embed_tokens (checked equal); CosyVoice3LM ignores the Qwen lm_head logits"}
    if embed is not None and head.shape != embed.shape:
        raise ConversionError(f"{source}: {LM_HEAD} has shape {head.shape}, expected {embed.shape}")
    return {LM_HEAD: "untied Qwen lm_head; CosyVoice3LM computes its logits and ignores them"}


def convert(state_dict: Mapping[str, np.ndarray], cfg: LLMConfig, source: str) -> dict[str, Any]:
    """llm.pt state_dict (numpy) -> params pytree (float32 numpy; linear kernels are views).

    Raises ConversionError listing every missing/unexpected key and shape mismatch.
    """
    consumed = check_lm_head(state_dict, cfg, source)
    return apply_table(state_dict, param_table(cfg), param_shapes(cfg), source=source, consumed=consumed)
