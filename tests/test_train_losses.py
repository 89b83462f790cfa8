"""Training losses (cosyjax.train.losses): parity with upstream's training forward, layouts, invariances.

The parity tests replay the committed case tests/data/tiny-train (made by our make-case from upstream:
padded batches, every random draw upstream made, its loss and torch's autograd gradients).  The
layout tests check ``prepare_llm_batch`` against small layouts written by hand from upstream's rules
(``Qwen2LM.prepare_lm_input_target``).  The ``upstream`` test regenerates a train case live.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA
from cosyjax.config import FlowConfig, LLMConfig
from cosyjax.train.losses import (IGNORE_ID, FlowLossDraws, bistream_eligible, flow_loss, llm_loss,
                                  prepare_llm_batch, sample_flow_draws)

CASE = os.path.join(DATA, "tiny-train")
TRAIN_GROUPS = ("train_llm", "train_llm_lsm", "train_flow", "train_flow_stream")


@pytest.fixture(scope="module")
def case():
    from cosyjax.parity.case import load_case

    return load_case(CASE)


@pytest.fixture(scope="module")
def model(case):
    from cosyjax.convert import convert_model

    return convert_model(case.model_dir, progress=False)


# ---------------------------------------------------------------------------------------------
# parity against the committed case
# ---------------------------------------------------------------------------------------------
def test_train_stage_is_registered(case):
    """``cosyjax parity check --stages train`` selects the four groups, each with a runner.

    (tests/test_check.py runs the full check, every group, on every committed case, tiny-train included.)
    """
    from cosyjax.parity.check import select_groups
    from cosyjax.parity.stages import STAGES, runners, stage_of

    assert "train" in STAGES and all(stage_of(g) == "train" for g in TRAIN_GROUPS)
    assert select_groups(case, ["train"]) == list(TRAIN_GROUPS)
    assert set(TRAIN_GROUPS) <= set(runners())


@pytest.mark.parametrize("group", TRAIN_GROUPS)
def test_train_group_runner_meets_issue_bounds(case, model, group):
    """Loss within 1e-5 relative and every parameter's gradient within 1e-4 (the acceptance bounds)."""
    from cosyjax.parity.stages.train import RUNNERS

    result = RUNNERS[group](case, group, model)
    by_key = {c.key: c for c in result.comparisons}
    assert all(c.passed for c in result.comparisons), [c for c in result.comparisons if not c.passed]
    assert by_key[f"{group}/loss"].rel <= 1e-5
    grads = [c for k, c in by_key.items() if "/grad/" in k]
    params = model.params["llm" if "llm" in group else "flow"]
    assert len(grads) == len(jax.tree.leaves(params))  # every parameter compared
    assert max(c.rel for c in grads) <= 1e-4


def test_case_covers_the_branches(case):
    """The committed case exercises what the issue asks for: padding, both layouts, prompt on/off,
    instruct tokens, CFG dropout on one row, both streaming values."""
    a = case.arrays
    assert len(set(a["train_llm/text_token_len"].tolist())) > 1 and len(set(a["train_flow/speech_token_len"])) > 1
    assert set(a["train_llm/bistream"].tolist()) == {0, 1}
    assert (a["train_llm/instruct_token_len"] > 0).any()
    assert bool(a["train_llm_lsm/lsm_weight"] > 0) and not bool(a["train_llm_lsm/length_normalized"])
    for g in ("train_flow", "train_flow_stream"):
        assert (a[f"{g}/prompt_len"] > 0).any() and (a[f"{g}/prompt_len"] == 0).any()
        assert set(a[f"{g}/cfg_keep"].tolist()) == {0, 1}
    assert not bool(a["train_flow/streaming"]) and bool(a["train_flow_stream/streaming"])


