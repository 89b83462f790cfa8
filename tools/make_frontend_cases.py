#!/usr/bin/env python
"""Build the small ONNX parity cases of the two prompt-frontend models (``tests/data/frontend-models``).

Usage::

    pip install --no-deps s3tokenizer==0.3.0 einops      # torch definitions of the speech tokenizer
    git clone https://github.com/modelscope/3D-Speaker ~/src/3D-Speaker   # CAM++ (speakerlab)
    python tools/make_frontend_cases.py --speakerlab-repo ~/src/3D-Speaker [--out tests/data/frontend-models]

Both models are built from their torch definitions at small sizes with random weights (every
parameter and BatchNorm statistic drawn, so the exporter shares no constants between them) and
exported the way the releases were, with TorchScript ``torch.onnx.export`` (constant folding, eval
mode), so the initializer and node names are the released kind (``onnx::MatMul_N`` consumed by
``/blocks.0/attn/query/MatMul``, ``blocks.0.attn.fsmn_block.weight``, ``quantizer.project_in.bias``):

* ``model/speech_tokenizer_v3.onnx``: ``s3tokenizer.model_v3`` blocks (``ResidualAttentionBlockV3``)
  and convs under the release's top-level names (``conv1``, ``conv2``, ``blocks.N``,
  ``quantizer.project_in``, as ``s3tokenizer.onnx2torch_v3`` reads them), opset 14 (LayerNorm
  decomposed into ``attn_ln/Mul`` + ``attn_ln/Add_1``, as in the release), inputs ``feats`` [1, 128, T]
  float32 and ``feats_length`` [1] int32, output [1, ceil(T/4)] int32. Sizes: D 32, 2 heads, 2 blocks,
  FSMN kernel 31, 128 mels. ONNX has no complex numbers, so the rotary table is the real (cos, sin)
  pair of s3tokenizer's ``precompute_freqs_cis(head_dim, P)``; P is cut from 2048 to 512 positions
  (2048 frames) to keep the file small. FSQ runs ``project_in`` on [B, T, D] (MatMul + Add, as the
  release names ``quantizer.project_in.bias``).
  Checked here: ``s3tokenizer.onnx2torch_v3`` reads the file back into ``S3TokenizerV3`` with no
  missing or unexpected key, and that torch model gives onnxruntime's tokens.
* ``model/campplus.onnx``: 3D-Speaker's ``CAMPPlus`` (``speakerlab.models.campplus.DTDNN``) with its
  block structure unchanged (12/24/16 layers, kernel 3, dilations 1/2/2) and small widths: FCM 4
  channels, init 8, growth 4, bn_size 1, embedding 16; exported as 3D-Speaker's
  ``export_speaker_embedding_onnx.py`` does (opset 11) with CosyVoice's input name ``input``
  [B, T, 80] (its TensorRT profile names it) and output ``output`` [B, E].
  Checked here: onnxruntime's embedding equals the torch model's within float32 rounding.

``golden.npz`` holds what each parity group feeds both models, a numpy seed and the frame counts (the
features are drawn by ``cosyjax.parity.stages.frontend``, 1.6 MB of them would not fit here), and
onnxruntime's outputs on them, each utterance run alone as upstream does. Rerunning gives the same
ONNX files byte for byte on the same torch version (the seeds are fixed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tests", "data", "frontend-models")
TOKENIZER = {"n_mels": 128, "n_state": 32, "n_head": 2, "n_layer": 2, "rotary_positions": 512}
CAMPPLUS = {"feat_dim": 80, "embedding_size": 16, "m_channels": 4, "init_channels": 8, "growth_rate": 4,
            "bn_size": 1}
TOKENIZER_OPSET = 14
CAMPPLUS_OPSET = 11
# frame counts fed by the parity groups: long and short utterances, odd lengths (the stride-2 convs),
# lengths below one token hop, and the rotary table's limit (2048 frames = 512 tokens)
TOKENIZER_FRAMES = (2048, 2000, 1999, 1998, 1997, 1601, 1203, 1000, 801, 555, 301, 123, 17, 5, 4, 3, 2, 1)
CAMPPLUS_FRAMES = (1000, 777, 401, 250, 199, 101, 100, 99, 50, 10, 4, 3)


def _import_s3tokenizer():
    """``s3tokenizer`` imports torchaudio only for its audio loader; torchaudio's wheel does not import
    next to the CPU torch here (ENV.md), so a stand-in that fails on use is put in its place."""
    if "torchaudio" not in sys.modules:
        try:
            import torchaudio  # noqa: F401
        except Exception:
            stub = types.ModuleType("torchaudio")

            def _unavailable(*_, **__):
                raise RuntimeError("torchaudio stand-in: not needed to build the cases")

            stub.load = _unavailable
            stub.transforms = types.SimpleNamespace(Resample=_unavailable)
            sys.modules["torchaudio"] = stub
    import s3tokenizer.model_v2 as model_v2
    import s3tokenizer.model_v3 as model_v3
    from s3tokenizer.utils import onnx2torch_v3

    return model_v2, model_v3, onnx2torch_v3


def _randomize(module, seed: int) -> None:
    """Draw every float parameter and BatchNorm statistic (no two equal, so none is shared)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        with torch.no_grad():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # norm scales
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def build_tokenizer(seed: int):
    """The tokenizer under the release's module names; returns (export module, s3tokenizer pieces)."""
    import torch

    model_v2, model_v3, _ = _import_s3tokenizer()
    cfg = TOKENIZER
    head_dim = cfg["n_state"] // cfg["n_head"]
    table = torch.view_as_real(model_v2.precompute_freqs_cis(head_dim, cfg["rotary_positions"]))  # [P, H, 2]

    def rotary(xq, xk, freqs_cis):
        # s3tokenizer's apply_rotary_emb with the complex table split into its real (cos, sin) parts
        cos = freqs_cis[..., 0].unsqueeze(0).unsqueeze(2)
        sin = freqs_cis[..., 1].unsqueeze(0).unsqueeze(2)
        half = xq.shape[-1] // 2
        return (xq * cos + torch.cat((-xq[..., half:], xq[..., :half]), -1) * sin,
                xk * cos + torch.cat((-xk[..., half:], xk[..., :half]), -1) * sin)

    model_v2.apply_rotary_emb = rotary  # resolved by FSMNMultiHeadAttention.qkv_attention at call time

    class Quantizer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.project_in = torch.nn.Linear(cfg["n_state"], 8)

        def forward(self, x):  # FSQCodebook.encode on [B, T, D]
            h = torch.tanh(self.project_in(x).float()) * 0.9990000128746033
            h = h.round() + 1
            powers = torch.pow(3, torch.arange(8, dtype=h.dtype))
            return torch.sum(h * powers, dim=-1).int()

    class Tokenizer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            encoder = model_v3.AudioEncoderV3(cfg["n_mels"], cfg["n_state"], cfg["n_head"], cfg["n_layer"], 2, False)
            self.stride = encoder.stride
            self.conv1, self.conv2, self.blocks = encoder.conv1, encoder.conv2, encoder.blocks
            self.freqs_cis = table
            self.quantizer = Quantizer()

        def forward(self, feats, feats_length):
            hidden, _ = model_v3.AudioEncoderV3.forward(self, feats, feats_length)
            return self.quantizer(hidden)

    model = Tokenizer()
    _randomize(model, seed)
    return model.eval(), table


