"""Flow stage: parity with the reference cases, the pieces that must be bit-exact, batching, bad inputs."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from cosyjax.checkpoint import ConvertedModel
from cosyjax.config import load_model_config
from cosyjax.convert.common import ConversionError, apply_table, load_state_dict, shape_only_state_dict
from cosyjax.convert.flow import INV_FREQ_KEY, convert, param_table, rand_noise
from cosyjax.flow import flow as flow_mod
from cosyjax.flow.dit import apply_interleaved_rotary, attention_mask, rotary_inv_freq
from cosyjax.flow.flow import flow_inference, output_lengths, param_shapes, token_bucket
from cosyjax.flow.solver import cosine_t_schedule
from cosyjax.parity.case import load_case
from cosyjax.parity.compare import format_comparison
from cosyjax.parity.stages.flow import RUNNERS

from conftest import cases_with_group

GROUPS = ("flow", "flow_stream", "flow_stream_partial")
PARITY_CASES = [(d, g) for g in GROUPS for d in cases_with_group(g)]


@pytest.fixture(scope="module")
def noise_full():
    return rand_noise(load_model_config(cases_with_group("flow")[0] + "/model").flow)


_CONVERTED: dict[str, tuple] = {}


def _converted(case_dir: str):
    """(case, cfg, params) for a case, converted once per test session."""
    if case_dir not in _CONVERTED:
        case = load_case(case_dir)
        cfg = load_model_config(case.model_dir)
        params = convert(load_state_dict(os.path.join(case.model_dir, "flow.pt")), cfg.flow, "flow.pt")
        _CONVERTED[case_dir] = (case, cfg, params)
    return _CONVERTED[case_dir]


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("case_dir,group", PARITY_CASES,
                         ids=[f"{os.path.basename(d)}-{g}" for d, g in PARITY_CASES])
def test_parity(case_dir, group, noise_full):
    case, cfg, params = _converted(case_dir)
    model = ConvertedModel(config=cfg, params={"flow": params}, buffers={"flow_rand_noise": noise_full})
    result = RUNNERS[group](case, group, model)
    names = {c.key.split("/", 1)[1] for c in result.comparisons}
    assert {"spk_proj", "h", "mu", "cond", "noise_z", "est_t", "est_out", "est_x", "mel"} <= names
    failed = [format_comparison(c) for c in result.comparisons if not c.passed]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("case_dir", cases_with_group("flow"), ids=os.path.basename)
def test_flow_inference_matches_reference_mel(case_dir, noise_full):
    """The public entry point, fed the converter's noise, reproduces each group's reference mel."""
    case, cfg, params = _converted(case_dir)
    inputs = case.group("flow")
    for group in GROUPS:
        ref = case.group(group)
        if "mel" not in ref:
            continue
        mel = flow_inference(params, inputs["token"], inputs["prompt_token"], inputs["prompt_feat"],
                             inputs["embedding"], cfg=cfg.flow, noise=noise_full,
                             streaming=bool(ref["streaming"]), finalize=bool(ref["finalize"]))
        ours = np.transpose(np.asarray(mel), (0, 2, 1))
        assert ours.shape == ref["mel"].shape, group
        np.testing.assert_allclose(ours, ref["mel"], atol=1e-4, rtol=0, err_msg=group)


# ---------------------------------------------------------------- bit-exact pieces
def test_rand_noise_matches_global_seed_and_cases(noise_full):
    state = torch.get_rng_state()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    noise = rand_noise(load_model_config(cases_with_group("flow")[0] + "/model").flow)
    assert torch.equal(torch.rand(3), expected_next), "rand_noise disturbed the global torch RNG"
    torch.manual_seed(0)
    reference = torch.randn([1, 80, 15000]).numpy()
    torch.set_rng_state(state)
    np.testing.assert_array_equal(noise, reference)
    np.testing.assert_array_equal(noise_full, reference)
    for group in GROUPS:
        for case_dir in cases_with_group(group):
            z = load_case(case_dir).arrays[f"{group}/noise_z"]
            np.testing.assert_array_equal(noise[:, :, :z.shape[2]], z)


def test_t_schedule_matches_torch():
    """Upstream's float32 t accumulation (t += dt; dt = t_span[k+1] - t), replayed bit for bit."""
    n = 10
    t_span = 1 - torch.cos(torch.linspace(0, 1, n + 1) * 0.5 * torch.pi)
    t, dt = t_span[0], t_span[1] - t_span[0]
    want_t, want_dt = [], []
    for step in range(1, n + 1):
        want_t.append(t.item())
        want_dt.append(dt.item())
        t = t + dt
        if step < n:
            dt = t_span[step + 1] - t
    ts, dts = cosine_t_schedule(n)
    np.testing.assert_array_equal(ts, np.asarray(want_t, np.float32))
    np.testing.assert_array_equal(dts, np.asarray(want_dt, np.float32))


