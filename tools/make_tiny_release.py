#!/usr/bin/env python
"""Build a complete, tiny, random-weight CosyVoice3 release directory for end-to-end tests.

Usage::

    python tools/make_tiny_release.py [--source tests/data/tiny-a/model] [--out tests/data/tiny-release]

The output has the layout of the real ``Fun-CosyVoice3-0.5B`` release::

    cosyvoice3.yaml  flow.pt  hift.pt          copied unchanged from --source
    llm.pt                                     --source's llm.pt, text embedding grown if needed (below)
    speech_tokenizer_v3.onnx  campplus.onnx    tiny deterministic stand-ins (below)
    CosyVoice-BlankEN/                         Qwen2 config.json, generation_config.json,
                                               model.safetensors, and a tiny Qwen2-style BPE tokenizer
    TINY_RELEASE.md                            what was built and how

Tokenizer. A byte-level BPE with the Qwen2 pre-tokenizer regex and NFC normaliser, trained on the small
English/Chinese sample text below (256 byte symbols + merges, ``BASE_BPE_SIZE`` in all), followed by
Qwen2's three added tokens ``<|endoftext|> <|im_start|> <|im_end|>`` exactly as in the real vocabulary
(so ``<|endofprompt|>`` is base + 3, as 151646 = 151643 + 3 in the real one). Saved with transformers'
``Qwen2TokenizerFast.save_pretrained`` (tokenizer.json, tokenizer_config.json, vocab.json, merges.txt,
special_tokens_map.json). CosyVoice3 then adds 278 more special tokens at load time (280 listed, two of
which Qwen already has), so the loaded tokenizer has ``BASE_BPE_SIZE + 3 + 278`` ids. A byte-level
vocabulary alone is 256 ids, so this can never fit a 512-row text embedding; instead of dropping
special tokens (upstream adds them all) the text vocabulary is grown:

* ``config.json`` ``vocab_size`` becomes the loaded tokenizer size rounded up to a multiple of 64 (as
  Qwen pads 151646+ ids to 151936), and its ``bos/eos_token_id`` become the ``<|endoftext|>`` id (the
  source's were its last row; CosyVoice never reads them);
* in ``llm.pt`` the rows of ``llm.model.model.embed_tokens.weight`` and ``llm.model.lm_head.weight``
  (tied: one tensor) are the source rows followed by seeded N(0, initializer_range) rows; every other
  tensor is the source's; ``model.safetensors`` gets the same embedding. With the source's 512 rows and
  its tokenizer of 601 ids, the text vocabulary becomes 640;
* ``llm_decoder.weight``: speech rows x4, eos and unused-special rows zeroed (``speaking_decoder``), so
  the random LLM samples speech tokens instead of a stop id at the first step.

ONNX stand-ins (opset 17, IR 8, so onnxruntime >= 1.14 loads them). Names, shapes and dtypes follow
the way upstream's frontend feeds the real models (it reads the names from the session; the real names
are not visible in its source, these are our choice):

* ``speech_tokenizer_v3.onnx``: ``feats`` float32 [1, 128, T] and ``feats_length`` int32 [1] ->
  ``indices`` int32 [1, ceil(T/4)] (25 Hz tokens from 100 Hz frames). Frames at or past
  ``feats_length`` are ignored: the features minus their mean over the valid frames (per mel bin),
  invalid frames zeroed, 4-frame average pooling (ceil mode), then argmax of a fixed seeded projection
  (zero-mean, unit-norm columns) into the speech vocabulary (``FlowConfig.vocab_size`` codes).
* ``campplus.onnx``: ``feats`` float32 [1, T, 80] -> ``embs`` float32 [1, spk_embed_dim]:
  mean over time of tanh(x W + b) with fixed seeded W, b.

Everything is seeded, and rerunning the script reproduces the committed files byte for byte
(``tests/test_frontend_prompt.py`` checks it). Needs: numpy, tokenizers, transformers, safetensors,
onnx, and torch (only to rewrite ``llm.pt``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SOURCE = os.path.join(REPO, "tests", "data", "tiny-a", "model")
DEFAULT_OUT = os.path.join(REPO, "tests", "data", "tiny-release")
MARKER = "TINY_RELEASE.md"

BASE_BPE_SIZE = 320  # 256 byte symbols + 64 merges
QWEN_ADDED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2 release).
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
VOCAB_MULTIPLE = 64
SPEECH_ROW_GAIN = 4.0  # llm_decoder speech rows (see speaking_decoder)
WHISPER_MELS = 128
TOKEN_HOP_FRAMES = 4  # 100 Hz whisper frames -> 25 Hz tokens
FBANK_BINS = 80
OPSET = 17
IR_VERSION = 8
ONNX_PRODUCER = "cosyjax tools/make_tiny_release.py"

# Written for this script; only used to learn a few dozen BPE merges.
SAMPLE_TEXT = """\
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
Hello, world! How are you today? I am fine, thank you. We will meet at 10:30 on March 5, 2024.
This is a tiny tokenizer for tests of the text frontend; it is not a real language model vocabulary.
Numbers like 1, 22, 333 and 4.5 appear in text, and so do names such as Alice, Bob and Carol.
The weather is nice, so let us take a walk in the park and listen to the birds singing in the trees.
今天天气很好，我们一起去公园散步吧。你好，世界！这是一个用于测试的小型分词器。
我们在二零二四年三月五日见面。他说：“明天见。”北京是中国的首都，上海是一个大城市。
希望你以后能够做得比我还好哟。收到好友从远方寄来的生日礼物，那份意外的惊喜让我心中充满了甜蜜的快乐。
"""


def _tokenizer_object(corpus: str, base_size: int):
    """Train the byte-level BPE (``tokenizers``), then add Qwen2's three added tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=base_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    if tok.get_vocab_size() != base_size:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, wanted {base_size}; "
                           "the sample text is too small for that many merges")
    tok.add_special_tokens(list(QWEN_ADDED_TOKENS))
    return tok


