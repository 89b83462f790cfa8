"""The converter: strictness, bad checkpoints, atomic output, round trip, no torch at run time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from cosyjax.checkpoint import CheckpointError, load_converted
from cosyjax.config import ConfigError
from cosyjax.convert import convert_model, convert_to_dir
from cosyjax.convert.common import (
    ConversionError, apply_table, conv1d_t, fold_weight_norm, linear_t, load_state_dict, plain,
    weight_normed)

from conftest import DATA

TINY = os.path.join(DATA, "tiny-a", "model")


@pytest.fixture()
def release(tmp_path) -> str:
    """A writable copy of tiny-a's release directory."""
    d = tmp_path / "model"
    shutil.copytree(TINY, d)
    return str(d)


@pytest.fixture(scope="module")
def converted_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "tiny"
    convert_to_dir(TINY, str(out), progress=False)
    return str(out)


# ---------------------------------------------------------------- table machinery
def test_apply_table_reports_every_problem_at_once():
    import jax

    expected = {"a": {"kernel": jax.ShapeDtypeStruct((3, 2), np.float32)},
                "b": {"bias": jax.ShapeDtypeStruct((4,), np.float32)},
                "c": jax.ShapeDtypeStruct((1,), np.float32)}
    table = [plain(("a", "kernel"), "a.weight", linear_t), plain(("b", "bias"), "b.bias"),
             plain(("c",), "c.missing")]
    sd = {"a.weight": np.zeros((2, 3), np.float32), "b.bias": np.zeros((5,), np.float32),
          "extra.key": np.zeros(1, np.float32)}
    with pytest.raises(ConversionError) as e:
        apply_table(sd, table, expected, source="x.pt")
    msg = str(e.value)
    assert "x.pt" in msg
    assert "missing keys: c.missing" in msg
    assert "unexpected keys: extra.key" in msg
    assert "b.bias (5,) -> b/bias (5,), expected (4,)" in msg


def test_apply_table_fills_exactly():
    import jax

    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    expected = {"a": {"kernel": jax.ShapeDtypeStruct((3, 2), np.float32)}}
    params = apply_table({"a.weight": w}, [plain(("a", "kernel"), "a.weight", linear_t)], expected, source="x")
    np.testing.assert_array_equal(params["a"]["kernel"], w.T)


def test_weight_norm_both_forms_and_fold_matches_torch():
    import jax

    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(3, 5, 4))
    sd = {k: v.detach().numpy() for k, v in conv.state_dict().items()}
    expected = {"conv": {"kernel": jax.ShapeDtypeStruct((4, 3, 5), np.float32)}}
    table = [weight_normed(("conv", "kernel"), "conv")]
    sd_new = {"conv." + k: v for k, v in sd.items() if k != "bias"}
    new = apply_table(sd_new, table, expected, source="new")
    np.testing.assert_array_equal(new["conv"]["kernel"], conv1d_t(conv.weight.detach().numpy()))
    legacy = {"conv.weight_g": sd["parametrizations.weight.original0"],
              "conv.weight_v": sd["parametrizations.weight.original1"]}
    np.testing.assert_array_equal(apply_table(legacy, table, expected, source="legacy")["conv"]["kernel"],
                                  apply_table(sd_new, table, expected, source="new")["conv"]["kernel"])
    g, v = sd["parametrizations.weight.original0"], sd["parametrizations.weight.original1"]
    np.testing.assert_array_equal(fold_weight_norm(g, v), conv.weight.detach().numpy())


# ---------------------------------------------------------------- bad checkpoint files
def test_missing_pt(release):
    os.remove(os.path.join(release, "flow.pt"))
    with pytest.raises(ConversionError, match="flow.pt: checkpoint file not found"):
        convert_model(release, progress=False)