def build_campplus(speakerlab_repo: str, seed: int):
    import torch

    sys.path.insert(0, os.path.abspath(speakerlab_repo))
    from speakerlab.models.campplus import DTDNN

    cfg = CAMPPLUS
    defaults = list(DTDNN.FCM.__init__.__defaults__)  # (block, num_blocks, m_channels, feat_dim)
    saved = tuple(defaults)
    defaults[2] = cfg["m_channels"]  # CAMPPlus builds FCM(feat_dim=...) with the default width
    DTDNN.FCM.__init__.__defaults__ = tuple(defaults)
    try:
        torch.manual_seed(seed)
        model = DTDNN.CAMPPlus(feat_dim=cfg["feat_dim"], embedding_size=cfg["embedding_size"],
                               growth_rate=cfg["growth_rate"], bn_size=cfg["bn_size"],
                               init_channels=cfg["init_channels"])
    finally:
        DTDNN.FCM.__init__.__defaults__ = saved
    _randomize(model, seed)
    return model.eval()


def _export(model, args, path, opset, input_names, output_names, dynamic_axes):
    import torch

    with torch.no_grad():
        torch.onnx.export(model, args, path, dynamo=False, export_params=True, opset_version=opset,
                          do_constant_folding=True, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes)


def _session(path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def check_tokenizer(path: str, table) -> dict:
    """s3tokenizer reads the file back with no missing/unexpected key and agrees with onnxruntime."""
    import torch

    _, model_v3, onnx2torch_v3 = _import_s3tokenizer()
    cfg = TOKENIZER
    ref = model_v3.S3TokenizerV3("case", model_v3.ModelConfigV3(
        n_mels=cfg["n_mels"], n_audio_state=cfg["n_state"], n_audio_head=cfg["n_head"], n_audio_layer=cfg["n_layer"]))
    ref.encoder.freqs_cis = table
    state = onnx2torch_v3(path, None, False)
    result = ref.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"s3tokenizer.onnx2torch_v3 on {path}: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}")
    session = _session(path)
    rng = np.random.default_rng(1)
    total = agree = 0
    for frames in (1000, 333, 64, 5):
        feats = (0.5 * rng.standard_normal((1, cfg["n_mels"], frames))).astype(np.float32)
        onnx_tokens = session.run(None, {"feats": feats, "feats_length": np.array([frames], np.int32)})[0][0]
        torch_tokens, _ = ref.quantize(torch.from_numpy(feats), torch.tensor([frames]))
        total += onnx_tokens.size
        agree += int((torch_tokens[0].numpy() == onnx_tokens).sum())
    if agree < total - 2:  # FSQ rounding ties may flip a token or two between the two runtimes
        raise RuntimeError(f"s3tokenizer torch model and onnxruntime disagree on {total - agree} of {total} tokens")
    return {"onnx2torch_v3_strict_load": True, "torch_vs_onnxruntime_tokens": f"{agree}/{total}"}