def write_tokenizer(tokenizer_dir: str, corpus: str = SAMPLE_TEXT, base_size: int = BASE_BPE_SIZE) -> None:
    """Write a Qwen2-style HF tokenizer (tokenizer.json, tokenizer_config.json, vocab.json, merges.txt)."""
    from transformers import Qwen2TokenizerFast

    fast = Qwen2TokenizerFast(tokenizer_object=_tokenizer_object(corpus, base_size),
                              unk_token=None, bos_token=None, eos_token="<|endoftext|>",
                              pad_token="<|endoftext|>", model_max_length=131072,
                              clean_up_tokenization_spaces=False, errors="replace")
    fast.save_pretrained(tokenizer_dir)


def _onnx_model(nodes, inputs, outputs, initializers, name: str):
    import onnx

    graph = onnx.helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = onnx.helper.make_model(graph, producer_name=ONNX_PRODUCER,
                                   opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def build_speech_tokenizer(vocab_size: int, seed: int, num_mels: int = WHISPER_MELS,
                           index_dtype: str = "int32"):
    """Tiny ``speech_tokenizer_v3`` stand-in: feats [1, M, T], feats_length [1] -> indices [1, ceil(T/4)].

    Args:
      vocab_size: number of speech codes.
      seed: numpy seed of the projection.
      num_mels: M.
      index_dtype: "int32" or "int64", the output dtype.
    Returns:
      onnx.ModelProto.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((num_mels, vocab_size))
    proj = proj - proj.mean(axis=0, keepdims=True)  # blind to a frame's overall level
    proj = (proj / np.linalg.norm(proj, axis=0, keepdims=True)).astype(np.float32)  # no favoured code
    out_type = {"int32": TensorProto.INT32, "int64": TensorProto.INT64}[index_dtype]
    nodes = [
        helper.make_node("Shape", ["feats"], ["num_frames_1d"], start=2, end=3),
        helper.make_node("Squeeze", ["num_frames_1d"], ["num_frames"]),
        helper.make_node("Range", ["zero", "num_frames", "one"], ["frame_index"]),  # [T]
        helper.make_node("Cast", ["feats_length"], ["length64"], to=TensorProto.INT64),
        helper.make_node("Less", ["frame_index", "length64"], ["valid"]),
        helper.make_node("Cast", ["valid"], ["valid_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["feats", "valid_f"], ["masked"]),  # [1, M, T]
        helper.make_node("ReduceSum", ["masked", "time_axis"], ["total"], keepdims=1),  # [1, M, 1]
        helper.make_node("Cast", ["feats_length"], ["length_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["total", "length_f"], ["mean"]),
        helper.make_node("Sub", ["feats", "mean"], ["centered"]),
        helper.make_node("Mul", ["centered", "valid_f"], ["centered_masked"]),
        helper.make_node("AveragePool", ["centered_masked"], ["pooled"], kernel_shape=[TOKEN_HOP_FRAMES],
                         strides=[TOKEN_HOP_FRAMES], ceil_mode=1),  # [1, M, ceil(T/4)]
        helper.make_node("Transpose", ["pooled"], ["pooled_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["pooled_t", "proj"], ["logits"]),  # [1, T4, V]
        helper.make_node("ArgMax", ["logits"], ["argmax"], axis=2, keepdims=0),
        helper.make_node("Cast", ["argmax"], ["indices"], to=out_type),
    ]
    inits = [numpy_helper.from_array(proj, "proj"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([2], np.int64), "time_axis")]
    inputs = [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, num_mels, "T"]),
              helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1])]
    outputs = [helper.make_tensor_value_info("indices", out_type, [1, "T4"])]
    return _onnx_model(nodes, inputs, outputs, inits, "tiny_speech_tokenizer")


def build_campplus(embed_dim: int, seed: int, num_bins: int = FBANK_BINS):
    """Tiny ``campplus`` stand-in: feats [1, T, 80] -> embs [1, embed_dim] = mean_t tanh(x W + b).

    Args:
      embed_dim: speaker embedding size (``FlowConfig.spk_embed_dim``).
      seed: numpy seed of W, b.
      num_bins: fbank bins.
    Returns:
      onnx.ModelProto.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((num_bins, embed_dim)) / np.sqrt(num_bins)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(embed_dim)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["feats", "weight"], ["hidden"]),  # [1, T, D]
        helper.make_node("Add", ["hidden", "bias"], ["hidden_b"]),
        helper.make_node("Tanh", ["hidden_b"], ["act"]),
        helper.make_node("ReduceMean", ["act"], ["embs"], axes=[1], keepdims=0),  # [1, D]
    ]
    inits = [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")]
    inputs = [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, "T", num_bins])]
    outputs = [helper.make_tensor_value_info("embs", TensorProto.FLOAT, [1, embed_dim])]
    return _onnx_model(nodes, inputs, outputs, inits, "tiny_campplus")


