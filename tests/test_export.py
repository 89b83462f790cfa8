"""Export: cosyjax params -> upstream .pt state_dicts, the converter's inverse.

Measured on tests/data/tiny-a (the numbers the asserts pin):
- llm.pt, flow.pt: pt -> JAX -> pt gives every tensor back bitwise (incl. the tied lm_head, which
  is saved as the same storage as embed_tokens, and the rotary inv_freq buffer);
- hift.pt: weight-normed convs come back as (g, v) = (row norms of W, W), not the release's (g, v)
  (only their product W is kept); the folded weight ``torch._weight_norm(v, g, 0)`` is bitwise the
  release's, and the f0 predictor's unfolded g/v and every other tensor are bitwise too;
- JAX -> pt -> JAX: bitwise for all three stages (hift included: g is the norm torch's own
  weight-norm kernel divides by, so the fold gives W back exactly).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from cosyjax.checkpoint import cast_params
from cosyjax.convert import convert_model, flow as flow_conv, hift as hift_conv, llm as llm_conv
from cosyjax.convert.common import ConversionError, flatten_params
from cosyjax.convert.export import export_state_dicts, export_to_dir, unfold_weight_norm

from conftest import DATA

TINY = os.path.join(DATA, "tiny-a", "model")
CONVERTERS = {"llm": llm_conv.convert, "flow": flow_conv.convert, "hift": hift_conv.convert}


@pytest.fixture(scope="module")
def converted():
    return convert_model(TINY, progress=False)


def _release(stage: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(TINY, f"{stage}.pt"), map_location="cpu", weights_only=True)


def _fold(sd, module: str) -> torch.Tensor:
    p = f"{module}.parametrizations.weight."
    return torch._weight_norm(torch.as_tensor(sd[p + "original1"]), torch.as_tensor(sd[p + "original0"]), 0)


def test_pt_to_jax_to_pt_is_bitwise_for_llm_and_flow(converted, tmp_path):
    out = export_to_dir(converted, str(tmp_path / "exported"))
    assert sorted(os.listdir(out)) == ["flow.pt", "hift.pt", "llm.pt"]
    for stage in ("llm", "flow"):
        release = _release(stage)
        exported = torch.load(os.path.join(out, f"{stage}.pt"), weights_only=True)
        assert set(exported) == set(release), stage
        for key, want in release.items():
            got = exported[key]
            assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape, key
            assert torch.equal(got, want), f"{stage}: {key}"
    llm = torch.load(os.path.join(out, "llm.pt"), weights_only=True)
    # tied, as in the release: one storage, so the file holds the table once
    assert llm["llm.model.lm_head.weight"].data_ptr() == llm["llm.model.model.embed_tokens.weight"].data_ptr()


def test_hift_round_trip_keeps_the_folded_weights_bitwise(converted):
    release = _release("hift")
    exported = export_state_dicts(converted, stages=("hift",))["hift"]
    assert set(exported) == set(release)
    modules = sorted({k.split(".parametrizations.")[0] for k in release if ".parametrizations." in k})
    assert len(modules) > 50
    for module in modules:
        if module.startswith("f0_predictor"):  # kept unfolded in JAX: g and v come back as they were
            for i in (0, 1):
                key = f"{module}.parametrizations.weight.original{i}"
                assert np.array_equal(exported[key], release[key].numpy()), key
        else:
            assert torch.equal(_fold(exported, module), _fold(release, module)), module
            g = exported[f"{module}.parametrizations.weight.original0"]
            assert g.shape == tuple(release[f"{module}.parametrizations.weight.original0"].shape)
    for key in (k for k in release if ".parametrizations." not in k):
        assert np.array_equal(exported[key], release[key].numpy()), key


def test_jax_to_pt_to_jax_is_bitwise(converted):
    """Fine-tuned-looking params (converted + noise) survive export + convert exactly, all stages."""
    rng = np.random.default_rng(0)
    noisy = {stage: _perturb(tree, rng) for stage, tree in converted.params.items()}
    model = dataclasses.replace(converted, params=noisy)
    sds = export_state_dicts(model)
    for stage, sd in sds.items():
        back = CONVERTERS[stage](sd, getattr(converted.config, stage), f"exported {stage}")
        want, got = flatten_params(noisy[stage]), flatten_params(back)
        assert set(got) == set(want)
        for path in want:
            assert np.array_equal(got[path], want[path]), f"{stage}: {'/'.join(path)}"


def _perturb(tree, rng):
    if isinstance(tree, dict):
        return {k: _perturb(v, rng) for k, v in tree.items()}
    arr = np.asarray(tree, np.float32)
    return (arr + 0.01 * rng.standard_normal(arr.shape)).astype(np.float32)


def test_unfold_weight_norm_zero_row_and_exactness():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 5, 3)).astype(np.float32)
    w[2] = 0.0
    g, v = unfold_weight_norm(w)
    assert g.shape == (6, 1, 1) and g[2, 0, 0] == 0.0
    folded = torch._weight_norm(torch.from_numpy(v), torch.from_numpy(g), 0).numpy()
    assert np.array_equal(folded, w)  # zero row folds to 0, not NaN


def test_bfloat16_conversion_exports_float32(converted):
    bf16 = dataclasses.replace(converted, params=cast_params(converted.params, "bfloat16"), dtype="bfloat16")
    sd = export_state_dicts(bf16, stages=("llm",))["llm"]
    want = np.asarray(bf16.params["llm"]["llm_decoder"]["kernel"], np.float32).T
    assert sd["llm_decoder.weight"].dtype == np.float32
    assert np.array_equal(sd["llm_decoder.weight"], want)


def test_wrong_structure_is_reported(converted):
    params = {k: v for k, v in converted.params.items()}
    llm = {**params["llm"], "extra": {"kernel": np.zeros(3, np.float32)}}
    llm["llm_decoder"] = {"kernel": np.zeros((3, 4), np.float32)}
    del llm["speech_embedding"]
    bad = dataclasses.replace(converted, params={**params, "llm": llm})
    with pytest.raises(ConversionError) as e:
        export_state_dicts(bad)
    msg = str(e.value)
    assert "missing params: speech_embedding/embedding" in msg
    assert "unexpected params: extra/kernel" in msg
    assert "llm_decoder/kernel (3, 4), expected (64, 264)" in msg
    with pytest.raises(ConversionError, match="no hift stage"):
        export_state_dicts({"llm": params["llm"], "flow": params["flow"]}, config=converted.config)
    with pytest.raises(ValueError, match="needs config="):
        export_state_dicts(dict(params))
    with pytest.raises(ConversionError, match="params must be a nested dict"):
        export_state_dicts({**params, "flow": [1, 2]}, config=converted.config)


def test_untied_lm_head_must_be_given(converted):
    cfg = dataclasses.replace(converted.config, llm=dataclasses.replace(converted.config.llm,
                                                                        tie_word_embeddings=False))
    untied = dataclasses.replace(converted, config=cfg)
    with pytest.raises(ConversionError, match="pass lm_head="):
        export_state_dicts(untied, stages=("llm",))
    head = np.ones((cfg.llm.vocab_size, cfg.llm.hidden_size), np.float32)
    sd = export_state_dicts(untied, stages=("llm",), lm_head=head)["llm"]
    assert np.array_equal(sd["llm.model.lm_head.weight"], head)
    with pytest.raises(ConversionError, match="tie_word_embeddings is true"):
        export_state_dicts(converted, stages=("llm",), lm_head=head)


def test_export_dir_is_atomic_and_a_complete_release(converted, tmp_path):
    out = str(tmp_path / "release")
    export_to_dir(converted, out, template_dir=TINY)
    assert set(os.listdir(out)) == set(os.listdir(TINY))
    again = convert_model(out, progress=False)  # the exported directory converts like the original
    for stage in ("llm", "flow", "hift"):
        want, got = flatten_params(converted.params[stage]), flatten_params(again.params[stage])
        assert all(np.array_equal(got[p], want[p]) for p in want), stage
    with pytest.raises(FileExistsError):
        export_to_dir(converted, out)
    bad = dataclasses.replace(converted, params={**converted.params, "flow": {}})
    with pytest.raises(ConversionError):
        export_to_dir(bad, str(tmp_path / "never"))
    assert sorted(os.listdir(tmp_path)) == ["release"]  # nothing half-written


def test_export_skips_the_templates_rl_llm_and_conversion_cache(converted, tmp_path):
    """A template's llm.rl.pt (the old LLM beside the exported llm.pt) and its .cosyjax cache stay behind."""
    import shutil

    template = tmp_path / "template"
    shutil.copytree(TINY, template)
    shutil.copy(template / "llm.pt", template / "llm.rl.pt")
    (template / ".cosyjax" / "float32").mkdir(parents=True)
    (template / ".cosyjax" / "float32" / "config.json").write_text("{}")
    out = tmp_path / "release"
    export_to_dir(converted, str(out), template_dir=str(template))
    assert set(os.listdir(out)) == set(os.listdir(TINY))


