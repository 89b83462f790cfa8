"""Documented errors that no other test triggered: each is raised here and its message checked for
the field, file or numbers it names.  Grouped by concern; everything fails before device work, so
the file runs in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import types

import numpy as np
import pytest

from cosyjax.config import ConfigError, load_model_config, read_qwen_config, read_yaml

from conftest import DATA, TINY_RELEASE

TINY_A = os.path.join(DATA, "tiny-a", "model")


# ---------------------------------------------------------------------------------------- cli tts
@pytest.fixture()
def prompt_wav(tmp_path):
    import soundfile

    t = np.arange(16000 * 2) / 16000
    path = tmp_path / "prompt.wav"
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 16000)
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["--text", "Hello."], "--prompt-wav is required"),
    (["--mode", "vc", "--prompt-wav", "{wav}"], "vc mode needs --source-wav"),
    (["--mode", "instruct2", "--text", "Hello.", "--prompt-wav", "{wav}"], "instruct2 mode needs --instruct-text"),
    (["--text", "Hello.", "--prompt-wav", "{wav}", "-o", "{tmp}/no/such/dir/out.wav"],
     "{tmp}/no/such/dir: output directory does not exist"),
])
def test_cli_tts_argument_errors(args, message, prompt_wav, tmp_path, capsys):
    from cosyjax.cli import main

    fill = {"wav": prompt_wav, "tmp": str(tmp_path)}
    argv = ["tts", "--model-dir", TINY_RELEASE, *(a.format(**fill) for a in args)]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "out.wav")]
    assert main(argv) == 2
    assert message.format(**fill) in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["prompt.wav"]  # nothing written


def test_cli_tts_no_audio_writes_nothing(prompt_wav, tmp_path, capsys, monkeypatch):
    """A model that yields no samples (the LLM stopped at once): an error, and no empty wav."""
    from cosyjax import pipeline
    from cosyjax.cli import main

    class Silent:
        sample_rate = 24000

        def inference_zero_shot(self, *args, **kwargs):
            yield {"tts_speech": np.zeros((1, 0), np.float32)}

    monkeypatch.setattr(pipeline.CosyVoice3, "from_pretrained", classmethod(lambda cls, *a, **k: Silent()))
    out = tmp_path / "out.wav"
    assert main(["tts", "--model-dir", TINY_RELEASE, "--text", "Hello.", "--prompt-wav", prompt_wav,
                 "--prompt-text", "A prompt.", "-o", str(out)]) == 2
    assert "the model produced no audio for this input; nothing was written" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["prompt.wav"]  # no out.wav, no temp file


# ---------------------------------------------------------------------------------------- converter
def test_empty_pt_is_named(tmp_path):
    from cosyjax.convert.common import ConversionError, load_state_dict

    path = tmp_path / "flow.pt"
    path.write_bytes(b"")
    with pytest.raises(ConversionError, match=f"{path}: checkpoint file is empty"):
        load_state_dict(str(path))


def test_pt_value_that_is_not_a_tensor_is_named(tmp_path):
    torch = pytest.importorskip("torch")
    from cosyjax.convert.common import ConversionError, load_state_dict

    path = tmp_path / "hift.pt"
    torch.save({"conv_pre.bias": torch.zeros(2), "step": 7}, str(path))
    with pytest.raises(ConversionError, match=f"{path}: key 'step' holds int, not a tensor"):
        load_state_dict(str(path))


def test_generator_prefix_collision_is_named():
    from cosyjax.convert.common import ConversionError, strip_prefix

    sd = {"conv_pre.bias": np.zeros(2), "generator.conv_pre.bias": np.ones(2)}
    with pytest.raises(ConversionError, match="'generator.conv_pre.bias' collides with another key"):
        strip_prefix(sd, "generator.")


def test_export_of_a_missing_stage_is_named():
    from cosyjax.convert.common import ConversionError
    from cosyjax.convert.export import export_state_dicts

    cfg = load_model_config(TINY_A)
    with pytest.raises(ConversionError, match=r"params have no hift stage \(found \['flow', 'llm'\]\)"):
        export_state_dicts({"llm": {}, "flow": {}}, config=cfg, stages=("hift",))


def test_save_converted_refuses_an_unknown_dtype(tmp_path):
    from cosyjax.checkpoint import DTYPES, CheckpointError, ConvertedModel, save_converted

    model = ConvertedModel(config=load_model_config(TINY_A), params={}, buffers={}, dtype="float16")
    with pytest.raises(CheckpointError, match=re.escape(f"dtype 'float16' not in {DTYPES}")):
        save_converted(str(tmp_path / "out"), model)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("text, message", [
    ("a: [1, 2\n", "not valid yaml"),
    ("- 1\n- 2\n", "top level is not a mapping"),
    ("a: 1\nb: !ref a\n", r"x.yaml:b: !ref without <name>: 'a'"),
    ("a: 1\nb: !ref <a> + len('x')\n", r"x.yaml:b: unsupported expression in !ref: \"1 \+ len\('x'\)\""),
    ("a: 1\nb: !ref <a> +* 2\n", r"x.yaml:b: cannot parse !ref expression '1 \+\* 2'"),
    ("a: !ref <b>\nb: !ref <a>\n", "!ref chain too deep"),
])
def test_yaml_errors_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        read_yaml(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content, update, message", [
    ("{not json", None, "not valid JSON"),
    ("[1, 2]", None, "top level is not an object"),
    (None, {"hidden_act": "gelu"}, "hidden_act='gelu'; only 'silu' is supported"),
    (None, {"rope_scaling": {"type": "linear", "factor": 2.0}},
     r"rope_scaling=\{'type': 'linear', 'factor': 2\.0\} is not supported"),
    (None, {"model_type": "llama"}, "model_type='llama', expected 'qwen2'"),
])
def test_qwen_config_errors_name_the_file(tmp_path, content, update, message):
    path = tmp_path / "config.json"
    if content is None:
        with open(os.path.join(TINY_RELEASE, "CosyVoice-BlankEN", "config.json")) as f:
            content = json.dumps({**json.load(f), **update})
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        read_qwen_config(str(path))
    assert str(path) in str(info.value)


def test_stage_arguments_that_are_not_a_mapping(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(TINY_A, d)
    path = d / "cosyvoice3.yaml"
    lines = path.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("hift:"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" "))
    path.write_text("\n".join(lines[:start] + [lines[start].split(":", 1)[0] + ": " + lines[start].split(": ", 1)[1]
                                               + " [1, 2]"] + lines[end:]))
    with pytest.raises(ConfigError, match=r"cosyvoice3.yaml:hift: CausalHiFTGenerator arguments must be a mapping, "
                                          r"found list"):
        load_model_config(str(d))


# ---------------------------------------------------------------------------------------- llm
def test_lm_request_ids_must_be_1d_integers():
    from cosyjax.llm import lm

    with pytest.raises(ValueError, match=r"token ids must be 1-D \(or \(1, L\)\), got shape \(2, 3\)"):
        lm.LMRequest.cross_lingual(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="token ids must be integers, got dtype float32"):
        lm.LMRequest.cross_lingual(np.ones(3, np.float32))


def test_lm_prepare_without_requests():
    from cosyjax.config import LLMConfig
    from cosyjax.llm import lm

    with pytest.raises(ValueError, match="no requests"):
        lm.prepare(LLMConfig.tiny(), [], None)


def test_kv_cache_full_is_reported_with_its_size():
    """The decode loop's guard: a state whose cache is full while a row is still decoding."""
    from cosyjax.config import LLMConfig
    from cosyjax.llm import lm

    state = types.SimpleNamespace(done=np.array([True, False]), end_index=np.array([40, 96]), valid=np.zeros((2, 96), bool))
    with pytest.raises(ValueError, match=r"KV cache full \(96 slots\) before every row finished"):
        next(lm.stream(None, LLMConfig.tiny(), state, None))