# ---------------------------------------------------------------------------------------------
# prepare_llm_batch layouts, written by hand from upstream's rules
# ---------------------------------------------------------------------------------------------
CFG = dataclasses.replace(LLMConfig.tiny(), mix_ratio=(2, 3))  # sos 64, eos 65, task_id 66, fill 67
SOS, EOS, TASK, FILL = 64, 65, 66, 67
I = IGNORE_ID


def _row(batch, b=0):
    n = int(batch["lengths"][b])
    return (batch["ids"][b, :n].tolist(), batch["is_speech"][b, :n].tolist(), batch["targets"][b, :n].tolist())


def test_unistream_layout_with_instruct():
    text, speech, instruct = [10, 11], [1, 2, 3], [20, 21]
    ids, is_speech, targets = _row(prepare_llm_batch(CFG, [text], [speech], [instruct], bistream=[False]))
    assert ids == [SOS, 20, 21, 10, 11, TASK, 1, 2, 3]
    assert is_speech == [True, False, False, False, False, True, True, True, True]
    assert targets == [I, I, I, I, I, 1, 2, 3, EOS]


def test_bistream_layout_with_partial_last_chunk():
    # mix_ratio (2, 3): text chunks of 2 each followed by 3 speech tokens, then the partial chunk.
    text, speech = [10, 11, 12, 13, 14], [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # 10 * 2 > 5 * 3: eligible
    ids, is_speech, targets = _row(prepare_llm_batch(CFG, [text], [speech], [[30]], bistream=[True]))
    assert ids == [SOS, 30, 10, 11, 1, 2, 3, 12, 13, 4, 5, 6, 14, TASK, 7, 8, 9, 0]
    assert is_speech == [True, False, False, False, True, True, True, False, False, True, True, True, False, True,
                         True, True, True, True]
    assert targets == [I, I, I, 1, 2, 3, FILL, I, 4, 5, 6, FILL, I, 7, 8, 9, 0, EOS]


def test_bistream_layout_with_empty_last_chunk():
    # len(text) a multiple of mix_ratio[0]: ceil((L + 1) / m0) chunks, the last one empty.
    text, speech = [10, 11, 12, 13], [1, 2, 3, 4, 5, 6, 7, 8]
    ids, _, targets = _row(prepare_llm_batch(CFG, [text], [speech], bistream=[True]))
    assert ids == [SOS, 10, 11, 1, 2, 3, 12, 13, 4, 5, 6, TASK, 7, 8]
    assert targets == [I, I, 1, 2, 3, FILL, I, 4, 5, 6, FILL, 7, 8, EOS]


def test_bistream_with_short_text_is_the_unistream_layout():
    text, speech = [10], [1, 2, 3, 4]
    bi = prepare_llm_batch(CFG, [text], [speech], bistream=[True])
    uni = prepare_llm_batch(CFG, [text], [speech], bistream=[False])
    for k in bi:
        np.testing.assert_array_equal(bi[k], uni[k])


def test_padding_and_dtypes():
    batch = prepare_llm_batch(CFG, [[10], [10, 11, 12]], [[1, 2], [3]], pad_to=12)
    assert batch["ids"].dtype == np.int32 and batch["targets"].dtype == np.int32
    assert batch["is_speech"].dtype == bool and batch["lengths"].tolist() == [5, 6]
    assert batch["ids"].shape == (2, 12)
    assert (batch["targets"][0, 5:] == IGNORE_ID).all() and (batch["ids"][0, 5:] == 0).all()
    assert not batch["is_speech"][0, 5:].any()


def test_bistream_draws_follow_upstream_rule():
    """One rng.random() per row (eligible or not); bistream iff < 0.5 and speech/text > m1/m0."""
    text = [[10, 11]] * 6 + [[10, 11, 12]] * 6
    speech = [list(range(7))] * 6 + [list(range(9))] * 6  # 7/2 > 3/2 eligible; 9/3 = 3 > 1.5 eligible
    speech[3] = [1, 2, 3]  # 3/2 = 1.5: not eligible
    draws = np.random.default_rng(7).random(len(text))
    batch = prepare_llm_batch(CFG, text, speech, rng=np.random.default_rng(7))
    for b in range(len(text)):
        expect = draws[b] < 0.5 and bistream_eligible(CFG, len(text[b]), len(speech[b]))
        layout = prepare_llm_batch(CFG, [text[b]], [speech[b]], bistream=[bool(expect)])
        assert _row(batch, b) == _row(layout), b
    assert not bistream_eligible(CFG, 2, 3) and bistream_eligible(CFG, 2, 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(text_tokens=[], speech_tokens=[]), "empty batch"),
    (dict(text_tokens=[[1]], speech_tokens=[[1], [2]]), "speech_tokens: 2 rows"),
    (dict(text_tokens=[[1]], speech_tokens=[[1]], instruct_tokens=[[1], [1]]), "instruct_tokens: 2 rows"),
    (dict(text_tokens=[[]], speech_tokens=[[1]]), r"text_tokens\[0\]: empty row"),
    (dict(text_tokens=[[1]], speech_tokens=[[]]), r"speech_tokens\[0\]: empty row"),
    (dict(text_tokens=[[512]], speech_tokens=[[1]]), r"text_tokens\[0\]: id 512 .* outside \[0, 512\)"),
    (dict(text_tokens=[[1]], speech_tokens=[[64]]), r"speech_tokens\[0\]: id 64"),
    (dict(text_tokens=[[1]], speech_tokens=[[-1]]), r"speech_tokens\[0\]: id -1"),
    (dict(text_tokens=[[1]], speech_tokens=[[1]], instruct_tokens=[[600]]), r"instruct_tokens\[0\]: id 600"),
    (dict(text_tokens=[[1, 2]], speech_tokens=[[1, 2, 3]], bistream=[True]), r"bistream\[0\]: .* upstream lays out"),
    (dict(text_tokens=[[1]], speech_tokens=[[1]], bistream=[True, False]), "bistream: 2 flags"),
    (dict(text_tokens=[[1]], speech_tokens=[[1, 2]], pad_to=3), "pad_to=3"),
    (dict(text_tokens=[[[1]]], speech_tokens=[[1]]), "1-D"),
    (dict(text_tokens=[[1.5]], speech_tokens=[[1]]), "integer"),
])
def test_prepare_llm_batch_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepare_llm_batch(CFG, **kwargs)


