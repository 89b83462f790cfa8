"""ONNX -> JAX conversion of the two prompt-frontend models (``speech_tokenizer_v3.onnx``, ``campplus.onnx``).

The files are read with the ``onnx`` package (protobuf only; no onnxruntime, no torch).  An exported
graph names most weights anonymously (``onnx::MatMul_2228``: torch folds the transposes, casts and
BatchNorms into new constants), so a weight is identified by the node that consumes it, as the
``s3tokenizer`` package's ``onnx2torch_v3`` does: the exporter names nodes after the torch module
path (``/blocks.0/mlp/mlp.0/MatMul`` is module ``blocks.0.mlp.0``), and the operand slot gives the
role.  :func:`onnx_state_dict` turns a graph into a torch-style state dict this way:

==========================  ==========================================================
consumer                    keys
==========================  ==========================================================
Conv                        ``<module>.weight`` (input 1), ``<module>.bias`` (input 2)
MatMul                      ``<module>.weight``: the constant operand, [in, out]
Gemm                        ``<module>.weight`` ([in, out] whatever ``transB``), ``<module>.bias``
Add in a MatMul/Gemm module ``<module>.bias``
Mul / Add in a norm module  ``<module>.weight`` / ``<module>.bias`` (decomposed LayerNorm of
                            opsets < 17: the module also holds a ReduceMean)
LayerNormalization          ``<module>.weight``, ``<module>.bias``
BatchNormalization          ``<module>.weight``, ``.bias``, ``.running_mean``, ``.running_var``
==========================  ==========================================================

Constants with one element (eps, scales) and constants consumed by other ops (the rotary table, shape
tensors, the FSQ powers) are graph structure, not weights.  The state dict then goes through a table
of ``(jax path, key, named transform)`` with ``convert.common.apply_table``: one error lists every
missing key, unexpected key and shape mismatch, prefixed with the file.  Dimensions are read from the
weights' shapes; the tokenizer's head count is not visible in them and is an argument (20 in the
release).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from cosyjax.convert.common import ConversionError, Entry, apply_table, conv1d_t, identity, plain
from cosyjax.frontend import campplus as campplus_model
from cosyjax.frontend import s3tokenizer as tokenizer_model
from cosyjax.frontend.campplus import CAMPPlusConfig
from cosyjax.frontend.s3tokenizer import S3TokenizerConfig

SPEECH_TOKENIZER = "speech_tokenizer_v3.onnx"
SPEAKER_ENCODER = "campplus.onnx"
RELEASE_N_HEAD = S3TokenizerConfig().n_head
_LINEAR_OPS = ("MatMul", "Gemm")
_BN_SLOTS = {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"}


def load_onnx(path: str):
    """``onnx.load`` with errors that name the file."""
    try:
        import onnx
    except ImportError as e:
        raise ConversionError(f"{path}: reading ONNX weights needs the onnx package (pip install onnx)") from e
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: model file not found")
    try:
        return onnx.load(path)
    except Exception as e:  # protobuf DecodeError, missing external data, ...
        raise ConversionError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None


def module_path(node_name: str) -> str:
    """``/blocks.0/mlp/mlp.0/MatMul`` -> ``blocks.0.mlp.0``; ``/head/layer1/layer1.0/conv1/Conv`` ->
    ``head.layer1.0.conv1``.  The exporter repeats a container's name in its children's scopes
    (``mlp/mlp.0``); the repeat is dropped.  A node without a scope gives ``""``."""
    parts = [p for p in node_name.split("/") if p][:-1]
    out: list[str] = []
    for i, p in enumerate(parts):
        if i and p.startswith(parts[i - 1] + "."):
            p = p[len(parts[i - 1]) + 1:]
        out.append(p)
    return ".".join(out)


def onnx_state_dict(model: Any, source: str) -> dict[str, np.ndarray]:
    """Torch-style ``{key: float32 array}`` of an exported graph's weights (rules in the module doc).

    Raises:
      ConversionError: two weights claim one key, or a weight is not float32.
    """
    from onnx import numpy_helper

    graph = model.graph
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    for node in graph.node:  # the exporter shares equal constants through Identity nodes
        if node.op_type == "Identity" and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    scopes: dict[str, set[str]] = {}
    for node in graph.node:
        scopes.setdefault(module_path(node.name), set()).add(node.op_type)

    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []

    def claim(key: str, name: str, value: np.ndarray, node_name: str) -> None:
        if key in out:
            problems.append(f"{key} claimed by {origin[key]} and {name} ({node_name})")
            return
        if value.dtype != np.float32:
            problems.append(f"{key} ({name}) is {value.dtype}, expected float32")
            return
        out[key], origin[key] = value, f"{name} ({node_name})"

    for node in graph.node:
        module = module_path(node.name)
        if not module:
            continue
        slots = [(i, name) for i, name in enumerate(node.input) if name in consts]
        op = node.op_type
        if op == "Conv":
            for i, name in slots:
                if i in (1, 2):
                    claim(f"{module}.{'weight' if i == 1 else 'bias'}", name, consts[name], node.name)
        elif op == "MatMul":
            for i, name in slots:
                claim(f"{module}.weight", name, consts[name], node.name)
        elif op == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            for i, name in slots:
                if i == 1:
                    claim(f"{module}.weight", name, consts[name].T if trans_b else consts[name], node.name)
                elif i == 2:
                    claim(f"{module}.bias", name, consts[name], node.name)
        elif op in ("Add", "Mul"):
            norm = "ReduceMean" in scopes[module] and not scopes[module] & {"MatMul", "Gemm", "Conv"}
            linear = bool(scopes[module] & set(_LINEAR_OPS))
            for i, name in slots:
                if consts[name].size <= 1:
                    continue
                if op == "Add" and (linear or norm):
                    claim(f"{module}.bias", name, consts[name], node.name)
                elif op == "Mul" and norm:
                    claim(f"{module}.weight", name, consts[name], node.name)
        elif op == "LayerNormalization":
            for i, name in slots:
                if i in (1, 2):
                    claim(f"{module}.{'weight' if i == 1 else 'bias'}", name, consts[name], node.name)
        elif op == "BatchNormalization":
            for i, name in slots:
                if i in _BN_SLOTS:
                    claim(f"{module}.{_BN_SLOTS[i]}", name, consts[name], node.name)
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems))
    return out


def conv2d_t(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] -> HWIO kernel [kh, kw, in, out] (a view)."""
    return np.transpose(w, (2, 3, 1, 0))