# ---------------------------------------------------------------------------------------- flow
@pytest.fixture(scope="module")
def flow_cfg():
    return load_model_config(TINY_A).flow


def test_flow_inference_batch_mismatch_and_empty_batch(flow_cfg):
    from cosyjax.flow.flow import flow_inference

    c = flow_cfg.output_size
    good = dict(prompt_feat=np.zeros((1, 0, c), np.float32), embedding=np.zeros((1, flow_cfg.spk_embed_dim),
                                                                                  np.float32),
                noise=np.zeros((1, c, 100), np.float32), streaming=False, finalize=True)
    with pytest.raises(ValueError, match=r"prompt_token: batch 2 != token batch 1"):
        flow_inference({}, np.zeros((1, 4), np.int64), np.zeros((2, 0), np.int64), cfg=flow_cfg, **good)
    with pytest.raises(ValueError, match="token: empty batch"):
        flow_inference({}, np.zeros((0, 4), np.int64), np.zeros((0, 0), np.int64), cfg=flow_cfg, **good)


def test_flow_stream_init_errors(flow_cfg):
    from cosyjax.flow.stream import flow_stream_init

    c, e = flow_cfg.output_size, flow_cfg.spk_embed_dim
    with pytest.raises(ValueError, match="prompt_token: empty batch"):
        flow_stream_init(flow_cfg, np.zeros((0, 2), np.int64), np.zeros((0, 4, c)), np.zeros((0, e)))
    with pytest.raises(ValueError, match=rf"prompt_token: ids must lie in \[0, {flow_cfg.vocab_size}\)"):
        flow_stream_init(flow_cfg, np.full((1, 2), flow_cfg.vocab_size), np.zeros((1, 4, c)), np.zeros((1, e)))