# ---------------------------------------------------------------------------------------------
# llm_loss
# ---------------------------------------------------------------------------------------------
def _llm_rows(model, rng):
    cfg = model.config.llm
    text = [rng.integers(0, cfg.vocab_size, n) for n in (4, 7, 5)]
    speech = [rng.integers(0, cfg.speech_token_size, n) for n in (16, 9, 17)]
    instruct = [rng.integers(0, cfg.vocab_size, n) for n in (2, 0, 0)]
    return text, speech, instruct, [True, False, True]


def test_llm_loss_is_batch_invariant(model):
    """Sum-normalised loss of a padded batch = sum of its rows run alone (with more padding too)."""
    cfg, params = model.config.llm, model.params["llm"]
    text, speech, instruct, flags = _llm_rows(model, np.random.default_rng(0))
    loss = jax.jit(lambda p, b: llm_loss(p, b, cfg=cfg, length_normalized=False)[0])
    batch = prepare_llm_batch(cfg, text, speech, instruct, bistream=flags, pad_to=48)
    alone = [float(loss(params, prepare_llm_batch(cfg, [t], [s], [i], bistream=[f])))
             for t, s, i, f in zip(text, speech, instruct, flags)]
    np.testing.assert_allclose(float(loss(params, batch)) * len(text), sum(alone), rtol=1e-6)