def _require(sd: Mapping[str, np.ndarray], keys: tuple[str, ...], source: str, what: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ConversionError(f"{source}: not the released {what} architecture: no weight for "
                              f"{', '.join(missing)} (found {len(sd)} weights"
                              f"{': ' + ', '.join(sorted(sd)[:6]) + ', ...' if sd else ''})")


def _count(sd: Mapping[str, np.ndarray], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


# --------------------------------------------------------------------------------------------
# Speech tokenizer v3
# --------------------------------------------------------------------------------------------
def tokenizer_config(sd: Mapping[str, np.ndarray], *, n_head: int, source: str) -> S3TokenizerConfig:
    """Dimensions from the weights (``conv1``: [D, M, 3], ``blocks.N``, ``fsmn_block``: [D, 1, K])."""
    _require(sd, ("conv1.weight", "blocks.0.attn.fsmn_block.weight"), source, "speech tokenizer v3")
    n_state, n_mels, _ = sd["conv1.weight"].shape
    try:
        return S3TokenizerConfig(n_mels=int(n_mels), n_state=int(n_state), n_head=int(n_head),
                                 n_layer=_count(sd, r"blocks\.(\d+)\."),
                                 fsmn_kernel=int(sd["blocks.0.attn.fsmn_block.weight"].shape[-1]))
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None


def tokenizer_table(cfg: S3TokenizerConfig) -> list[Entry]:
    """(jax path, key, transform) for every tokenizer param."""
    table = [plain(("conv1", "kernel"), "conv1.weight", conv1d_t), plain(("conv1", "bias"), "conv1.bias"),
             plain(("conv2", "kernel"), "conv2.weight", conv1d_t), plain(("conv2", "bias"), "conv2.bias"),
             plain(("project_in", "kernel"), "quantizer.project_in.weight"),
             plain(("project_in", "bias"), "quantizer.project_in.bias")]
    for i in range(cfg.n_layer):
        b, t = f"blocks_{i}", f"blocks.{i}"
        for ln in ("attn_ln", "mlp_ln"):
            table += [plain((b, ln, "scale"), f"{t}.{ln}.weight"), plain((b, ln, "bias"), f"{t}.{ln}.bias")]
        for lin in ("query", "key", "value", "out"):
            table.append(plain((b, "attn", lin, "kernel"), f"{t}.attn.{lin}.weight", identity))
            if lin != "key":
                table.append(plain((b, "attn", lin, "bias"), f"{t}.attn.{lin}.bias"))
        table.append(plain((b, "attn", "fsmn_block", "kernel"), f"{t}.attn.fsmn_block.weight", conv1d_t))
        for j in (0, 2):
            table += [plain((b, f"mlp_{j}", "kernel"), f"{t}.mlp.{j}.weight"),
                      plain((b, f"mlp_{j}", "bias"), f"{t}.mlp.{j}.bias")]
    return table


def convert_speech_tokenizer(path: str, *, n_head: int = RELEASE_N_HEAD) -> tuple[S3TokenizerConfig, dict]:
    """``speech_tokenizer_v3.onnx`` -> (config, Flax params as float32 numpy).

    Raises:
      ConversionError naming ``path``: unreadable file, not the released architecture, or any
      missing / unexpected / mis-shaped weight (all listed in one message).
    """
    sd = onnx_state_dict(load_onnx(path), path)
    cfg = tokenizer_config(sd, n_head=n_head, source=path)
    params = apply_table(sd, tokenizer_table(cfg), tokenizer_model.init_shapes(cfg), source=path)
    return cfg, params


# --------------------------------------------------------------------------------------------
# CAM++
# --------------------------------------------------------------------------------------------
def campplus_config(sd: Mapping[str, np.ndarray], *, source: str) -> CAMPPlusConfig:
    """Dimensions from the weights: head conv1 [m, 1, 3, 3], tdnn [C0, m * F/8, 5], the first dense
    layer's linear1 [bn, C0, 1] and linear_local [g, bn, k], the dense output [E, 2C, 1]."""
    first = "xvector.block1.tdnnd1"
    _require(sd, ("head.conv1.weight", "xvector.tdnn.linear.weight", f"{first}.linear1.weight",
                  f"{first}.cam_layer.linear_local.weight", "xvector.dense.linear.weight"), source, "CAM++")
    m = int(sd["head.conv1.weight"].shape[0])
    init_channels, head_out, _ = sd["xvector.tdnn.linear.weight"].shape
    n_blocks = _count(sd, r"xvector\.block(\d+)\.")
    layers = tuple(_count(sd, rf"xvector\.block{b}\.tdnnd(\d+)\.") for b in range(1, n_blocks + 1))
    defaults = CAMPPlusConfig()
    if n_blocks != len(defaults.block_layers):
        raise ConversionError(f"{source}: not the released CAM++ architecture: {n_blocks} dense blocks, "
                              f"expected {len(defaults.block_layers)}")
    local = [f"xvector.block{b}.tdnnd1.cam_layer.linear_local.weight" for b in range(1, n_blocks + 1)]
    _require(sd, tuple(local), source, "CAM++")
    kernels = tuple(int(sd[k].shape[-1]) for k in local)
    try:
        return CAMPPlusConfig(feat_dim=int(head_out) // m * 8,
                              embedding_size=int(sd["xvector.dense.linear.weight"].shape[0]),
                              m_channels=m, init_channels=int(init_channels),
                              growth_rate=int(sd[f"{first}.cam_layer.linear_local.weight"].shape[0]),
                              bn_channels=int(sd[f"{first}.linear1.weight"].shape[0]), block_layers=layers,
                              block_kernels=kernels, block_dilations=defaults.block_dilations)
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None


def _batchnorm(path: tuple[str, ...], module: str) -> list[Entry]:
    return [plain(path + (p,), f"{module}.{k}") for p, k in
            (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var"))]


def _conv(name: str, key: str, transform, bias: bool = True) -> list[Entry]:
    out = [plain((name, "kernel"), f"{key}.weight", transform)]
    return out + [plain((name, "bias"), f"{key}.bias")] if bias else out


def campplus_table(cfg: CAMPPlusConfig) -> list[Entry]:
    """(jax path, key, transform) for every CAM++ param (BatchNorms after a single-use conv folded)."""
    table = _conv("head_conv1", "head.conv1", conv2d_t) + _conv("head_conv2", "head.conv2", conv2d_t)
    for layer in (1, 2):
        for j in (0, 1):
            flax, key = f"head_layer{layer}_{j}", f"head.layer{layer}.{j}"
            for conv in ("conv1", "conv2") + (("shortcut_0",) if j == 0 else ()):
                table += [plain((flax, conv, "kernel"), f"{key}.{conv.replace('_', '.')}.weight", conv2d_t),
                          plain((flax, conv, "bias"), f"{key}.{conv.replace('_', '.')}.bias")]
    table += _conv("xvector_tdnn_linear", "xvector.tdnn.linear", conv1d_t)
    last = len(cfg.block_layers)
    for b, n in enumerate(cfg.block_layers, start=1):
        for j in range(1, n + 1):
            flax, key = f"xvector_block{b}_tdnnd{j}", f"xvector.block{b}.tdnnd{j}"
            table += _batchnorm((flax, "nonlinear1_batchnorm"), f"{key}.nonlinear1.batchnorm")
            table += [plain((flax, "linear1", "kernel"), f"{key}.linear1.weight", conv1d_t),
                      plain((flax, "linear1", "bias"), f"{key}.linear1.bias"),
                      plain((flax, "cam_layer_linear_local", "kernel"), f"{key}.cam_layer.linear_local.weight",
                            conv1d_t)]
            for lin in ("linear1", "linear2"):
                table += [plain((flax, f"cam_layer_{lin}", "kernel"), f"{key}.cam_layer.{lin}.weight", conv1d_t),
                          plain((flax, f"cam_layer_{lin}", "bias"), f"{key}.cam_layer.{lin}.bias")]
        table += _batchnorm((f"xvector_transit{b}_nonlinear_batchnorm",), f"xvector.transit{b}.nonlinear.batchnorm")
        table += _conv(f"xvector_transit{b}_linear", f"xvector.transit{b}.linear", conv1d_t, bias=b == last)
    table += _conv("xvector_dense_linear", "xvector.dense.linear", conv1d_t, bias=False)
    table += _batchnorm(("xvector_dense_nonlinear_batchnorm",), "xvector.dense.nonlinear.batchnorm")
    return table


def convert_campplus(path: str) -> tuple[CAMPPlusConfig, dict]:
    """``campplus.onnx`` -> (config, Flax params as float32 numpy).

    Raises:
      ConversionError naming ``path`` (as :func:`convert_speech_tokenizer`).
    """
    sd = onnx_state_dict(load_onnx(path), path)
    cfg = campplus_config(sd, source=path)
    params = apply_table(sd, campplus_table(cfg), campplus_model.init_shapes(cfg), source=path)
    return cfg, params


def convert_frontend_to_dir(model_dir: str, out_dir: str, *, n_head: int = RELEASE_N_HEAD,
                            overwrite: bool = False, source: Mapping[str, Any] | None = None) -> str:
    """Convert a release's ``speech_tokenizer_v3.onnx`` and ``campplus.onnx`` to an orbax directory.

    Args:
      model_dir: directory holding the two ONNX files.
      out_dir: output (written atomically; ``cosyjax.frontend.jax_models.load_frontend`` reads it).
      n_head: the tokenizer's attention heads (20 in the release; not visible in the weights).
      overwrite: replace an existing ``out_dir``.
      source: extra provenance to record (e.g. a fingerprint of the files).
    Returns:
      ``out_dir`` (absolute).
    Raises:
      ConversionError naming the offending file; nothing is written then.
    """
    from cosyjax.frontend.jax_models import save_frontend

    tok_path = os.path.join(model_dir, SPEECH_TOKENIZER)
    cam_path = os.path.join(model_dir, SPEAKER_ENCODER)
    tokenizer = convert_speech_tokenizer(tok_path, n_head=n_head)
    speaker_encoder = convert_campplus(cam_path)
    return save_frontend(out_dir, tokenizer, speaker_encoder, overwrite=overwrite,
                         source={"files": [SPEECH_TOKENIZER, SPEAKER_ENCODER], "n_head": n_head, **(source or {})})