def test_truncated_pt(release):
    path = os.path.join(release, "hift.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="hift.pt"):
        convert_model(release, progress=False)


def test_non_zip_pt(release):
    path = os.path.join(release, "llm.pt")
    open(path, "wb").write(b"this is not a checkpoint")
    with pytest.raises(ConversionError, match="llm.pt: not a torch zip checkpoint"):
        load_state_dict(path)


class NotATensor:
    """A pickled object of an arbitrary class: weights_only must refuse it."""


def test_weights_only_refuses_pickled_object(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"x": NotATensor()}, path)
    with pytest.raises(ConversionError, match="weights_only"):
        load_state_dict(path)


def test_non_mapping_pt(tmp_path):
    path = str(tmp_path / "list.pt")
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ConversionError, match="expected a state_dict"):
        load_state_dict(path)


def _edit_pt(path, fn):
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


@pytest.mark.parametrize("stage,key", [("llm", "llm_decoder.weight"), ("flow", "decoder.estimator.proj_out.bias"),
                                       ("hift", "conv_post.bias")])
def test_missing_key_is_named(release, stage, key):
    _edit_pt(os.path.join(release, f"{stage}.pt"), lambda sd: sd.pop(key))
    with pytest.raises(ConversionError, match=f"missing keys: .*{key}"):
        convert_model(release, progress=False)


@pytest.mark.parametrize("stage", ["llm", "flow", "hift"])
def test_unexpected_key_is_named(release, stage):
    _edit_pt(os.path.join(release, f"{stage}.pt"), lambda sd: sd.__setitem__("surprise.weight", torch.zeros(3)))
    with pytest.raises(ConversionError, match="unexpected keys: surprise.weight"):
        convert_model(release, progress=False)


@pytest.mark.parametrize("stage,key", [("llm", "speech_embedding.weight"),
                                       ("flow", "spk_embed_affine_layer.weight"),
                                       ("hift", "source_downs.0.weight")])
def test_misshaped_key_is_named_with_both_shapes(release, stage, key):
    def grow(sd):
        t = sd[key]
        sd[key] = torch.zeros((t.shape[0] + 1,) + tuple(t.shape[1:]))

    _edit_pt(os.path.join(release, f"{stage}.pt"), grow)
    with pytest.raises(ConversionError, match=f"shape mismatches: {key}"):
        convert_model(release, progress=False)


def test_yaml_missing_stage_fails_before_loading(release):
    path = os.path.join(release, "cosyvoice3.yaml")
    text = open(path).read().split("\nhift:")[0]
    open(path, "w").write(text)
    with pytest.raises(ConfigError, match="no 'hift' section"):
        convert_model(release, progress=False)


# ---------------------------------------------------------------- output directory
def test_existing_output_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="output exists"):
        convert_to_dir(TINY, str(out), progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_conversion_leaves_nothing(release, tmp_path):
    _edit_pt(os.path.join(release, "hift.pt"), lambda sd: sd.pop("conv_post.bias"))
    out = tmp_path / "out"
    with pytest.raises(ConversionError):
        convert_to_dir(release, str(out), progress=False)
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p != "model"] == []