def test_llm_loss_normalisation_and_aux(model):
    cfg, params = model.config.llm, model.params["llm"]
    text, speech, instruct, flags = _llm_rows(model, np.random.default_rng(1))
    batch = prepare_llm_batch(cfg, text, speech, instruct, bistream=flags)
    by_tokens, aux = llm_loss(params, batch, cfg=cfg)
    by_batch, _ = llm_loss(params, batch, cfg=cfg, length_normalized=False)
    num = int((batch["targets"] != IGNORE_ID).sum())
    assert int(aux["num_tokens"]) == num
    np.testing.assert_allclose(float(by_tokens) * num, float(by_batch) * len(text), rtol=1e-6)
    assert 0.0 <= float(aux["acc"]) <= 1.0
    smoothed, _ = llm_loss(params, batch, cfg=cfg, lsm_weight=0.1)
    assert float(smoothed) != float(by_tokens)


@pytest.mark.parametrize("edit, message", [
    (lambda b: b.pop("targets"), "missing key"),
    (lambda b: b.__setitem__("targets", b["targets"][:, :-1]), "targets has shape"),
    (lambda b: b.__setitem__("lengths", b["lengths"] + 100), "lengths"),
    (lambda b: b["targets"].__setitem__((0, 3), 10_000), "targets"),
    (lambda b: b["ids"].__setitem__((0, 0), 10_000), "ids"),
])
def test_llm_loss_bad_batches(model, edit, message):
    cfg = model.config.llm
    batch = prepare_llm_batch(cfg, [[1, 2]], [[3, 4, 5]])
    edit(batch)
    with pytest.raises(ValueError, match=message):
        llm_loss(model.params["llm"], batch, cfg=cfg)
    with pytest.raises(ValueError, match="lsm_weight"):
        llm_loss(model.params["llm"], prepare_llm_batch(cfg, [[1]], [[1]]), cfg=cfg, lsm_weight=1.0)


# ---------------------------------------------------------------------------------------------
# flow_loss and sample_flow_draws
# ---------------------------------------------------------------------------------------------
def _flow_batch(cfg: FlowConfig, token_len, n=None, seed=0):
    rng = np.random.default_rng(seed)
    n = n or max(token_len)
    b = len(token_len)
    frames = cfg.token_mel_ratio * n
    feat_len = np.asarray(token_len) * cfg.token_mel_ratio
    feat = rng.normal(size=(b, frames, cfg.output_size)).astype(np.float32)
    feat *= (np.arange(frames)[None, :] < feat_len[:, None])[..., None]
    return {"speech_token": rng.integers(0, cfg.vocab_size, (b, n)).astype(np.int32),
            "speech_token_len": np.asarray(token_len, np.int32), "speech_feat": feat,
            "speech_feat_len": feat_len.astype(np.int32),
            "embedding": rng.normal(size=(b, cfg.spk_embed_dim)).astype(np.float32)}


def _take(batch, rows, n):
    """Rows of a flow batch, re-padded to n tokens (and token_mel_ratio * n frames)."""
    ratio = batch["speech_feat"].shape[1] // batch["speech_token"].shape[1]
    out = {}
    for k, v in batch.items():
        v = v[rows]
        if k == "speech_token":
            v = np.pad(v[:, :n], ((0, 0), (0, max(0, n - v.shape[1]))))
        elif k == "speech_feat":
            frames = ratio * n
            v = np.pad(v[:, :frames], ((0, 0), (0, max(0, frames - v.shape[1])), (0, 0)))
        out[k] = v
    return out


def _take_draws(draws, rows, frames):
    z = np.asarray(draws.z)[rows][:, :frames]
    z = np.pad(z, ((0, 0), (0, frames - z.shape[1]), (0, 0)))
    return FlowLossDraws(streaming=draws.streaming, prompt_len=np.asarray(draws.prompt_len)[rows],
                         t=np.asarray(draws.t)[rows], z=z, cfg_keep=np.asarray(draws.cfg_keep)[rows])


_JITTED: dict = {}