def test_flow_stream_push_errors_before_device_work(flow_cfg, monkeypatch):
    from cosyjax.flow import stream

    monkeypatch.setattr(stream, "_push_core", None, raising=False)  # any device call would fail loudly
    c, e, ratio = flow_cfg.output_size, flow_cfg.spk_embed_dim, flow_cfg.token_mel_ratio
    state = stream.flow_stream_init(flow_cfg, np.zeros((1, 2), np.int64), np.zeros((1, 2 * ratio, c)),
                                    np.zeros((1, e)))
    tokens = np.zeros((1, 10), np.int64)
    with pytest.raises(ValueError, match=rf"{ratio * 12} mel frames exceed the 20-frame noise buffer"):
        stream.flow_stream_push({}, state, tokens, cfg=flow_cfg, noise=np.zeros((1, c, 20), np.float32),
                                finalize=True)
    with pytest.raises(ValueError, match=rf"2 tokens give {2 * ratio} mel frames, not more than the {2 * ratio} "
                                         "prompt frames"):
        stream.flow_stream_push({}, state, tokens[:, :0], cfg=flow_cfg, noise=np.zeros((1, c, 99), np.float32),
                                finalize=True)
    shorter = dataclasses.replace(state, mel=np.zeros((1, ratio * 12, c), np.float32))
    with pytest.raises(ValueError, match=rf"token: 4 tokens give fewer frames \({ratio * 6}\) than already computed "
                                         rf"\({ratio * 12}\); pushes must extend the stream"):
        stream.flow_stream_push({}, shorter, tokens[:, :4], cfg=flow_cfg, noise=np.zeros((1, c, 99), np.float32),
                                finalize=True)


# ---------------------------------------------------------------------------------------- hift, nn
def test_hift_empty_batch():
    from cosyjax.hift.generator import hift_inference

    cfg = load_model_config(TINY_A).hift
    with pytest.raises(ValueError, match="mel: empty batch"):
        hift_inference({}, np.zeros((0, 10, cfg.in_channels), np.float32), cfg=cfg)


def test_conv1d_groups_must_divide_the_input_channels():
    import jax

    from cosyjax.nn.conv import Conv1d

    with pytest.raises(ValueError, match="Conv1d: 6 input channels not divisible by groups=4"):
        Conv1d(8, 3, groups=4).init(jax.random.PRNGKey(0), np.zeros((1, 5, 6), np.float32))


# ---------------------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def tiny_model():
    from cosyjax.convert import convert_model
    from cosyjax.model import CosyVoice3Model

    return CosyVoice3Model(convert_model(TINY_A, progress=False))