def test_cli_convert_errors_are_one_line(release, tmp_path):
    _edit_pt(os.path.join(release, "flow.pt"), lambda sd: sd.pop("input_embedding.weight"))
    r = subprocess.run([sys.executable, "-m", "cosyjax.cli", "convert", "--model-dir", release, "--out",
                        str(tmp_path / "o"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "input_embedding.weight" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- round trip
def _torch_arrays(stage):
    return {k: v.numpy() for k, v in torch.load(os.path.join(TINY, f"{stage}.pt"), weights_only=True).items()}


# Torch keys that map to no param, by design (convert/llm.py, convert/flow.py docstrings).
NOT_PARAMS = {"llm.model.lm_head.weight", "decoder.estimator.rotary_embed.inv_freq"}
EMBEDDINGS = ("embed_tokens", "speech_embedding", "input_embedding")
# Module-name rewrites where the Flax tree does not follow "name.N" -> "name_N" (written from the
# torch modules: the Qwen2 wrapper, the DiT estimator, ConvPositionEmbedding's Sequentials).
RENAMES = (("llm.model.model.", "llm."), ("decoder.estimator.", "estimator."),
           ("conv_pos_embed.conv1.0", "conv_pos_embed.conv1"), ("conv_pos_embed.conv2.0", "conv_pos_embed.conv2"))


def _jax_module_path(module: str) -> tuple[str, ...]:
    for old, new in RENAMES:
        module = module.replace(old, new)
    parts: list[str] = []
    for part in module.split("."):
        if part.isdigit() and parts:
            parts[-1] += f"_{part}"  # torch "layers.3" / "ups.0" / "ff.0.0" -> "layers_3" / "ups_0" / "ff_0_0"
        else:
            parts.append(part)
    return tuple(parts)


def _torch_weight_norm_weight(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The weight a weight-normed torch Conv1d computes at run time from (original0, original1)."""
    out_channels, in_channels, kernel = v.shape
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(in_channels, out_channels, kernel))
    with torch.no_grad():
        conv.parametrizations.weight.original0.copy_(torch.from_numpy(g))
        conv.parametrizations.weight.original1.copy_(torch.from_numpy(v))
        return conv.weight.numpy().copy()


def expected_params(stage: str, sd: dict[str, np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
    """Hand-written expected JAX params for a stage's torch state_dict, independent of convert/'s tables.

    Layouts: Linear weight W [out, in] -> kernel[i, o] = W[o, i]; Conv1d weight W [out, in, k] ->
    kernel[k, i, o] = W[o, i, k]; a weight-normed conv -> the kernel of the weight torch's
    parametrization computes at run time, bit for bit; the f0 predictor's weight-normed convs keep
    g [out] and v in kernel layout; embeddings, norms, biases and Snake alphas unchanged.
    """
    expected: dict[tuple[str, ...], np.ndarray] = {}
    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        if key in NOT_PARAMS:
            continue
        for suffix, name in ((".parametrizations.weight.original0", "g"), (".parametrizations.weight.original1", "v"),
                             (".weight_g", "g"), (".weight_v", "v")):
            if key.endswith(suffix):
                factors.setdefault(key[:-len(suffix)], {})[name] = value
                break
        else:
            module, leaf = key.rsplit(".", 1)
            path = _jax_module_path(module)
            if leaf == "weight" and path[-1] in EMBEDDINGS:
                expected[path + ("embedding",)] = value
            elif leaf == "weight" and value.ndim == 2:
                expected[path + ("kernel",)] = np.einsum("oi->io", value)
            elif leaf == "weight" and value.ndim == 3:
                expected[path + ("kernel",)] = np.einsum("oik->kio", value)
            else:
                assert leaf in ("weight", "bias", "alpha") and value.ndim == 1, (stage, key, value.shape)
                expected[path + (leaf,)] = value
    for module, gv in factors.items():
        path = _jax_module_path(module)
        if path[0] == "f0_predictor":
            expected[path + ("weight_g",)] = gv["g"][:, 0, 0]
            expected[path + ("weight_v",)] = np.einsum("oik->kio", gv["v"])
        else:
            expected[path + ("kernel",)] = np.einsum("oik->kio", _torch_weight_norm_weight(gv["g"], gv["v"]))
    return expected


def test_round_trip_every_array_equals_its_source(converted_tiny):
    """Every converted param equals its torch source in the hand-written layout of expected_params,
    exactly (float32), and every param is accounted for by exactly one torch key (or g/v pair)."""
    from cosyjax.convert.common import flatten_params

    model = load_converted(converted_tiny)
    assert model.dtype == "float32"
    for stage in ("llm", "flow", "hift"):
        sd = {k.replace("generator.", ""): v for k, v in _torch_arrays(stage).items()}
        want = expected_params(stage, sd)
        got = {path: np.asarray(v) for path, v in flatten_params(model.params[stage]).items()}
        assert sorted(got) == sorted(want), (stage, sorted(set(got) ^ set(want))[:8])
        for path, value in want.items():
            assert got[path].dtype == np.float32
            np.testing.assert_array_equal(got[path], value, err_msg=f"{stage}: {'/'.join(path)}")


def test_expected_layouts_are_what_the_layers_compute(converted_tiny):
    """The layouts above, applied by our Flax layers, compute what the torch layers compute: a Linear
    (an LLM q_proj), a Conv1d (the flow's look-ahead conv) and a weight-normed Conv1d (HiFT conv_pre),
    on the same input, within float32 dot-product error: each side's n-term sums (n = fan-in) are
    off by at most gamma(n + 1) (|W| |x| + |b|), gamma(n) = n u / (1 - n u), u = 2^-24."""
    import flax.linen as nn
    import jax

    from cosyjax.nn.conv import Conv1d

    model = load_converted(converted_tiny)
    rng = np.random.default_rng(0)

    def gamma(n):
        return n * 2.0 ** -24 / (1 - n * 2.0 ** -24)

    def check(name, ours, theirs, bound):
        err = np.abs(np.asarray(ours, np.float64) - theirs)
        assert np.all(err <= bound), (name, float(err.max()), float(bound[np.unravel_index(np.argmax(err / bound),
                                                                                            err.shape)]))

    llm_sd, flow_sd, hift_sd = (_torch_arrays(s) for s in ("llm", "flow", "hift"))
    # Linear
    w, b = (llm_sd[f"llm.model.model.layers.0.self_attn.q_proj.{p}"] for p in ("weight", "bias"))
    x = rng.standard_normal((3, w.shape[1])).astype(np.float32)
    params = model.params["llm"]["llm"]["layers_0"]["self_attn"]["q_proj"]
    ours = nn.Dense(w.shape[0], precision=jax.lax.Precision.HIGHEST).apply({"params": params}, x)
    theirs = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)).numpy()
    check("linear", ours, theirs, 2 * gamma(w.shape[1] + 1) * (np.abs(x) @ np.abs(w).T + np.abs(b)))
    # Conv1d and weight-normed Conv1d, channels-last ours vs channels-first torch
    for name, stage_params, weight in (
            ("conv", model.params["flow"]["pre_lookahead_layer"]["conv1"],
             flow_sd["pre_lookahead_layer.conv1.weight"]),
            ("weight-normed conv", model.params["hift"]["conv_pre"],
             _torch_weight_norm_weight(hift_sd["conv_pre.parametrizations.weight.original0"],
                                       hift_sd["conv_pre.parametrizations.weight.original1"]))):
        bias = np.asarray(stage_params["bias"])
        out_ch, in_ch, k = weight.shape
        x = rng.standard_normal((2, 11, in_ch)).astype(np.float32)  # [B, T, C]
        ours = Conv1d(out_ch, k).apply({"params": stage_params}, x)  # [B, T - k + 1, C_out]
        theirs = torch.nn.functional.conv1d(torch.from_numpy(x.transpose(0, 2, 1)), torch.from_numpy(weight),
                                            torch.from_numpy(bias)).numpy().transpose(0, 2, 1)
        windows = np.stack([np.abs(x[:, t:t + k]) for t in range(x.shape[1] - k + 1)], axis=1)  # [B, T', k, C]
        magnitude = np.einsum("btkc,ock->bto", windows, np.abs(weight)) + np.abs(bias)
        check(name, ours, theirs, 2 * gamma(in_ch * k + 1) * magnitude)


def test_flow_noise_is_upstreams_seeded_buffer(converted_tiny):
    model = load_converted(converted_tiny)
    torch.manual_seed(0)
    want = torch.randn([1, 80, 50 * 300]).numpy()
    np.testing.assert_array_equal(model.buffers["flow_rand_noise"], want)


def test_bfloat16_conversion(tmp_path):
    out = convert_to_dir(TINY, str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
    model = load_converted(out)
    assert model.dtype == "bfloat16"
    leaf = model.params["hift"]["conv_post"]["kernel"]
    assert str(leaf.dtype) == "bfloat16"
    assert model.buffers["flow_rand_noise"].dtype == np.float32


def test_runtime_path_does_not_import_torch(converted_tiny):
    code = (
        "import sys\n"
        "import cosyjax\n"
        "from cosyjax import load_converted\n"
        "import cosyjax.llm, cosyjax.flow, cosyjax.hift, cosyjax.nn, cosyjax.cli\n"
        f"m = load_converted({converted_tiny!r})\n"
        "bad = [k for k in sys.modules if k == 'torch' or k.startswith('torch.') or k.startswith('transformers')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_load_converted_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_converted(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a converted model"):
        load_converted(str(tmp_path / "empty"))


# ---------------------------------------------------------------- llm.rl.pt
def _rl_release(release: str) -> None:
    """Give ``release`` an llm.rl.pt: llm.pt's tensors, every float one scaled by 2 (same keys and shapes)."""
    sd = torch.load(os.path.join(release, "llm.pt"), weights_only=True)
    torch.save({k: v * 2 if v.is_floating_point() else v for k, v in sd.items()}, os.path.join(release, "llm.rl.pt"))


def test_llm_file_selects_the_rl_checkpoint(release):
    _rl_release(release)
    plain_model = convert_model(release, progress=False)
    rl_model = convert_model(release, llm_file="llm.rl.pt", progress=False)
    assert "llm.rl.pt" in rl_model.source and "llm.pt" not in rl_model.source
    plain_llm, rl_llm = _flat(plain_model.params["llm"]), _flat(rl_model.params["llm"])
    assert plain_llm and rl_llm.keys() == plain_llm.keys()
    for key, value in rl_llm.items():
        np.testing.assert_array_equal(value, 2 * plain_llm[key])
    for stage in ("flow", "hift"):  # the other stages are the same files
        want, got = _flat(plain_model.params[stage]), _flat(rl_model.params[stage])
        assert all(np.array_equal(got[k], want[k]) for k in want)


def _flat(tree) -> dict:
    from cosyjax.convert.common import flatten_params

    return {k: np.asarray(v, np.float32) for k, v in flatten_params(tree).items()}


@pytest.mark.parametrize("bad", ["", "../llm.pt", "/abs/llm.rl.pt", "llm.rl", "sub/llm.pt"])
def test_llm_file_must_be_a_pt_name_in_the_release(release, bad):
    with pytest.raises(ConversionError, match="llm_file"):
        convert_model(release, llm_file=bad, progress=False)


def test_missing_llm_rl_is_named(release):
    with pytest.raises(ConversionError, match=r"llm\.rl\.pt: checkpoint file not found \(llm stage\)"):
        convert_model(release, llm_file="llm.rl.pt", progress=False)


def test_convert_on_first_use_caches_each_llm_file_apart(release):
    from cosyjax.pipeline import ensure_converted

    _rl_release(release)
    plain_dir = ensure_converted(release, progress=False)
    rl_dir = ensure_converted(release, llm_file="llm.rl.pt", progress=False)
    assert os.path.basename(plain_dir) == "float32" and os.path.basename(rl_dir) == "float32-llm.rl"
    assert ensure_converted(release, llm_file="llm.rl.pt", progress=False) == rl_dir  # cached
    a, b = load_converted(plain_dir), load_converted(rl_dir)
    key = next(iter(_flat(a.params["llm"])))
    np.testing.assert_array_equal(_flat(b.params["llm"])[key], 2 * _flat(a.params["llm"])[key])