def check_campplus(path: str, model) -> dict:
    import torch

    session = _session(path)
    rng = np.random.default_rng(2)
    worst = 0.0
    for frames in (345, 100, 7):
        feats = rng.standard_normal((1, frames, CAMPPLUS["feat_dim"])).astype(np.float32)
        ours = session.run(None, {"input": feats})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(feats)).numpy()
        worst = max(worst, float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref))))
    if worst > 1e-4:
        raise RuntimeError(f"CAM++ torch model and onnxruntime differ by {worst:.3g} (relative)")
    return {"torch_vs_onnxruntime_max_rel": worst}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def build(out: str, speakerlab_repo: str, seed: int = 0) -> None:
    import onnx
    import onnxruntime
    import torch

    from cosyjax.atomic import staged_dir

    torch.set_num_threads(1)
    with staged_dir(out) as tmp:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a committed case is world-readable
        model_dir = os.path.join(tmp, "model")
        os.makedirs(model_dir)
        tok_path = os.path.join(model_dir, "speech_tokenizer_v3.onnx")
        tokenizer, table = build_tokenizer(seed)
        _export(tokenizer, (torch.zeros(1, TOKENIZER["n_mels"], 100), torch.tensor([100], dtype=torch.int32)),
                tok_path, TOKENIZER_OPSET, ["feats", "feats_length"], ["indices"],
                {"feats": {2: "T"}, "indices": {1: "T_token"}})
        cam_path = os.path.join(model_dir, "campplus.onnx")
        campplus = build_campplus(speakerlab_repo, seed + 1)
        _export(campplus, (torch.zeros(1, 345, CAMPPLUS["feat_dim"]),), cam_path, CAMPPLUS_OPSET, ["input"],
                ["output"], {"input": {0: "batch", 1: "frames"}, "output": {0: "batch"}})
        checks = {"speech_tokenizer": check_tokenizer(tok_path, table), "campplus": check_campplus(cam_path, campplus)}
        from cosyjax.frontend.onnx_models import SpeakerEncoderONNX, SpeechTokenizerONNX
        from cosyjax.parity.stages.frontend import campplus_inputs, tokenizer_inputs

        tok_feats = tokenizer_inputs(seed + 10, TOKENIZER_FRAMES, TOKENIZER["n_mels"])
        tokens = [SpeechTokenizerONNX(tok_path).tokens_from_features(f) for f in tok_feats]
        cam_feats = campplus_inputs(seed + 11, CAMPPLUS_FRAMES, CAMPPLUS["feat_dim"])
        embeddings = np.stack([SpeakerEncoderONNX(cam_path).embedding_from_features(f) for f in cam_feats])
        golden = {
            "frontend_tokenizer/seed": np.int64(seed + 10),
            "frontend_tokenizer/frame_lengths": np.array(TOKENIZER_FRAMES, np.int64),
            "frontend_tokenizer/tokens": np.concatenate(tokens).astype(np.int64),
            "frontend_tokenizer/token_lengths": np.array([len(t) for t in tokens], np.int64),
            "frontend_campplus/seed": np.int64(seed + 11),
            "frontend_campplus/frame_lengths": np.array(CAMPPLUS_FRAMES, np.int64),
            "frontend_campplus/embedding": embeddings.astype(np.float32),
        }
        np.savez(os.path.join(tmp, "golden.npz"), **golden)
        manifest = {
            "frontend_tokenizer/seed": {"shape": [], "dtype": "int64", "desc": "numpy seed of the features "
                                        "(cosyjax.parity.stages.frontend.tokenizer_inputs)"},
            "frontend_tokenizer/frame_lengths": {
                "shape": [len(TOKENIZER_FRAMES)], "dtype": "int64",
                "desc": "100 Hz frames of each utterance fed to model/speech_tokenizer_v3.onnx"},
            "frontend_tokenizer/tokens": {
                "shape": list(golden["frontend_tokenizer/tokens"].shape), "dtype": "int64",
                "desc": "onnxruntime's tokens of every utterance (one at a time), concatenated"},
            "frontend_tokenizer/token_lengths": {"shape": [len(TOKENIZER_FRAMES)], "dtype": "int64",
                                                 "desc": "tokens per utterance (ceil(frames / 4))"},
            "frontend_campplus/embedding": {"shape": list(embeddings.shape), "dtype": "float32",
                                            "desc": "onnxruntime's embedding of every utterance (one at a time)"},
            "frontend_campplus/seed": {"shape": [], "dtype": "int64", "desc": "numpy seed of the features "
                                       "(cosyjax.parity.stages.frontend.campplus_inputs)"},
            "frontend_campplus/frame_lengths": {"shape": [len(CAMPPLUS_FRAMES)], "dtype": "int64",
                                                "desc": "fbank frames of each utterance fed to model/campplus.onnx"},
        }
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        import s3tokenizer

        meta = {
            "config_name": "frontend-models",
            "seed": seed,
            "speech_tokenizer": {**TOKENIZER, "opset": TOKENIZER_OPSET, "sha256": _sha256(tok_path),
                                 "bytes": os.path.getsize(tok_path)},
            "campplus": {**CAMPPLUS, "opset": CAMPPLUS_OPSET, "sha256": _sha256(cam_path),
                         "bytes": os.path.getsize(cam_path)},
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                         "s3tokenizer": getattr(s3tokenizer, "__version__", "0.3.0"), "numpy": np.__version__},
            "checks": checks,
            "made_by": "tools/make_frontend_cases.py",
        }
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    print(json.dumps(meta, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speakerlab-repo", required=True, help="a 3D-Speaker checkout (holds speakerlab/)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build(args.out, args.speakerlab_repo, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