def _loss_fn(cfg: FlowConfig, deterministic: bool = True):
    """One jitted flow_loss per (config, deterministic), with traced draws (a traced streaming flag too)."""
    key = (cfg, deterministic)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda p, b, k, d: flow_loss(p, b, k, cfg=cfg, draws=d, deterministic=deterministic))
    return _JITTED[key]


def _sampler(cfg: FlowConfig):
    if cfg not in _JITTED:
        _JITTED[cfg] = jax.jit(lambda k, b: sample_flow_draws(k, b, cfg=cfg))
    return _JITTED[cfg]


def test_flow_loss_is_batch_invariant(model):
    """Frame-weighted: the padded batch's loss = the rows run alone (padded too), each with its own draws."""
    cfg, params = model.config.flow, model.params["flow"]
    batch = _flow_batch(cfg, [7, 4, 6], n=9)
    loss_fn = _loss_fn(cfg)
    key = jax.random.key(3)
    draws = _sampler(cfg)(key, batch).replace(prompt_len=np.asarray([3, 0, 2], np.int32),
                                              cfg_keep=np.asarray([True, True, False]))
    for streaming in (False, True):
        d = draws.replace(streaming=np.bool_(streaming))
        loss, aux = loss_fn(params, batch, key, d)
        parts = 0.0
        for r in range(3):
            alone, aux_r = loss_fn(params, _take(batch, [r], 9), key, _take_draws(d, [r], 18))
            parts += float(alone) * int(aux_r["num_frames"])
        np.testing.assert_allclose(float(loss) * int(aux["num_frames"]), parts, rtol=2e-6)


def test_flow_draws_are_per_example(model):
    """A row's draws depend on its example index, not on the batch size, padding or other rows."""
    cfg = model.config.flow
    batch = _flow_batch(cfg, [7, 4, 6], n=9)
    key = jax.random.key(11)
    sample = _sampler(cfg)
    full = sample(key, batch)
    sub = _take(batch, [1], 5)
    sub["example_index"] = np.asarray([1], np.int32)
    alone = sample(key, sub)
    assert bool(alone.streaming) == bool(full.streaming)
    for name in ("prompt_len", "t", "cfg_keep"):
        np.testing.assert_array_equal(np.asarray(getattr(alone, name))[0], np.asarray(getattr(full, name))[1])
    np.testing.assert_array_equal(np.asarray(alone.z)[0], np.asarray(full.z)[1, :10])
    # without example_index a lone row is example 0: row 0 of the full batch
    first = sample(key, _take(batch, [0], 7))
    np.testing.assert_array_equal(np.asarray(first.z)[0], np.asarray(full.z)[0, :14])
    # flow_loss with draws=None draws exactly these
    loss_a, _ = jax.jit(lambda p, b, k: flow_loss(p, b, k, cfg=cfg))(model.params["flow"], batch, key)
    loss_b, _ = _loss_fn(cfg)(model.params["flow"], batch, key, full)
    assert float(loss_a) == float(loss_b)