def test_cli_export(tmp_path, capsys):
    from cosyjax.checkpoint import save_converted
    from cosyjax.cli import main

    conv = str(tmp_path / "conv")
    save_converted(conv, convert_model(TINY, progress=False))
    out = tmp_path / "pt"
    assert main(["export", "--converted-dir", conv, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["flow.pt", "hift.pt", "llm.pt"]
    assert main(["export", "--converted-dir", conv, "--out", str(out)]) == 2
    assert "output exists" in capsys.readouterr().err


# ---------------------------------------------------------------- upstream's strict load
REFERENCE_REPO = os.environ.get("COSYJAX_REFERENCE_REPO")


@pytest.mark.upstream
@pytest.mark.skipif(not REFERENCE_REPO, reason="set COSYJAX_REFERENCE_REPO to an upstream CosyVoice checkout")
def test_upstream_loads_the_export_strictly(converted, tmp_path):
    """Fine-tuned-looking params exported into a release dir load with upstream's strict load_state_dict,
    and the loaded modules hold exactly our weights (HiFT through its weight-norm parametrization)."""
    from cosyjax.parity import make_case as mc
    from cosyjax.parity.upstream import import_upstream

    import_upstream(REFERENCE_REPO)
    rng = np.random.default_rng(3)
    noisy = {stage: _perturb(tree, rng) for stage, tree in converted.params.items()}
    out = export_to_dir(dataclasses.replace(converted, params=noisy), str(tmp_path / "release"), template_dir=TINY)
    models = mc.build_models(out)
    mc.load_weights(models, out)  # strict=True, as CosyVoiceModel.load
    llm = models["llm"]
    np.testing.assert_array_equal(llm.llm_decoder.weight.detach().numpy(), noisy["llm"]["llm_decoder"]["kernel"].T)
    np.testing.assert_array_equal(llm.llm.model.lm_head.weight.detach().numpy(),
                                  noisy["llm"]["llm"]["embed_tokens"]["embedding"])
    flow = models["flow"]
    np.testing.assert_array_equal(flow.decoder.estimator.proj_out.weight.detach().numpy(),
                                  noisy["flow"]["estimator"]["proj_out"]["kernel"].T)
    hift = models["hift"]
    with torch.no_grad():
        np.testing.assert_array_equal(hift.conv_pre.weight.numpy(),  # parametrized: g * v / ||v||
                                      np.transpose(noisy["hift"]["conv_pre"]["kernel"], (2, 1, 0)))
        np.testing.assert_array_equal(hift.ups[0].weight.numpy(),
                                      np.transpose(noisy["hift"]["ups_0"]["kernel"], (2, 1, 0)))
