"""Release-directory reading: yaml tags as data, dims from the files, clear errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from cosyjax.config import ConfigError, ModelConfig, load_model_config, read_yaml

from conftest import DATA

TINY = os.path.join(DATA, "tiny-a", "model")


def _copy_release(tmp_path) -> str:
    d = tmp_path / "model"
    os.makedirs(d / "CosyVoice-BlankEN")
    shutil.copy(os.path.join(TINY, "cosyvoice3.yaml"), d)
    shutil.copy(os.path.join(TINY, "CosyVoice-BlankEN", "config.json"), d / "CosyVoice-BlankEN")
    return str(d)


def test_tiny_a_dims_come_from_the_files():
    cfg = load_model_config(TINY)
    with open(os.path.join(TINY, "CosyVoice-BlankEN", "config.json")) as f:
        qwen = json.load(f)
    assert cfg.llm.hidden_size == qwen["hidden_size"]
    assert cfg.llm.num_layers == qwen["num_hidden_layers"]
    assert cfg.llm.num_kv_heads == qwen["num_key_value_heads"]
    assert cfg.llm.head_dim == qwen["hidden_size"] // qwen["num_attention_heads"]
    assert cfg.llm.speech_token_size == 64 and cfg.llm.speech_vocab_size == 264
    assert (cfg.llm.sos, cfg.llm.eos, cfg.llm.task_id, cfg.llm.fill_token) == (64, 65, 66, 67)
    # `!ref <chunk_size> * <token_mel_ratio>` is evaluated as arithmetic: 5 * 2
    assert cfg.flow.static_chunk_size == 10
    assert cfg.flow.dim == 64 and cfg.flow.depth == 2 and cfg.flow.pre_lookahead_channels == 64
    assert cfg.hift.base_channels == 32 and cfg.hift.upsample_scale == 480
    assert cfg.mel is not None and cfg.mel.n_fft == 1920 and cfg.mel.fmax is None


def test_full_size_config(full_size_model_dir):
    cfg = load_model_config(full_size_model_dir)
    assert (cfg.llm.num_layers, cfg.llm.hidden_size, cfg.llm.num_heads, cfg.llm.num_kv_heads) == (24, 896, 14, 2)
    assert cfg.llm.speech_vocab_size == 6761
    assert (cfg.flow.dim, cfg.flow.depth, cfg.flow.heads, cfg.flow.static_chunk_size) == (1024, 22, 16, 50)
    assert cfg.hift.base_channels == 512


def test_config_roundtrips_through_json():
    cfg = load_model_config(TINY)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_tags_are_not_executed(tmp_path):
    d = _copy_release(tmp_path)
    path = os.path.join(d, "cosyvoice3.yaml")
    with open(path, "a") as f:  # would raise if anything executed !apply / !new tags
        f.write("\nboom: !apply:os.remove ['/nonexistent/definitely']\nboom2: !new:nonexistent.module.Cls\n")
    tree = read_yaml(path)
    assert tree["boom"].kind == "apply" and tree["boom"].target == "os.remove"
    load_model_config(d)


@pytest.mark.parametrize("stage", ["llm", "flow", "hift"])
def test_yaml_missing_a_stage(tmp_path, stage):
    d = _copy_release(tmp_path)
    path = os.path.join(d, "cosyvoice3.yaml")
    text = open(path).read()
    lines, out, skipping = text.splitlines(), [], False
    for line in lines:
        if line.startswith(f"{stage}:"):
            skipping = True
            continue
        if skipping and (line.startswith(" ") or not line.strip()):
            continue
        skipping = False
        out.append(line)
    open(path, "w").write("\n".join(out))
    with pytest.raises(ConfigError, match=f"no '{stage}' section"):
        load_model_config(d)


def test_unknown_field_is_named(tmp_path):
    d = _copy_release(tmp_path)
    path = os.path.join(d, "cosyvoice3.yaml")
    text = open(path).read().replace("    base_channels: 32\n", "    base_channels: 32\n    bogus_width: 7\n")
    open(path, "w").write(text)
    with pytest.raises(ConfigError, match="bogus_width"):
        load_model_config(d)


def test_missing_required_field_is_named(tmp_path):
    d = _copy_release(tmp_path)
    path = os.path.join(d, "cosyvoice3.yaml")
    text = open(path).read().replace("    speech_token_size: 64\n", "")
    open(path, "w").write(text)
    with pytest.raises(ConfigError, match="speech_token_size"):
        load_model_config(d)


def test_missing_qwen_config(tmp_path):
    d = _copy_release(tmp_path)
    os.remove(os.path.join(d, "CosyVoice-BlankEN", "config.json"))
    with pytest.raises(ConfigError, match="CosyVoice-BlankEN/config.json"):
        load_model_config(d)


def test_qwen_config_missing_field(tmp_path):
    d = _copy_release(tmp_path)
    path = os.path.join(d, "CosyVoice-BlankEN", "config.json")
    cfg = json.load(open(path))
    del cfg["num_key_value_heads"]
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        load_model_config(d)


def test_missing_yaml_and_dir(tmp_path):
    with pytest.raises(ConfigError, match="model directory not found"):
        load_model_config(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="cosyvoice3.yaml: file not found"):
        load_model_config(str(tmp_path))


def test_bad_ref(tmp_path):
    d = _copy_release(tmp_path)
    path = os.path.join(d, "cosyvoice3.yaml")
    text = open(path).read().replace("!ref <spk_embed_dim>", "!ref <no_such_key>")
    open(path, "w").write(text)
    with pytest.raises(ConfigError, match="no_such_key"):
        load_model_config(d)


def test_inconsistent_dims_are_reported_with_numbers(tmp_path):
    d = _copy_release(tmp_path)
    path = os.path.join(d, "cosyvoice3.yaml")
    text = open(path).read().replace("llm_input_size: 64", "llm_input_size: 48", 1)
    open(path, "w").write(text)
    with pytest.raises(ConfigError, match="llm_input_size=48 != Qwen hidden_size=64"):
        load_model_config(d)