@pytest.mark.parametrize("requests, keys, message", [
    ([], None, "tts_batch: no requests"),
    ([{}, {}], [0], "tts_batch: 1 keys for 2 requests"),
    ([{}, {"stream": True}], None, "request 1: tts_batch is non-stream only"),
    ([{"sped": 1.0}], None, r"request 0: unknown argument\(s\) \['sped'\]"),
    ([{}, {"forced_tokens": []}], None, "request 1: forced_tokens is empty"),
])
def test_tts_batch_request_errors(tiny_model, requests, keys, message):
    base = {"forced_tokens": [1, 2], "embedding": np.zeros(tiny_model.config.flow.spk_embed_dim, np.float32)}
    with pytest.raises(ValueError, match=message):
        tiny_model.tts_batch([{**base, **r} for r in requests], keys)


# ---------------------------------------------------------------------------------------- frontend
def test_kaldi_mel_banks_band_edges():
    from cosyjax.frontend import kaldi_mel_banks

    with pytest.raises(ValueError, match=r"need 0 <= low_freq < high_freq <= nyquist, got 9000.0, 8000.0, 8000.0"):
        kaldi_mel_banks(80, 512, 16000.0, low_freq=9000.0)


def test_tokenizer_errors_name_the_file_and_token(tmp_path):
    from cosyjax.frontend.tokenizer import CosyVoice3Tokenizer, TokenizerError, _read_json

    path = tmp_path / "tokenizer_config.json"
    path.write_text("{ broken")
    with pytest.raises(TokenizerError, match=f"{path}: cannot read JSON \\(JSONDecodeError"):
        _read_json(str(path))
    tokenizer = CosyVoice3Tokenizer(os.path.join(TINY_RELEASE, "CosyVoice-BlankEN"))
    with pytest.raises(TokenizerError, match="token '<|no_such_token|>' is not in the vocabulary"):
        tokenizer.token_id("<|no_such_token|>")


# ---------------------------------------------------------------------------------------- server
def _server_app(model, **kwargs):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from cosyjax.server import create_app

    return create_app(model, **kwargs)


class _Chunks:
    """A model stand-in whose cross-lingual call yields one chunk, then fails."""

    sample_rate = 24000

    def __init__(self):
        self.spk2info = {"x": {}}
        self.closed = False

    def inference_cross_lingual(self, tts_text, prompt_wav=None, **kwargs):
        def gen():
            try:
                yield {"tts_speech": np.full((1, 4), 0.25, np.float32)}
                raise RuntimeError("device lost")
            finally:
                self.closed = True
        return gen()


def test_server_failure_mid_stream_aborts_the_response():
    """After the status line is sent the error cannot become a status code: the response is aborted
    with an error naming the job, the model's generator is closed and the queue is released."""
    from fastapi.testclient import TestClient

    model = _Chunks()
    with TestClient(_server_app(model)) as client:
        with pytest.raises(RuntimeError, match=r"synthesis failed mid-stream") as info:
            client.post("/inference_cross_lingual", data={"tts_text": "Hi.", "spk_id": "x"})
        assert "device lost" in repr(info.value.__cause__)
        assert model.closed and client.get("/health").json()["pending"] == 0


def test_server_upload_over_the_limit_is_413():
    from fastapi.testclient import TestClient

    with TestClient(_server_app(_Chunks(), max_upload_bytes=100)) as client:
        r = client.post("/inference_cross_lingual", data={"tts_text": "Hi."},
                        files={"prompt_wav": ("p.wav", b"x" * 101)})
        assert r.status_code == 413 and "prompt_wav" in r.json()["detail"] and "100" in r.json()["detail"]


@pytest.mark.parametrize("name", ["max_text_chars", "max_upload_bytes", "max_pending"])
def test_create_app_limits_must_be_positive(name):
    with pytest.raises(ValueError, match=f"{name}=0: expected a positive integer"):
        _server_app(_Chunks(), **{name: 0})


# ---------------------------------------------------------------------------------------- pipeline, train
def test_add_zero_shot_spk_needs_an_id():
    from cosyjax.pipeline import CosyVoice3

    with pytest.raises(ValueError, match="zero_shot_spk_id must be a non-empty string"):
        CosyVoice3.add_zero_shot_spk(None, "A prompt.", "prompt.wav", "")  # checked before any work