def test_flow_draw_distributions(model):
    """Upstream's distributions: prompt with p 0.5, k in 0..3*len//10, t in [0, 1), keep with p 0.8."""
    cfg = model.config.flow
    rows = 400
    batch = _flow_batch(cfg, list(np.random.default_rng(0).integers(1, 8, rows)), n=8)
    draws = _sampler(cfg)(jax.random.key(5), batch)
    prompt, t, keep = np.asarray(draws.prompt_len), np.asarray(draws.t), np.asarray(draws.cfg_keep)
    assert (prompt <= 3 * batch["speech_feat_len"] // 10).all() and (prompt >= 0).all()
    eligible = 3 * batch["speech_feat_len"] // 10 >= 2
    assert 0.3 < (prompt[eligible] > 0).mean() < 0.55  # P(on) * P(k > 0 | on)
    assert (t >= 0).all() and (t < 1).all() and 0.4 < t.mean() < 0.6
    assert abs(keep.mean() - (1 - cfg.training_cfg_rate)) < 0.07
    z = np.asarray(draws.z)
    assert z.shape == (rows, 16, cfg.output_size) and abs(z.std() - 1) < 0.02
    small = _flow_batch(cfg, [3])
    flags = [bool(_sampler(cfg)(jax.random.key(i), small).streaming) for i in range(40)]
    assert 8 < sum(flags) < 32


def test_flow_loss_traced_streaming_matches_concrete(model):
    """Under jit with traced draws the streaming flag goes through lax.cond; it equals the path a
    concrete flag takes (the one the parity runner uses), and the chunk mask matters."""
    cfg, params = model.config.flow, model.params["flow"]
    batch = _take(_flow_batch(cfg, [7, 4, 6], n=9), [0], 9)
    key = jax.random.key(1)
    draws = _sampler(cfg)(key, batch)
    chunked_draws = draws.replace(streaming=np.bool_(True))
    concrete = jax.jit(lambda p, b: flow_loss(p, b, None, cfg=cfg, draws=jax.tree.map(np.asarray, chunked_draws)))
    chunked = float(_loss_fn(cfg)(params, batch, key, chunked_draws)[0])
    np.testing.assert_allclose(chunked, float(concrete(params, batch)[0]), rtol=1e-6)
    full = float(_loss_fn(cfg)(params, batch, key, draws.replace(streaming=np.bool_(False)))[0])
    assert full != chunked  # 14 valid frames, static_chunk_size 4


def test_flow_dropout(model):
    """deterministic=False applies the config's DiT dropout from the rng; rate 0 is the eval loss."""
    cfg, params = model.config.flow, model.params["flow"]
    assert cfg.dropout > 0
    batch = _take(_flow_batch(cfg, [7, 4, 6], n=9), [0], 9)
    key = jax.random.key(2)
    draws = _sampler(cfg)(key, batch)
    eval_loss = float(_loss_fn(cfg)(params, batch, key, draws)[0])
    train = _loss_fn(cfg, deterministic=False)
    train_a = float(train(params, batch, key, draws)[0])
    assert train_a != eval_loss
    assert float(train(params, batch, key, draws)[0]) == train_a  # same rng, same masks
    assert float(train(params, batch, jax.random.key(9), draws)[0]) != train_a
    no_dropout = dataclasses.replace(cfg, dropout=0.0)
    np.testing.assert_allclose(float(_loss_fn(no_dropout, False)(params, batch, key, draws)[0]), eval_loss, rtol=1e-7)


@pytest.mark.parametrize("edit, message", [
    (lambda b: b.pop("embedding"), "missing key"),
    (lambda b: b.__setitem__("speech_feat", b["speech_feat"][:, :-1]), "speech_feat has shape"),
    (lambda b: b.__setitem__("embedding", b["embedding"][:, :-1]), "embedding has shape"),
    (lambda b: b.__setitem__("speech_token_len", b["speech_token_len"][:1]), "speech_token_len has shape"),
    (lambda b: b.__setitem__("speech_token_len", b["speech_token_len"] * 0), "speech_token_len"),
    (lambda b: b.__setitem__("speech_feat_len", b["speech_feat_len"] + 100), "speech_feat_len"),
    (lambda b: b["speech_token"].__setitem__((0, 0), 10_000), "outside the speech vocabulary"),
    (lambda b: b["speech_feat"].__setitem__((0, 0, 0), np.nan), "NaN"),
])
def test_flow_loss_bad_batches(model, edit, message):
    cfg = model.config.flow
    batch = _flow_batch(cfg, [5, 3])
    edit(batch)
    with pytest.raises(ValueError, match=message):
        flow_loss(model.params["flow"], batch, jax.random.key(0), cfg=cfg)


def test_flow_loss_bad_draws(model):
    cfg = model.config.flow
    batch = _flow_batch(cfg, [5, 3])
    draws = sample_flow_draws(jax.random.key(0), batch, cfg=cfg)
    with pytest.raises(ValueError, match="draws"):
        flow_loss(model.params["flow"], batch, None, cfg=cfg, draws=draws.replace(z=jnp.zeros((2, 4, 80))))


# ---------------------------------------------------------------------------------------------
# live: a train case regenerated from upstream
# ---------------------------------------------------------------------------------------------
REFERENCE_REPO = os.environ.get("COSYJAX_REFERENCE_REPO")


@pytest.mark.upstream
@pytest.mark.skipif(not REFERENCE_REPO, reason="set COSYJAX_REFERENCE_REPO to an upstream CosyVoice source checkout")
def test_train_case_from_upstream_passes(tmp_path):
    """make-case with ``train: true`` on the micro config (another seed and sizes), then check it."""
    from cosyjax.parity.check import run_check
    from cosyjax.parity.make_case import make_case

    with open(os.path.join(DATA, "configs", "micro.yaml"), encoding="utf-8") as f:
        text = f.read()
    config = tmp_path / "micro-train.yaml"
    config.write_text(text.replace("name: micro", "name: micro-train") + "train: true\n", encoding="utf-8")
    out = make_case(REFERENCE_REPO, str(config), 7, str(tmp_path / "case"), progress=False)
    report = run_check(out, str(tmp_path / "report"), stages=["train"], progress=False)
    groups = {g["group"]: g["status"] for g in report["groups"]}
    assert groups == {g: "pass" for g in TRAIN_GROUPS}, report["groups"]


def test_opt_in_cosine_t_and_l1_loss(model):
    """Research options: t = 1 - cos(pi/2 u) from the same u as the uniform draw (nothing else changes), and
    the L1 loss is sum |residual| / (frames * C) over the residual whose MSE is upstream's loss."""
    from cosyjax.train.losses import flow_residual

    cfg, params = model.config.flow, model.params["flow"]
    batch = _flow_batch(cfg, [7, 4, 6], n=9)
    key = jax.random.key(5)
    uniform = sample_flow_draws(key, batch, cfg=cfg)
    cosine = sample_flow_draws(key, batch, cfg=cfg, t_schedule="cosine")
    np.testing.assert_allclose(np.asarray(cosine.t), 1 - np.cos(np.asarray(uniform.t, np.float64) * np.pi / 2),
                               rtol=1e-6, atol=1e-7)
    for name in ("prompt_len", "cfg_keep", "z", "streaming"):
        np.testing.assert_array_equal(np.asarray(getattr(cosine, name)), np.asarray(getattr(uniform, name)))
    residual, frames = flow_residual(params, batch, None, cfg=cfg, draws=uniform)
    residual = np.asarray(residual, np.float64)
    assert int(frames) == cfg.token_mel_ratio * (7 + 4 + 6)
    denom = int(frames) * cfg.output_size
    mse, _ = flow_loss(params, batch, None, cfg=cfg, draws=uniform)
    l1, _ = flow_loss(params, batch, None, cfg=cfg, draws=uniform, loss_type="l1")
    np.testing.assert_allclose(float(mse), np.sum(residual ** 2) / denom, rtol=1e-5)
    np.testing.assert_allclose(float(l1), np.sum(np.abs(residual)) / denom, rtol=1e-5)
    # flow_loss's own draws follow t_schedule
    own, _ = flow_loss(params, batch, key, cfg=cfg, t_schedule="cosine")
    assert float(own) == float(flow_loss(params, batch, None, cfg=cfg, draws=cosine)[0])
    with pytest.raises(ValueError, match="t_schedule='linear'"):
        sample_flow_draws(key, batch, cfg=cfg, t_schedule="linear")
    with pytest.raises(ValueError, match="loss_type='huber'"):
        flow_loss(params, batch, key, cfg=cfg, loss_type="huber")
