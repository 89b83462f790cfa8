"""The reference-case generator (cosyjax.parity.make_case) and the committed cases it must agree with.

Structure tests run on every committed case (tests/data/*/golden.npz): each must hold every group and
key of tiny-a (the case made independently from upstream), with the same dtypes and ranks, shapes that
follow from the case's own model config and input lengths, a manifest that describes every array,
and meta.json file hashes that match.  The ``upstream`` test runs make_case end to end when
COSYJAX_REFERENCE_REPO points at an upstream CosyVoice checkout.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest

from conftest import DATA, case_dirs
from cosyjax.config import load_model_config
from cosyjax.parity.case import load_case

TINY_A = os.path.join(DATA, "tiny-a")
CONFIGS = os.path.join(DATA, "configs")
CASES = case_dirs()
# full cases hold a model (tiny-a's groups); frontend cases hold only the ONNX models and their outputs
MODEL_CASES = [c for c in CASES if os.path.exists(os.path.join(c, "model", "cosyvoice3.yaml"))]
FRONTEND_CASES = [c for c in CASES if c not in MODEL_CASES]


@pytest.fixture(scope="module")
def tiny_a():
    return load_case(TINY_A)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def check_case_structure(case_dir: str, reference) -> None:
    """Assert that the case at ``case_dir`` has ``reference``'s keys and self-consistent shapes."""
    case = load_case(case_dir)
    cfg = load_model_config(case.model_dir)
    a = case.arrays

    missing = sorted(set(reference.arrays) - set(a))
    assert not missing, f"{case_dir}: keys of tiny-a missing: {missing}"
    for key, ref in reference.arrays.items():
        assert a[key].dtype == ref.dtype, f"{key}: dtype {a[key].dtype} != tiny-a's {ref.dtype}"
        assert a[key].ndim == ref.ndim, f"{key}: rank {a[key].ndim} != tiny-a's {ref.ndim}"
    for key, arr in a.items():
        assert arr.dtype in (np.float32, np.int64, np.bool_), f"{key}: dtype {arr.dtype}"
        if arr.dtype == np.bool_:
            assert arr.shape == (), f"{key}: flags are 0-d"

    # manifest: exactly the golden keys, with their shapes and dtypes, and a meaning
    assert set(case.manifest) == set(a), f"manifest keys differ: {sorted(set(case.manifest) ^ set(a))}"
    for key, entry in case.manifest.items():
        assert entry["shape"] == list(a[key].shape), f"manifest {key}: shape {entry['shape']} != {a[key].shape}"
        assert entry["dtype"] == str(a[key].dtype), f"manifest {key}: dtype {entry['dtype']}"
        assert entry["desc"].strip(), f"manifest {key}: empty desc"

    # llm: T = 1 + Lp + Lt + 1 + Np + Nt, logits over speech_token_size + 200
    h, v, s = cfg.llm.hidden_size, cfg.llm.speech_token_size + 200, cfg.llm.speech_token_size
    lp, lt = a["llm/prompt_text"].shape[1], a["llm/text"].shape[1]
    np_, nt = a["llm/prompt_speech_token"].shape[1], a["llm/speech_token"].shape[1]
    p = 1 + lp + lt + 1 + np_
    assert a["llm/lm_input"].shape == (1, p + nt, h)
    assert a["llm/hidden"].shape == (1, p + nt, h)
    assert a["llm/logits"].shape == (1, p + nt, v)
    np.testing.assert_array_equal(a["llm/speech_pred_positions"], np.arange(p - 1, p - 1 + nt))
    for key in ("llm/speech_logp", "llm/step_logits", "llm/step_scores"):
        assert a[key].shape == (nt, v), key
    assert int(a["llm/min_len"]) == 2 * lt
    assert a["llm/text"].max() < cfg.llm.vocab_size and a["llm/speech_token"].max() < s
    masked = np.isneginf(a["llm/step_scores"][:, s])
    np.testing.assert_array_equal(masked, np.arange(nt) < 2 * lt)  # upstream's min_len quirk on sos

    # llm_greedy
    np.testing.assert_array_equal(a["llm_greedy/lm_input"], a["llm/lm_input"][:, :p])
    assert int(a["llm_greedy/min_len"]) == 2 * lt and int(a["llm_greedy/max_len"]) == 20 * lt
    n = a["llm_greedy/tokens"].shape[1]
    stopped = bool(a["llm_greedy/stopped_by_token"])
    assert a["llm_greedy/step_logits"].shape == (n + 1 if stopped else n, v)
    assert (int(a["llm_greedy/stop_token"]) >= s) if stopped else int(a["llm_greedy/stop_token"]) == -1
    assert (a["llm_greedy/tokens"] < s).all()

    # flow groups: Tm = 2 * (Np + Nt), the partial run holds pre_lookahead_len tokens back
    npf, ntf = a["flow/prompt_token"].shape[1], a["flow/token"].shape[1]
    ratio = cfg.flow.token_mel_ratio
    assert a["flow/prompt_feat"].shape == (1, ratio * npf, cfg.flow.output_size)
    assert a["flow/embedding"].shape == (1, cfg.flow.spk_embed_dim)
    for group, streaming, finalize in (("flow", False, True), ("flow_stream", True, True),
                                       ("flow_stream_partial", True, False)):
        tokens = npf + ntf - (0 if finalize else cfg.flow.pre_lookahead_len)
        tm = ratio * tokens
        assert bool(a[f"{group}/streaming"]) is streaming and bool(a[f"{group}/finalize"]) is finalize
        assert a[f"{group}/h"].shape == (1, tokens, 80), group
        for key in ("mu", "cond", "noise_z"):
            assert a[f"{group}/{key}"].shape == (1, 80, tm), (group, key)
        assert a[f"{group}/mask"].shape == (1, 1, tm)
        steps = a[f"{group}/est_x"].shape[0]
        assert a[f"{group}/est_x"].shape == a[f"{group}/est_out"].shape == (steps, 2, 80, tm)
        assert a[f"{group}/est_t"].shape == (steps, 2)
        assert a[f"{group}/est_mu"].shape == a[f"{group}/est_cond"].shape == (2, 80, tm)
        assert not a[f"{group}/est_mu"][1].any() and not a[f"{group}/est_spks"][1].any()  # CFG row
        assert a[f"{group}/mel"].shape == (1, 80, tm - ratio * npf)

    # hift: 480 samples per frame; finalize=False holds 3 (f0) + 4 (conv_pre) + 1 (iSTFT) frames back
    hop = math.prod(cfg.hift.upsample_rates) * cfg.hift.hop_len
    for group, finalize in (("hift", True), ("hift_partial", False)):
        t = a[f"{group}/speech_feat"].shape[2]
        t_f0 = t if finalize else t - 3
        length = hop * t_f0
        assert bool(a[f"{group}/finalize"]) is finalize
        assert a[f"{group}/f0"].shape == (1, t_f0), group
        assert a[f"{group}/source"].shape == (1, 1, length), group
        frames = length // cfg.hift.hop_len + 1
        if not finalize:
            frames -= math.prod(cfg.hift.upsample_rates) * cfg.hift.conv_pre_look_right
        assert a[f"{group}/conv_post"].shape == (1, cfg.hift.n_fft + 2, frames), group
        samples = hop * t if finalize else hop * (t - 3 - cfg.hift.conv_pre_look_right - 1)
        assert a[f"{group}/audio"].shape == (1, samples), group
        assert np.abs(a[f"{group}/audio"]).max() <= cfg.hift.audio_limit
        assert a[f"{group}/noise_rand_ini"].shape == (1, cfg.hift.nb_harmonics + 1)
        assert a[f"{group}/noise_rand_ini"][0, 0] == 0.0
        assert a[f"{group}/noise_sine_waves"].shape == (1, length, cfg.hift.nb_harmonics + 1)
        assert a[f"{group}/noise_uv"].shape == (1, length, 1)

    # meta: provenance and the hashes of what was written
    meta = case.meta
    for key in ("seed", "upstream_commit", "versions", "torch_threads", "checks", "files"):
        assert key in meta, f"meta.json lacks {key}"
    assert meta["torch_threads"] == 1 and meta["checks"]
    for rel, entry in meta["files"].items():
        path = os.path.join(case_dir, rel)
        assert os.path.getsize(path) == entry["bytes"], rel
        assert _sha256(path) == entry["sha256"], f"{rel}: sha256 differs from meta.json"


