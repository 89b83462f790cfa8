"""The Flax speech tokenizer v3 and CAM++: parity against onnxruntime on the committed release-structure
ONNX cases (tests/data/frontend-models), converter strictness, the pipeline's ``frontend="jax"``
option, and no onnxruntime in a ``frontend="jax"`` process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cosyjax.convert.common import ConversionError
from cosyjax.convert.frontend import (
    SPEAKER_ENCODER, SPEECH_TOKENIZER, convert_campplus, convert_frontend_to_dir, convert_speech_tokenizer,
)
from cosyjax.frontend.campplus import CAMPPlusConfig
from cosyjax.frontend.campplus import init_shapes as campplus_shapes
from cosyjax.frontend.s3tokenizer import S3TokenizerConfig
from cosyjax.frontend.s3tokenizer import init_shapes as tokenizer_shapes
from cosyjax.parity.stages.frontend import FSQ_BOUNDARY, compare_tokens

from conftest import DATA, TINY_PROMPT_TEXT, TINY_RELEASE, voice_wav_bytes

onnx = pytest.importorskip("onnx")
CASE = os.path.join(DATA, "frontend-models")
CASE_MODEL = os.path.join(CASE, "model")
with open(os.path.join(CASE, "meta.json"), encoding="utf-8") as _f:
    N_HEAD = json.load(_f)["speech_tokenizer"]["n_head"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """``cosyjax parity check`` on the case: both frontend groups, against onnxruntime."""
    pytest.importorskip("onnxruntime")
    from cosyjax.parity.check import run_check

    return run_check(CASE, str(tmp_path_factory.mktemp("frontend") / "report"), progress=False)


def _comparison(report, key):
    return next(c for g in report["groups"] for c in g["comparisons"] if c["key"] == key)


def test_parity_check_passes_both_groups(report):
    assert report["passed"], json.dumps(report["groups"], indent=1, default=str)
    assert {g["group"] for g in report["groups"]} == {"frontend_tokenizer", "frontend_campplus"}


@pytest.mark.parametrize("key", ["frontend_tokenizer/tokens", "frontend_tokenizer/tokens_onnxruntime_now"])
def test_tokenizer_agreement_and_ties(report, key):
    c = _comparison(report, key)
    assert c["passed"] and c["shape"][0] > 3000, c  # enough tokens to resolve 99.9 %
    assert c["max_abs"] <= 1e-3 and "0 not at an FSQ tie" in c["message"], c


@pytest.mark.parametrize("key", ["frontend_campplus/embedding", "frontend_campplus/embedding_onnxruntime_now"])
def test_campplus_embedding_and_cosine(report, key):
    emb = _comparison(report, key)
    cos = _comparison(report, f"{key}_cosine")
    assert emb["passed"] and emb["max_abs"] <= emb["atol"], emb
    assert cos["passed"] and cos["ours_at"] >= 0.9999, cos


def test_compare_tokens_accepts_only_tie_mismatches():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 3 ** 8, size=4000)
    z = np.full((4000, 8), 2.0, np.float32)  # far from the boundary: no digit can flip
    z_scale = np.ones((4000, 8), np.float32)
    rel = 1e-5
    ours = ref.copy()
    digits = (ref[0] // 3 ** np.arange(8)) % 3
    ours[0] = ref[0] + (1 if digits[0] < 2 else -1)  # digit 0 moved by one level
    c = compare_tokens("t", [ours], [ref], [z], [z_scale], rel, levels=3, dim=8)
    assert not c.passed and "1 not at an FSQ tie" in c.message
    z[0, 0] = FSQ_BOUNDARY  # now digit 0 of token 0 is a tie
    c = compare_tokens("t", [ours], [ref], [z], [z_scale], rel, levels=3, dim=8)
    assert c.passed and "0 not at an FSQ tie" in c.message
    many = ref.copy()
    many[:10] = (ref[:10] + 1) % 3 ** 8
    z[:10] = FSQ_BOUNDARY
    c = compare_tokens("t", [many], [ref], [z], [z_scale], rel, levels=3, dim=8)
    assert not c.passed and c.max_abs == pytest.approx(10 / 4000)  # ties, but agreement 99.75 % < 99.9 %


def _edited(src: str, dst, edit) -> str:
    model = onnx.load(src)
    edit(model)
    onnx.save(model, str(dst))
    return str(dst)


def _rename_node(model, old: str, new: str) -> None:
    next(n for n in model.graph.node if n.name == old).name = new


def _reshape_initializer_of(model, node_name: str, slot: int) -> None:
    from onnx import numpy_helper

    name = next(n for n in model.graph.node if n.name == node_name).input[slot]
    init = next(i for i in model.graph.initializer if i.name == name)
    arr = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(np.zeros((arr.shape[0] + 1,) + arr.shape[1:], arr.dtype), name))


def test_tokenizer_converter_strict_one_error(tmp_path):
    def edit(model):
        _rename_node(model, "/blocks.1/attn/key/MatMul", "/blocks.1/attn/keys/MatMul")
        _reshape_initializer_of(model, "/conv2/Conv", 2)

    path = _edited(os.path.join(CASE_MODEL, SPEECH_TOKENIZER), tmp_path / SPEECH_TOKENIZER, edit)
    with pytest.raises(ConversionError) as e:
        convert_speech_tokenizer(path, n_head=N_HEAD)
    msg = str(e.value)
    assert msg.startswith(path)
    assert "missing keys: blocks.1.attn.key.weight" in msg
    assert "unexpected keys: blocks.1.attn.keys.weight" in msg
    assert "shape mismatches: conv2.bias (33,)" in msg


def test_campplus_converter_strict_one_error(tmp_path):
    def edit(model):
        _rename_node(model, "/xvector/transit2/nonlinear/batchnorm/BatchNormalization",
                     "/xvector/transit2/nonlinear/bn/BatchNormalization")
        _reshape_initializer_of(model, "/xvector/block2/tdnnd3/cam_layer/linear2/Conv", 1)

    path = _edited(os.path.join(CASE_MODEL, SPEAKER_ENCODER), tmp_path / SPEAKER_ENCODER, edit)
    with pytest.raises(ConversionError) as e:
        convert_campplus(path)
    msg = str(e.value)
    assert msg.startswith(path)
    assert "missing keys: " in msg and "xvector.transit2.nonlinear.batchnorm.running_var" in msg
    assert "unexpected keys: " in msg and "xvector.transit2.nonlinear.bn.weight" in msg
    assert "shape mismatches: xvector.block2.tdnnd3.cam_layer.linear2.weight (5, 2, 1)" in msg


@pytest.mark.parametrize("name,convert,what", [
    (SPEECH_TOKENIZER, lambda p: convert_speech_tokenizer(p), "speech tokenizer v3"),
    (SPEAKER_ENCODER, convert_campplus, "CAM++"),
])
def test_tiny_release_stand_ins_are_refused(name, convert, what):
    path = os.path.join(TINY_RELEASE, name)
    with pytest.raises(ConversionError, match=re.escape(f"{path}: not the released {what} architecture")):
        convert(path)


def test_unreadable_onnx_named(tmp_path):
    bad = tmp_path / SPEECH_TOKENIZER
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ConversionError, match=re.escape(f"{bad}: not a readable ONNX model")):
        convert_speech_tokenizer(str(bad))


def test_release_sizes_build_under_eval_shape():
    """The released dimensions (no weights): 12 blocks of 1280 with 20 heads; CAM++ 80 -> 192."""
    tok = tokenizer_shapes(S3TokenizerConfig())
    assert sorted(k for k in tok if k.startswith("blocks_")) == sorted(f"blocks_{i}" for i in range(12))
    assert tok["blocks_0"]["attn"]["fsmn_block"]["kernel"].shape == (31, 1, 1280)
    assert tok["project_in"]["kernel"].shape == (1280, 8)
    assert S3TokenizerConfig().codebook_size == 6561 and S3TokenizerConfig().head_dim == 64
    cam = campplus_shapes(CAMPPlusConfig())
    assert cam["xvector_dense_linear"]["kernel"].shape == (1, 2 * 512, 192)  # stats of 512 channels
    assert cam["xvector_tdnn_linear"]["kernel"].shape == (5, 320, 128)


@pytest.fixture(scope="module")
def frontend_dir(tmp_path_factory):
    return convert_frontend_to_dir(CASE_MODEL, str(tmp_path_factory.mktemp("fe") / "frontend"), n_head=N_HEAD)


def test_extract_prompt_same_with_jax_or_onnx(frontend_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from cosyjax.config import load_model_config
    from cosyjax.frontend import SpeakerEncoderONNX, SpeechTokenizerONNX, extract_prompt
    from cosyjax.frontend.jax_models import load_frontend

    cfg = load_model_config(TINY_RELEASE)
    wav = tmp_path / "p.wav"
    wav.write_bytes(voice_wav_bytes())
    jax_tok, jax_spk = load_frontend(frontend_dir)
    kwargs = {"mel_cfg": cfg.mel, "token_mel_ratio": cfg.flow.token_mel_ratio}
    ours = extract_prompt(str(wav), speech_tokenizer=jax_tok, speaker_encoder=jax_spk, **kwargs)
    ref = extract_prompt(str(wav), speech_tokenizer=SpeechTokenizerONNX(os.path.join(CASE_MODEL, SPEECH_TOKENIZER)),
                         speaker_encoder=SpeakerEncoderONNX(os.path.join(CASE_MODEL, SPEAKER_ENCODER)), **kwargs)
    assert ours.speech_tokens.shape == ref.speech_tokens.shape
    assert np.mean(ours.speech_tokens == ref.speech_tokens) >= 0.999
    np.testing.assert_array_equal(ours.prompt_mel, ref.prompt_mel)
    cos = ours.embedding @ ref.embedding / np.linalg.norm(ours.embedding) / np.linalg.norm(ref.embedding)
    assert cos >= 0.9999


def test_pipeline_frontend_option_errors(tmp_path, tiny_converted):
    from cosyjax.pipeline import CosyVoice3

    with pytest.raises(ValueError, match="frontend='tflite'"):
        CosyVoice3(TINY_RELEASE, converted_dir=tiny_converted, frontend="tflite", progress=False)
    release = shutil.copytree(TINY_RELEASE, tmp_path / "release")  # conversion would cache inside it
    with pytest.raises(ConversionError, match=re.escape(f"{release / SPEECH_TOKENIZER}: not the released speech")):
        CosyVoice3(str(release), converted_dir=tiny_converted, frontend="jax", progress=False)
    assert not (release / ".cosyjax" / "frontend").exists()


def test_frontend_jax_runtime_imports_no_onnxruntime(frontend_dir, tiny_converted, tmp_path):
    wav = tmp_path / "p.wav"
    wav.write_bytes(voice_wav_bytes())
    code = (
        "import sys\n"
        "from cosyjax.pipeline import CosyVoice3\n"
        f"tts = CosyVoice3({TINY_RELEASE!r}, converted_dir={tiny_converted!r}, frontend='jax', "
        f"frontend_dir={frontend_dir!r}, progress=False)\n"
        f"prompt = tts._prompt({str(wav)!r})\n"
        f"tts.add_zero_shot_spk({TINY_PROMPT_TEXT!r}, {str(wav)!r}, 'v')\n"
        "assert prompt.speech_tokens.size > 0 and prompt.embedding.shape == (16,)\n"
        "bad = [k for k in sys.modules if k == 'onnxruntime' or k.startswith('onnxruntime.') or k == 'torch']\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
