"""flow.pt (CausalMaskedDiffWithDiT) -> cosyjax flow params, and the decoder's fixed noise.

Every state_dict key maps to one param except ``decoder.estimator.rotary_embed.inv_freq``: a
persistent buffer of x-transformers' RotaryEmbedding that cosyjax recomputes from its formula, so
the converter only checks it equals that formula.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from cosyjax.config import FlowConfig
from cosyjax.convert.common import ConversionError, Entry, apply_table, conv1d_t, identity, linear_t, plain

EST = "decoder.estimator"
INV_FREQ_KEY = f"{EST}.rotary_embed.inv_freq"
NOISE_SEED = 0
NOISE_CHANNELS = 80  # CausalConditionalCFM hardcodes torch.randn([1, 80, 50 * 300])


def _dense(path: tuple[str, ...], module: str) -> list[Entry]:
    return [plain(path + ("kernel",), f"{module}.weight", linear_t), plain(path + ("bias",), f"{module}.bias")]


def _conv(path: tuple[str, ...], module: str) -> list[Entry]:
    return [plain(path + ("kernel",), f"{module}.weight", conv1d_t), plain(path + ("bias",), f"{module}.bias")]


def param_table(cfg: FlowConfig) -> list[Entry]:
    """One entry per flow param: JAX path <- torch key, with its named transform."""
    est = ("estimator",)
    table = [
        plain(("input_embedding", "embedding"), "input_embedding.weight", identity),
        *_dense(("spk_embed_affine_layer",), "spk_embed_affine_layer"),
        *_conv(("pre_lookahead_layer", "conv1"), "pre_lookahead_layer.conv1"),
        *_conv(("pre_lookahead_layer", "conv2"), "pre_lookahead_layer.conv2"),
        *_dense(est + ("time_embed", "time_mlp_0"), f"{EST}.time_embed.time_mlp.0"),
        *_dense(est + ("time_embed", "time_mlp_2"), f"{EST}.time_embed.time_mlp.2"),
        *_dense(est + ("input_embed", "proj"), f"{EST}.input_embed.proj"),
        *_conv(est + ("input_embed", "conv_pos_embed", "conv1"), f"{EST}.input_embed.conv_pos_embed.conv1.0"),
        *_conv(est + ("input_embed", "conv_pos_embed", "conv2"), f"{EST}.input_embed.conv_pos_embed.conv2.0"),
    ]
    for i in range(cfg.depth):
        block, key = est + (f"transformer_blocks_{i}",), f"{EST}.transformer_blocks.{i}"
        table += _dense(block + ("attn_norm", "linear"), f"{key}.attn_norm.linear")
        for proj in ("to_q", "to_k", "to_v"):
            table += _dense(block + ("attn", proj), f"{key}.attn.{proj}")
        table += _dense(block + ("attn", "to_out_0"), f"{key}.attn.to_out.0")
        table += _dense(block + ("ff", "ff_0_0"), f"{key}.ff.ff.0.0")
        table += _dense(block + ("ff", "ff_2"), f"{key}.ff.ff.2")
    table += _dense(est + ("norm_out", "linear"), f"{EST}.norm_out.linear")
    table += _dense(est + ("proj_out",), f"{EST}.proj_out")
    return table


def _check_inv_freq(state_dict: Mapping[str, np.ndarray], cfg: FlowConfig, source: str) -> None:
    from cosyjax.flow.dit import rotary_inv_freq

    found = np.asarray(state_dict[INV_FREQ_KEY], np.float32)
    want = rotary_inv_freq(cfg.dim_head)
    if found.shape != want.shape:
        raise ConversionError(f"{source}: {INV_FREQ_KEY} has shape {found.shape}, expected {want.shape} "
                              f"(dim_head={cfg.dim_head})")
    # rtol 1e-6 allows a 1-ulp difference from another torch build's pow; anything else is a
    # different rotary (base, dim or rescale) that cosyjax would not reproduce.
    if not np.allclose(found, want, rtol=1e-6, atol=0.0):
        i = int(np.argmax(np.abs(found - want)))
        raise ConversionError(f"{source}: {INV_FREQ_KEY}[{i}] = {found[i]!r} differs from "
                              f"10000^(-2*{i}/{cfg.dim_head}) = {want[i]!r}; a rotary with another base "
                              f"or dim is not supported")


def convert(state_dict: Mapping[str, np.ndarray], cfg: FlowConfig, source: str) -> dict[str, Any]:
    """flow.pt state_dict (numpy) -> flow params pytree (float32 numpy).

    Raises ConversionError listing missing/unexpected keys and shape mismatches, or naming a rotary
    ``inv_freq`` buffer that differs from its formula.
    """
    from cosyjax.flow.flow import param_shapes

    if INV_FREQ_KEY not in state_dict:
        raise ConversionError(f"{source}: missing keys: {INV_FREQ_KEY}")
    _check_inv_freq(state_dict, cfg, source)
    consumed = {INV_FREQ_KEY: "x-transformers RotaryEmbedding buffer; recomputed from its formula (checked)"}
    return apply_table(state_dict, param_table(cfg), param_shapes(cfg), source=source, consumed=consumed)


def rand_noise(cfg: FlowConfig) -> np.ndarray:
    """CausalConditionalCFM's fixed noise [1, 80, cfg.noise_frames], float32.

    Upstream: ``set_all_random_seed(0); torch.randn([1, 80, 50 * 300])`` on CPU.  A local
    ``torch.Generator`` seeded 0 draws the same numbers (tests check it) without touching the
    global RNG state.
    """
    import torch

    generator = torch.Generator(device="cpu").manual_seed(NOISE_SEED)
    return torch.randn([1, NOISE_CHANNELS, cfg.noise_frames], generator=generator, dtype=torch.float32).numpy()