F32_EPS = 2.0 ** -24  # float32 unit roundoff


def _float64_inv_freq(dim: int) -> np.ndarray:
    """1 / 10000^(e) in float64, e = float32(i) / float32(dim) as upstream forms it, per element
    with Python's scalar ``**`` (not numpy's vector pow)."""
    exponents = [float(np.float32(i) / np.float32(dim)) for i in range(0, dim, 2)]
    return np.array([1.0 / 10000.0 ** e for e in exponents])


@pytest.mark.parametrize("dim", [8, 16, 32, 48, 64, 128])
def test_rotary_inv_freq_ours_and_torch_within_float32_error_of_the_formula(dim):
    """Ours (numpy float32) and x-transformers' (torch float32) against the float64 formula.

    Their bits depend on the machine's float32 ``pow`` (they differ by an ulp on Intel Sapphire
    Rapids, agree on AMD EPYC), so neither is compared bit for bit.  Error model for a value v
    computed as ``1 / base ** e`` in float32: ``pow`` within 1 ulp (relative 2^-23), the division
    rounded (2^-24), so |v / exact - 1| <= 3 * 2^-24 (the 1e-6 factor covers second-order terms).
    The effect of such a difference on the rotation is bounded in the next test, and on the DiT
    covered by the flow parity cases.
    """
    from x_transformers.x_transformers import RotaryEmbedding

    exact = _float64_inv_freq(dim)
    ours = rotary_inv_freq(dim)
    assert ours.dtype == np.float32 and ours.shape == exact.shape
    for label, value in (("ours", ours), ("x-transformers", RotaryEmbedding(dim).inv_freq.numpy())):
        rel = np.abs(value.astype(np.float64) / exact - 1)
        assert rel.max() <= 3 * F32_EPS * (1 + 1e-6), (label, int(np.argmax(rel)), rel.max() / F32_EPS)