def _grow_rows(table: np.ndarray, rows: int, std: float, rng: np.random.Generator) -> np.ndarray:
    extra = rng.normal(0.0, std, (rows - table.shape[0], table.shape[1])).astype(table.dtype)
    return np.concatenate([table, extra], axis=0)


def speaking_decoder(weight: np.ndarray, speech_token_size: int) -> np.ndarray:
    """``llm_decoder.weight`` rescaled so the random tiny LLM speaks instead of stopping at once.

    With random rows, 199 of the ``speech_token_size + 200`` outputs are stop ids (eos and the unused
    specials, all >= speech_token_size + 1), so a sampled decode ends within a step or two and the tiny
    release would produce no audio. Their rows are zeroed (logit 0) and the speech rows scaled by
    ``SPEECH_ROW_GAIN``; the sos row (speech_token_size), masked for min_len steps by upstream's quirk,
    is kept, so decoding can still end by a token before max_len.
    """
    out = weight.copy()
    out[:speech_token_size] *= SPEECH_ROW_GAIN
    out[speech_token_size + 1:] = 0.0
    return out


def write_llm(source: str, dest: str, vocab_size: int, std: float, seed: int, speech_token_size: int) -> None:
    """Copy llm.pt, growing the (tied) Qwen text embedding / lm_head to ``vocab_size`` rows and
    rescaling ``llm_decoder.weight`` with ``speaking_decoder``."""
    import torch

    state = torch.load(source, map_location="cpu", weights_only=True)
    state["llm_decoder.weight"] = torch.from_numpy(speaking_decoder(state["llm_decoder.weight"].numpy(),
                                                                    speech_token_size))
    embed_key, head_key = "llm.model.model.embed_tokens.weight", "llm.model.lm_head.weight"
    embed = state[embed_key]
    if embed.shape[0] < vocab_size:
        grown = torch.from_numpy(_grow_rows(embed.numpy(), vocab_size, std, np.random.default_rng(seed)))
        tied = head_key in state and state[head_key].data_ptr() == embed.data_ptr()
        state[embed_key] = grown
        if tied:
            state[head_key] = grown  # one shared tensor, as torch saves a tied state_dict
        elif head_key in state:
            state[head_key] = torch.from_numpy(
                _grow_rows(state[head_key].numpy(), vocab_size, std, np.random.default_rng(seed + 1)))
    torch.save(state, dest)