def test_train_checkpoint_errors(tmp_path):
    from cosyjax.train.checkpoint import (
        META_NAME, STATE_DIR, TrainCheckpointError, read_metadata, save_checkpoint, save_train_state)

    with pytest.raises(TrainCheckpointError, match="state has no array leaves"):
        save_train_state(str(tmp_path / "empty"), {})
    assert not (tmp_path / "empty").exists()
    with pytest.raises(ValueError, match=r"keep=0 must be >= 1 \(or None\)"):
        save_checkpoint(str(tmp_path / "run"), {"step": np.zeros((), np.int32)}, keep=0)
    bad = tmp_path / "bad"
    (bad / STATE_DIR).mkdir(parents=True)
    (bad / META_NAME).write_text("{ not json")
    with pytest.raises(TrainCheckpointError, match=f"{bad / META_NAME}: unreadable"):
        read_metadata(str(bad))


def test_optimizer_conf_with_an_unknown_key():
    from cosyjax.train.step import optimizer_from_train_conf

    with pytest.raises(ValueError, match=r"train_conf.optim_conf: unsupported keys \['amsgrad'\]"):
        optimizer_from_train_conf({"optim": "adam", "optim_conf": {"lr": 1e-3, "amsgrad": True}})


def test_make_mesh_without_devices():
    from cosyjax.train.parallel import make_mesh

    with pytest.raises(ValueError, match="make_mesh: no devices"):
        make_mesh([])


def test_flow_lengths_must_fit_their_arrays(flow_cfg):
    from cosyjax.flow.flow import flow_inference

    c = flow_cfg.output_size
    with pytest.raises(ValueError, match=r"token_len: lengths \[5\] must lie in \[0, 4\]"):
        flow_inference({}, np.zeros((1, 4), np.int64), np.zeros((1, 0), np.int64), np.zeros((1, 0, c), np.float32),
                       np.zeros((1, flow_cfg.spk_embed_dim), np.float32), cfg=flow_cfg,
                       noise=np.zeros((1, c, 100), np.float32), streaming=False, finalize=True, token_len=[5])


def test_export_params_errors():
    from cosyjax.convert.common import ConversionError
    from cosyjax.convert.export import export_flow, export_state_dicts

    with pytest.raises(ValueError, match=r"export of a bare params dict needs config= \(a ModelConfig\)"):
        export_state_dicts({"llm": {}, "flow": {}, "hift": {}})
    with pytest.raises(ConversionError, match="flow params: params must be a nested dict of arrays, found list"):
        export_flow([], load_model_config(TINY_A).flow)


# ---------------------------------------------------------------------------------------- parity harness
def test_case_keys_must_name_their_group(tmp_path):
    from cosyjax.parity.case import CaseError, load_case

    case = tmp_path / "case"
    shutil.copytree(os.path.dirname(TINY_A), case)
    with np.load(case / "golden.npz") as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(case / "golden.npz", **arrays, loose=np.zeros(1))
    with pytest.raises(CaseError, match=f"{case}/golden.npz: key 'loose' is not of the form <group>/<name>"):
        load_case(str(case))


def test_llm_runner_names_missing_reference_arrays():
    from cosyjax.parity.case import Case, load_case
    from cosyjax.parity.stages import llm as llm_stage

    case = load_case(os.path.dirname(TINY_A))
    arrays = {k: v for k, v in case.arrays.items() if k != "llm/prompt_text"}
    with pytest.raises(ValueError, match=f"{case.path}: llm group lacks llm/prompt_text"):
        llm_stage._request(dataclasses.replace(case, arrays=arrays))
    arrays = {**case.arrays, "llm/text": np.repeat(case.arrays["llm/text"], 2, axis=0)}
    with pytest.raises(ValueError, match=f"{case.path}: llm/text has batch 2; the runner expects 1"):
        llm_stage._request(Case(path=case.path, arrays=arrays, manifest=case.manifest, meta=case.meta))