@pytest.mark.parametrize("dim", [8, 16, 32, 64, 128])
def test_rotary_matches_x_transformers(dim):
    """apply_interleaved_rotary == x-transformers' apply_rotary_pos_emb within float32 error.

    Per element, out = a cos(th) + b sin(th) with (a, b) = (x_2j, -x_2j+1) or (x_2j+1, x_2j).  Each
    side's float32 sin/cos are within 2 ulps of values in [-1, 1] (XLA's and SLEEF's documented
    accuracy: 2^-23 absolute) and its two products and sum round (3 * 2^-24 relative to |a|+|b|),
    so with the same angles the two differ by at most (|a| + |b|) * (2 * 2^-23 + 6 * 2^-24).  With
    x-transformers' own inv_freq the angles also differ: by pos * |inv_freq difference| plus the
    rounding of both products (2^-24 |th| each), times |a| + |b|.
    """
    from x_transformers.x_transformers import RotaryEmbedding, apply_rotary_pos_emb

    heads, frames = 3, 40
    q = torch.randn(2, frames, heads * dim, generator=torch.Generator().manual_seed(dim))
    ours = np.asarray(apply_interleaved_rotary(q.numpy(), np.arange(frames), dim))
    np.testing.assert_array_equal(ours[..., dim:], q.numpy()[..., dim:])  # heads 1.. untouched

    x = q.numpy()[..., :dim].astype(np.float64)
    pairs = x.reshape(x.shape[:-1] + (dim // 2, 2))
    scale = (np.abs(pairs[..., 0]) + np.abs(pairs[..., 1]))[..., None].repeat(2, -1).reshape(x.shape)  # |a|+|b|
    same_angles = scale * (2 * 2.0 ** -23 + 6 * F32_EPS)
    rotary = RotaryEmbedding(dim)
    for inv_freq, label in ((rotary_inv_freq(dim), "our inv_freq"), (rotary.inv_freq.numpy(), "torch's inv_freq")):
        rotary.inv_freq.copy_(torch.from_numpy(inv_freq))
        freqs, _ = rotary.forward_from_seq_len(frames)
        want = apply_rotary_pos_emb(q, freqs, 1.0).numpy()[..., :dim]
        pos = np.arange(frames, dtype=np.float64)[:, None]
        theta = np.repeat(pos * rotary_inv_freq(dim).astype(np.float64), 2, axis=-1)  # [T, dim]
        differs = np.repeat(inv_freq != rotary_inv_freq(dim), 2)  # same inv_freq: the same float32 angles
        angle_gap = np.repeat(pos * np.abs(inv_freq.astype(np.float64) - rotary_inv_freq(dim)), 2, axis=-1)
        bound = same_angles + scale * (angle_gap + 2 * F32_EPS * theta * differs)
        err = np.abs(ours[..., :dim].astype(np.float64) - want)
        worst = np.unravel_index(int(np.argmax(err / bound)), err.shape)
        assert np.all(err <= bound), (label, worst, err[worst], bound[worst])


def test_attention_mask_semantics():
    lengths = np.array([7, 10])
    full = np.asarray(attention_mask(lengths, 10, 4, streaming=False))
    chunk = np.asarray(attention_mask(lengths, 10, 4, streaming=True))
    no_chunk = np.asarray(attention_mask(lengths, 10, 0, streaming=True))  # static_chunk_size 0: full
    for b, n in enumerate(lengths):
        for i in range(10):
            keys = np.arange(10) < n
            np.testing.assert_array_equal(full[b, i], keys)
            np.testing.assert_array_equal(no_chunk[b, i], keys)
            np.testing.assert_array_equal(chunk[b, i], keys & (np.arange(10) < min((i // 4 + 1) * 4, 10)))


def test_inv_freq_buffer_is_checked():
    case_dir = cases_with_group("flow")[0]
    cfg = load_model_config(case_dir + "/model").flow
    sd = load_state_dict(case_dir + "/model/flow.pt")
    bad = dict(sd)
    bad[INV_FREQ_KEY] = sd[INV_FREQ_KEY] * np.float32(1.01)
    with pytest.raises(ConversionError, match="inv_freq"):
        convert(bad, cfg, "flow.pt")
    missing = {k: v for k, v in sd.items() if k != INV_FREQ_KEY}
    with pytest.raises(ConversionError, match="missing keys: .*inv_freq"):
        convert(missing, cfg, "flow.pt")
    extra = dict(sd)
    extra["decoder.estimator.extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ConversionError, match="unexpected keys: decoder.estimator.extra.weight"):
        convert(extra, cfg, "flow.pt")


def test_full_size_keys_and_shapes(full_size_manifest, full_size_model_dir):
    """Every flow.pt key of the release maps to a param of the right shape (no weights needed)."""
    cfg = load_model_config(full_size_model_dir).flow
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.dim_head) == (1024, 22, 16, 64)
    sd = shape_only_state_dict(full_size_manifest["files"]["flow.pt"]["keys"])
    assert sd[INV_FREQ_KEY].shape == rotary_inv_freq(cfg.dim_head).shape
    # Zero-stride views in, zero-stride views out: the transforms run on one tensor at a time.
    table = [type(e)(e.path, e.keys, lambda *a, f=e.transform: np.broadcast_to(np.float32(0), f(*a).shape),
                     e.alternatives) for e in param_table(cfg)]
    params = apply_table(sd, table, param_shapes(cfg), source="flow.pt",
                         consumed={INV_FREQ_KEY: "rotary buffer"})
    assert params["estimator"]["transformer_blocks_21"]["attn_norm"]["linear"]["kernel"].shape == (1024, 6144)


# ---------------------------------------------------------------- batching and compile count
def test_batched_rows_equal_single_and_compile_once(noise_full):
    case, cfg, params = _converted(cases_with_group("flow")[0])
    fcfg = cfg.flow
    x = case.group("flow")
    token, prompt_token, prompt_feat, emb = x["token"], x["prompt_token"], x["prompt_feat"], x["embedding"]
    nt, np_ = token.shape[1], prompt_token.shape[1]
    rng = np.random.default_rng(0)
    # Row 1: shorter target, shorter prompt, another speaker; F1 deliberately != ratio * Np.
    tok = np.concatenate([token, token[:, ::-1]], axis=0)
    ptok = np.concatenate([prompt_token, prompt_token[:, ::-1]], axis=0)
    feat = np.concatenate([prompt_feat, prompt_feat[:, ::-1]], axis=0)
    embs = np.concatenate([emb, rng.standard_normal(emb.shape).astype(np.float32)], axis=0)
    lens = dict(token_len=np.array([nt, nt - 5]), prompt_token_len=np.array([np_, np_ - 3]),
                prompt_feat_len=np.array([prompt_feat.shape[1], 2 * (np_ - 3) + 1]))
    for streaming, finalize in ((False, True), (True, False)):
        before = flow_mod._flow_core._cache_size()
        batched = np.asarray(flow_inference(params, tok, ptok, feat, embs, cfg=fcfg, noise=noise_full,
                                            streaming=streaming, finalize=finalize, **lens))
        out_len = output_lengths(fcfg, lens["token_len"], lens["prompt_token_len"], lens["prompt_feat_len"],
                                 finalize)
        assert batched.shape == (2, out_len.max(), fcfg.output_size)
        for b in range(2):
            single = np.asarray(flow_inference(
                params, tok[b:b + 1, :lens["token_len"][b]], ptok[b:b + 1, :lens["prompt_token_len"][b]],
                feat[b:b + 1, :lens["prompt_feat_len"][b]], embs[b:b + 1], cfg=fcfg, noise=noise_full,
                streaming=streaming, finalize=finalize))
            assert single.shape == (1, out_len[b], fcfg.output_size)
            np.testing.assert_allclose(batched[b, :out_len[b]], single[0], atol=1e-5, rtol=0)
            assert not batched[b, out_len[b]:].any()
        # Batch 2 and batch 1, all in one token bucket: at most one compilation per batch size
        # (batch 1 may already be compiled by another test).
        assert token_bucket(nt + np_) == token_bucket(nt + np_ - 8)
        assert 1 <= flow_mod._flow_core._cache_size() - before <= 2
        # Other lengths in the same bucket reuse the compiled functions.
        before = flow_mod._flow_core._cache_size()
        shorter = {k: v - 1 for k, v in lens.items()}
        flow_inference(params, tok, ptok, feat, embs, cfg=fcfg, noise=noise_full, streaming=streaming,
                       finalize=finalize, **shorter)
        flow_inference(params, token[:, :-2], prompt_token, prompt_feat, emb, cfg=fcfg, noise=noise_full,
                       streaming=streaming, finalize=finalize)
        assert flow_mod._flow_core._cache_size() == before


# ---------------------------------------------------------------- bad inputs
@pytest.fixture()
def no_device(monkeypatch):
    """Fail the test if the jitted core is reached: bad inputs must be refused before device work."""
    def boom(*args, **kwargs):
        raise AssertionError("device call made before the input was refused")

    monkeypatch.setattr(flow_mod, "_flow_core", boom)


def _bad_call(default_noise, **override):
    case, cfg, params = _converted(cases_with_group("flow")[0])
    x = case.group("flow")
    kwargs = dict(token=x["token"], prompt_token=x["prompt_token"], prompt_feat=x["prompt_feat"],
                  embedding=x["embedding"], cfg=cfg.flow, noise=default_noise, streaming=False, finalize=True)
    kwargs.update(override)
    return flow_inference(params, **kwargs), cfg.flow


def test_bad_inputs(no_device, noise_full):
    case = load_case(cases_with_group("flow")[0])
    x = case.group("flow")
    vocab = load_model_config(case.model_dir).flow.vocab_size
    too_big = x["token"].copy()
    too_big[0, 3] = vocab
    cases = [
        (dict(token=too_big), "outside the speech vocabulary"),
        (dict(token=np.zeros((1, 0), np.int64)), "empty target token sequence"),
        (dict(prompt_feat=x["prompt_feat"][:, :, :40]), r"prompt_feat: expected \[batch=1, frames, 80\]"),
        (dict(prompt_feat=np.transpose(x["prompt_feat"], (0, 2, 1))), "time-major"),
        (dict(prompt_feat=np.zeros((1, 2 * (x["token"].shape[1] + x["prompt_token"].shape[1]) + 1, 80),
                                   np.float32)), "upstream fails"),
        (dict(embedding=np.full_like(x["embedding"], np.nan)), "embedding: contains NaN"),
        (dict(embedding=x["embedding"][:, :10]), "embedding: expected shape"),
        (dict(token=x["token"].astype(np.float32)), "integer token ids"),
        (dict(noise=noise_full[:, :40, :]), "noise: expected shape"),
        (dict(noise=noise_full[:, :, :30]), "noise buffer"),
        (dict(token=x["token"][:, :1], prompt_token=x["prompt_token"][:, :1], prompt_feat=x["prompt_feat"][:, :0],
              finalize=False), "holds back"),
    ]
    for override, message in cases:
        with pytest.raises(ValueError, match=message):
            _bad_call(noise_full, **override)


def test_prompt_feat_not_aligned_to_prompt_tokens_is_accepted(noise_full):
    """Like upstream (voice conversion), F1 != ratio * Np is used as given: output = ratio*(Np+Nt) - F1."""
    mel, cfg = _bad_call(noise_full, prompt_feat=_converted(cases_with_group("flow")[0])[0].arrays[
        "flow/prompt_feat"][:, :13])
    x = load_case(cases_with_group("flow")[0]).group("flow")
    assert mel.shape[1] == cfg.token_mel_ratio * (x["token"].shape[1] + x["prompt_token"].shape[1]) - 13
    assert np.isfinite(np.asarray(mel)).all()


# ---------------------------------------------------------------- against upstream torch (optional)
@pytest.mark.upstream
@pytest.mark.parametrize("streaming,finalize", [(False, True), (True, False)])
def test_random_torch_model_round_trip(streaming, finalize, noise_full):
    """Random-init upstream CausalMaskedDiffWithDiT at odd sizes -> convert -> same mel.

    Sizes chosen to catch hard-coded assumptions: heads * dim_head != dim, ratio 3, look-ahead 2,
    a chunk size that does not divide the length, a prompt mel not aligned to the prompt tokens.
    """
    import dataclasses

    repo = os.environ.get("COSYJAX_REFERENCE_REPO")
    if not repo:
        pytest.skip("set COSYJAX_REFERENCE_REPO to an upstream CosyVoice checkout")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/ (repo root)
    from benchmarks.models import build_upstream_flow
    from benchmarks.workload import release_config
    from cosyjax.parity.upstream import import_upstream

    cfg = dataclasses.replace(release_config().flow, depth=3, vocab_size=50, pre_lookahead_channels=24,
                              pre_lookahead_len=2, token_mel_ratio=3, dim=48, heads=4, dim_head=16,
                              static_chunk_size=7)
    import_upstream(repo)
    model = build_upstream_flow(cfg)
    model.decoder.rand_noise = torch.from_numpy(noise_full)
    params = convert({k: v.detach().numpy() for k, v in model.state_dict().items()}, cfg, "random")
    rng = np.random.default_rng(3)
    token = rng.integers(0, cfg.vocab_size, (1, 13))
    prompt_token = rng.integers(0, cfg.vocab_size, (1, 5))
    prompt_feat = rng.standard_normal((1, 16, 80)).astype(np.float32)
    embedding = rng.standard_normal((1, 192)).astype(np.float32)
    t = lambda a, dtype=torch.float32: torch.from_numpy(np.asarray(a)).to(dtype)  # noqa: E731
    with torch.inference_mode():
        ref, _ = model.inference(t(token, torch.int64), t([13], torch.int64), t(prompt_token, torch.int64),
                                 t([5], torch.int64), t(prompt_feat), t([16], torch.int64), t(embedding),
                                 streaming=streaming, finalize=finalize)
    ours = flow_inference(params, token, prompt_token, prompt_feat, embedding, cfg=cfg, noise=noise_full,
                          streaming=streaming, finalize=finalize)
    np.testing.assert_allclose(np.transpose(np.asarray(ours), (0, 2, 1)), ref.numpy(), atol=1e-4, rtol=0)
