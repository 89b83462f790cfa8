"""hift.pt (CausalHiFTGenerator) -> cosyjax hift params.

Like upstream's ``CosyVoiceModel.load``, every occurrence of ``generator.`` is removed from the keys
first, so a HiFiGAN training checkpoint (``generator.`` prefixed) converts too.  Weight-normed
convs accept both ``parametrizations.weight.original0/1`` and the legacy ``weight_g``/``weight_v``
keys and are folded to plain kernels (float32, torch's own ``_weight_norm``), except the f0
predictor's, which keep g and v because upstream folds them in float64 at run time.  Every key maps to a
param; there are no buffers in the state_dict (``rand_ini``/``sine_waves`` are plain attributes).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from cosyjax.config import HiftConfig
from cosyjax.convert.common import Entry, apply_table, conv1d_t, identity, linear_t, plain, strip_prefix, weight_normed
from cosyjax.hift.f0 import NUM_CONVS
from cosyjax.hift.generator import param_shapes, source_down_rates

GENERATOR_PREFIX = "generator."


def _wn_conv(path: tuple[str, ...], module: str) -> list[Entry]:
    return [weight_normed(path + ("kernel",), module), plain(path + ("bias",), f"{module}.bias")]


def _wn_factors(path: tuple[str, ...], module: str) -> list[Entry]:
    """A weight-normed conv kept as (g, v) for run-time folding (f0 predictor, see cosyjax/hift/f0.py)."""
    new, old = f"{module}.parametrizations.weight.", f"{module}."
    return [Entry(path + ("weight_g",), (new + "original0",), _g_vector, alternatives=((old + "weight_g",),)),
            Entry(path + ("weight_v",), (new + "original1",), conv1d_t, alternatives=((old + "weight_v",),)),
            plain(path + ("bias",), f"{module}.bias")]


def _g_vector(g: np.ndarray) -> np.ndarray:
    """weight-norm g [out, 1, 1] -> [out]."""
    if g.ndim != 3 or g.shape[1:] != (1, 1):
        return g  # apply_table reports the shape mismatch
    return np.ascontiguousarray(g.reshape(g.shape[0]))


def _conv(path: tuple[str, ...], module: str) -> list[Entry]:
    return [plain(path + ("kernel",), f"{module}.weight", conv1d_t), plain(path + ("bias",), f"{module}.bias")]


def _resblock(path: tuple[str, ...], module: str, num_dilations: int) -> list[Entry]:
    table = []
    for i in range(num_dilations):
        table += _wn_conv(path + (f"convs1_{i}",), f"{module}.convs1.{i}")
        table += _wn_conv(path + (f"convs2_{i}",), f"{module}.convs2.{i}")
        table.append(plain(path + (f"activations1_{i}", "alpha"), f"{module}.activations1.{i}.alpha", identity))
        table.append(plain(path + (f"activations2_{i}", "alpha"), f"{module}.activations2.{i}.alpha", identity))
    return table


def param_table(cfg: HiftConfig) -> list[Entry]:
    """One entry per hift param: JAX path <- torch key(s) (after removing ``generator.``)."""
    table = _wn_conv(("conv_pre",), "conv_pre")
    for i in range(len(cfg.upsample_rates)):
        table += _wn_conv((f"ups_{i}",), f"ups.{i}")
    for i, _ in enumerate(source_down_rates(cfg)):
        table += _conv((f"source_downs_{i}",), f"source_downs.{i}")
        table += _resblock((f"source_resblocks_{i}",), f"source_resblocks.{i}",
                           len(cfg.source_resblock_dilation_sizes[i]))
    kernels = len(cfg.resblock_kernel_sizes)
    for i in range(len(cfg.upsample_rates)):
        for j in range(kernels):
            n = i * kernels + j
            table += _resblock((f"resblocks_{n}",), f"resblocks.{n}", len(cfg.resblock_dilation_sizes[j]))
    table += _wn_conv(("conv_post",), "conv_post")
    table += [plain(("m_source", "l_linear", "kernel"), "m_source.l_linear.weight", linear_t),
              plain(("m_source", "l_linear", "bias"), "m_source.l_linear.bias")]
    for i in range(NUM_CONVS):
        table += _wn_factors(("f0_predictor", f"condnet_{2 * i}"), f"f0_predictor.condnet.{2 * i}")
    table += [plain(("f0_predictor", "classifier", "kernel"), "f0_predictor.classifier.weight", linear_t),
              plain(("f0_predictor", "classifier", "bias"), "f0_predictor.classifier.bias")]
    return table


def convert(state_dict: Mapping[str, np.ndarray], cfg: HiftConfig, source: str) -> dict[str, Any]:
    """hift.pt state_dict (numpy) -> hift params pytree (float32 numpy).

    Raises ConversionError listing missing/unexpected keys and shape mismatches (and key collisions
    after removing ``generator.``).
    """
    state_dict = strip_prefix(state_dict, GENERATOR_PREFIX)
    return apply_table(state_dict, param_table(cfg), param_shapes(cfg), source=source)