@pytest.mark.parametrize("case_dir", MODEL_CASES, ids=[os.path.basename(c) for c in MODEL_CASES])
def test_committed_case_structure(case_dir, tiny_a):
    check_case_structure(case_dir, tiny_a)


@pytest.mark.parametrize("case_dir", FRONTEND_CASES, ids=[os.path.basename(c) for c in FRONTEND_CASES])
def test_committed_frontend_case_structure(case_dir):
    """A frontend-only case: only frontend groups, the manifest names exactly its arrays with their
    shapes, and it says which models made it."""
    with np.load(os.path.join(case_dir, "golden.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    with open(os.path.join(case_dir, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    with open(os.path.join(case_dir, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    assert arrays and all(k.startswith("frontend_") for k in arrays), sorted(arrays)
    assert set(manifest) == set(arrays), sorted(set(manifest) ^ set(arrays))
    for key, entry in manifest.items():
        assert entry["shape"] == list(arrays[key].shape) and entry["dtype"] == str(arrays[key].dtype), key
        assert entry["desc"].strip(), key
    for key in ("seed", "versions", "checks"):
        assert key in meta, f"meta.json lacks {key}"
    assert any(n.endswith(".onnx") for n in os.listdir(os.path.join(case_dir, "model"))), "no models in the case"


def test_tiny_b_is_committed_with_other_dims(tiny_a):
    """tiny-b exists and differs from tiny-a in the sizes it is meant to exercise."""
    b_dir = os.path.join(DATA, "tiny-b")
    assert b_dir in CASES, "tests/data/tiny-b is missing"
    a_cfg, b_cfg = load_model_config(tiny_a.model_dir), load_model_config(os.path.join(b_dir, "model"))
    for stage, field in (("llm", "hidden_size"), ("llm", "num_layers"), ("llm", "num_heads"), ("llm", "head_dim"),
                         ("llm", "intermediate_size"), ("llm", "vocab_size"), ("llm", "speech_token_size"),
                         ("flow", "dim"), ("flow", "heads"), ("flow", "pre_lookahead_channels"),
                         ("flow", "static_chunk_size"), ("hift", "base_channels")):
        assert getattr(getattr(a_cfg, stage), field) != getattr(getattr(b_cfg, stage), field), f"{stage}.{field}"
    b = b_cfg.llm
    assert b.num_heads // b.num_kv_heads != a_cfg.llm.num_heads // a_cfg.llm.num_kv_heads  # GQA ratio


# ---------------------------------------------------------------------------------------------
# make_case pieces that need no upstream checkout
# ---------------------------------------------------------------------------------------------
def test_committed_yaml_is_rendered_from_its_config():
    """Each committed case with a tests/data/configs/<name>.yaml was made from that config."""
    from cosyjax.parity.make_case import load_case_config, render_yaml

    checked = 0
    for case_dir in CASES:
        meta = load_case(case_dir).meta
        path = os.path.join(CONFIGS, f"{meta.get('config_name')}.yaml")
        if not os.path.isfile(path) or "stand_ins" not in meta:  # made by another generator (tiny-a)
            continue
        cfg = load_case_config(path)
        with open(os.path.join(case_dir, "model", "cosyvoice3.yaml"), encoding="utf-8") as f:
            assert f.read() == render_yaml(cfg, meta["seed"]), case_dir
        model = load_model_config(os.path.join(case_dir, "model"))
        assert model.llm.hidden_size == cfg["qwen"]["hidden_size"]
        assert model.flow.dim == cfg["dit"]["dim"] and model.hift.base_channels == cfg["hift_base_channels"]
        assert model.flow.static_chunk_size == 2 * cfg["chunk_size"]
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("name", sorted(f[:-5] for f in os.listdir(CONFIGS) if f.endswith(".yaml")))
def test_configs_parse_and_render(name, tmp_path):
    """Every committed CONFIG.yaml validates, and its rendered yaml reads back with the same sizes."""
    from cosyjax.config import read_yaml
    from cosyjax.parity.make_case import load_case_config, render_yaml

    cfg = load_case_config(os.path.join(CONFIGS, f"{name}.yaml"))
    path = tmp_path / "cosyvoice3.yaml"
    path.write_text(render_yaml(cfg, 0), encoding="utf-8")
    tree = read_yaml(str(path))
    assert tree["llm"].value["speech_token_size"] == cfg["speech_token_size"]
    est = tree["flow"].value["decoder"].value["estimator"].value
    assert (est["dim"], est["depth"], est["heads"], est["dim_head"]) == tuple(
        cfg["dit"][k] for k in ("dim", "depth", "heads", "dim_head"))
    assert est["static_chunk_size"] == 2 * cfg["chunk_size"]
    assert tree["hift"].value["base_channels"] == cfg["hift_base_channels"]


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


_GOOD = """
qwen: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1,
       intermediate_size: 48, vocab_size: 128}
speech_token_size: 24
chunk_size: 3
pre_lookahead_channels: 16
dit: {dim: 32, depth: 1, heads: 2, dim_head: 16}
hift_base_channels: 16
case: {prompt_text_len: 3, text_len: 4, prompt_speech_len: 4, speech_len: 8}
"""


def test_config_defaults(tmp_path):
    from cosyjax.parity.make_case import load_case_config

    cfg = load_case_config(_write(tmp_path, _GOOD))
    assert cfg["name"] == "c" and cfg["spk_embed_dim"] == 192 and cfg["pre_lookahead_len"] == 3
    assert cfg["hift_f0_cond_channels"] == 16 and cfg["case"]["hift_mel_len"] == 16
    assert cfg["dit"]["ff_mult"] == 2 and cfg["qwen"]["tie_word_embeddings"] is True


@pytest.mark.parametrize("edit, message", [
    (("dim: 32, depth", "dim: 40, depth"), "multiple of 16"),
    (("hift_base_channels: 16", "hift_base_channels: 20"), "multiple of 8"),
    (("num_key_value_heads: 1", "num_key_value_heads: 3"), "num_key_value_heads"),
    (("speech_len: 8", "speech_len: 3"), "pre_lookahead_len"),
    (("speech_len: 8", "speech_len: 80"), "max_len"),
    (("chunk_size: 3", "chunk_size: 0"), "chunk_size"),
    (("chunk_size: 3", "chunk_size: 3\nbogus: 1"), "unknown key"),
    (("vocab_size: 128}", "}"), "qwen.vocab_size: required"),
    (("speech_len: 8}", "speech_len: 8, hift_mel_len: 40}"), "hift_mel_len"),
])
def test_config_errors(tmp_path, edit, message):
    from cosyjax.parity.make_case import MakeCaseError, load_case_config

    text = _GOOD.replace(*edit)
    assert text != _GOOD
    with pytest.raises(MakeCaseError, match=message):
        load_case_config(_write(tmp_path, text))


def test_make_case_refuses_bad_arguments_before_work(tmp_path):
    """Existing out dir, bad seed and a missing config fail at once, without an upstream checkout."""
    from cosyjax.parity.make_case import MakeCaseError, make_case

    config = _write(tmp_path, _GOOD)
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(MakeCaseError, match="already exists"):
        make_case(str(tmp_path / "no-such-repo"), config, 0, str(out), progress=False)
    with pytest.raises(MakeCaseError, match="seed"):
        make_case(str(tmp_path / "no-such-repo"), config, -1, str(tmp_path / "new"), progress=False)
    with pytest.raises(FileNotFoundError):
        make_case(str(tmp_path / "no-such-repo"), str(tmp_path / "none.yaml"), 0, str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------
# end to end, against an upstream checkout
# ---------------------------------------------------------------------------------------------
REFERENCE_REPO = os.environ.get("COSYJAX_REFERENCE_REPO")


@pytest.mark.upstream
@pytest.mark.skipif(not REFERENCE_REPO, reason="set COSYJAX_REFERENCE_REPO to an upstream CosyVoice source "
                                               "checkout to run make_case end to end")
def test_make_case_end_to_end(tmp_path, tiny_a):
    from cosyjax.parity.make_case import MakeCaseError, make_case

    out = tmp_path / "micro"
    config = os.path.join(CONFIGS, "micro.yaml")
    path = make_case(REFERENCE_REPO, config, 3, str(out), progress=False)
    assert path == str(out)
    check_case_structure(path, tiny_a)
    case = load_case(path)
    cfg = load_model_config(case.model_dir)
    assert cfg.llm.hidden_size == 32 and cfg.flow.dim == 32 and cfg.hift.base_channels == 16
    assert case.meta["seed"] == 3 and case.meta["config_name"] == "micro"
    assert {os.path.basename(p) for p in os.listdir(case.model_dir)} >= {
        "cosyvoice3.yaml", "llm.pt", "flow.pt", "hift.pt", "CosyVoice-BlankEN"}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "temporary directory left behind"
    with pytest.raises(MakeCaseError, match="already exists"):
        make_case(REFERENCE_REPO, config, 3, str(out), progress=False)