def write_safetensors(source: str, dest: str, vocab_size: int, std: float, seed: int) -> None:
    """model.safetensors of CosyVoice-BlankEN with the same grown embedding as llm.pt."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(source, framework="np") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = "model.embed_tokens.weight"
    if tensors[key].shape[0] < vocab_size:
        tensors[key] = _grow_rows(tensors[key], vocab_size, std, np.random.default_rng(seed))
    save_file(tensors, dest, metadata=metadata)


def build(source: str, out_dir: str, seed: int = 0) -> dict:
    """Write the tiny release into ``out_dir`` (which must not exist). Returns a summary dict."""
    import onnx

    sys.path.insert(0, REPO)
    from cosyjax.config import QWEN_DIR, YAML_NAME, load_model_config
    from cosyjax.frontend.tokenizer import CosyVoice3Tokenizer

    cfg = load_model_config(source)
    os.makedirs(os.path.join(out_dir, QWEN_DIR))
    for name in (YAML_NAME, "flow.pt", "hift.pt"):
        shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))

    qwen_dir = os.path.join(out_dir, QWEN_DIR)
    write_tokenizer(qwen_dir)
    tokenizer = CosyVoice3Tokenizer(qwen_dir)
    endoftext = tokenizer.token_id("<|endoftext|>")
    vocab_size = max(cfg.llm.vocab_size, -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)

    with open(os.path.join(source, QWEN_DIR, "config.json"), encoding="utf-8") as f:
        qwen = json.load(f)
    std = float(qwen.get("initializer_range", 0.02))
    qwen.update(vocab_size=vocab_size, bos_token_id=endoftext, eos_token_id=endoftext)
    with open(os.path.join(qwen_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(qwen, f, indent=2, sort_keys=True)
        f.write("\n")
    gen_path = os.path.join(source, QWEN_DIR, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            gen = json.load(f)
        gen.update(bos_token_id=endoftext, eos_token_id=endoftext)
        with open(os.path.join(qwen_dir, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(gen, f, indent=2, sort_keys=True)
            f.write("\n")
    write_llm(os.path.join(source, "llm.pt"), os.path.join(out_dir, "llm.pt"), vocab_size, std, seed,
              cfg.llm.speech_token_size)
    safetensors_path = os.path.join(source, QWEN_DIR, "model.safetensors")
    if os.path.isfile(safetensors_path):
        write_safetensors(safetensors_path, os.path.join(qwen_dir, "model.safetensors"), vocab_size, std, seed)

    onnx.save(build_speech_tokenizer(cfg.flow.vocab_size, seed + 10),
              os.path.join(out_dir, "speech_tokenizer_v3.onnx"))
    onnx.save(build_campplus(cfg.flow.spk_embed_dim, seed + 11), os.path.join(out_dir, "campplus.onnx"))

    # Reload the way a user would: the release must be self-consistent.
    out_cfg = load_model_config(out_dir)
    tokenizer = CosyVoice3Tokenizer(qwen_dir)
    tokenizer.check_release(out_cfg.llm.vocab_size)
    summary = {
        "source": os.path.relpath(source, REPO) if source.startswith(REPO) else source,
        "seed": seed,
        "base_bpe_size": BASE_BPE_SIZE,
        "tokenizer_size": len(tokenizer),
        "endofprompt_id": tokenizer.endofprompt_id,
        "endoftext_id": endoftext,
        "text_vocab_size": {"source": cfg.llm.vocab_size, "release": out_cfg.llm.vocab_size},
        "speech_vocab_size": cfg.flow.vocab_size,
        "spk_embed_dim": cfg.flow.spk_embed_dim,
    }
    _write_marker(out_dir, summary)
    for directory, _, names in os.walk(out_dir):  # safetensors writes 0600; make the files plain 0644
        for name in names:
            os.chmod(os.path.join(directory, name), 0o644)
    return summary


def _write_marker(out_dir: str, summary: dict) -> None:
    files = []
    for root, _, names in os.walk(out_dir):
        for name in sorted(names):
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()[:16]
            files.append(f"| `{os.path.relpath(path, out_dir)}` | {os.path.getsize(path)} | `{digest}` |")
    text = (
        "# Tiny CosyVoice3 release (random weights, for tests only)\n\n"
        "Generated by `tools/make_tiny_release.py`; do not edit by hand, rerun the script.\n"
        "See the script's docstring for how each file is built.\n\n"
        "```json\n" + json.dumps(summary, indent=2, sort_keys=True) + "\n```\n\n"
        "| file | bytes | sha256[:16] |\n|---|---|---|\n" + "\n".join(sorted(files)) + "\n"
    )
    with open(os.path.join(out_dir, MARKER), "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="release-layout dir with the tiny llm/flow/hift")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (replaced if it is a tiny release)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, MARKER)):
        parser.error(f"{out} exists and is not a tiny release (no {MARKER}); refusing to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        staging = os.path.join(tmp, "release")
        summary = build(os.path.abspath(args.source), staging, args.seed)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    total = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(out) for n in ns)
    print(json.dumps(summary, indent=2, sort_keys=True))
    print(f"wrote {out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
