"""LLM stage: parity on the committed cases, HF Qwen2 cross-check at other dims, batching, decode loop,
RAS sampling, compile counts, bad inputs, full-size shapes."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyjax.checkpoint import ConvertedModel
from cosyjax.config import LLMConfig, load_model_config
from cosyjax.convert.common import ConversionError, load_state_dict, shape_only_state_dict
from cosyjax.convert.llm import LM_HEAD, convert
from cosyjax.llm import decode, lm
from cosyjax.programs import CompileCounter
from cosyjax.llm.qwen2 import param_shapes
from cosyjax.llm.sampling import SamplerSettings, nucleus_keep, sample
from cosyjax.parity.case import load_case
from cosyjax.parity.compare import format_comparison
from cosyjax.parity.stages.llm import INPUT_KEYS, RUNNERS

from conftest import DATA, cases_with_group

TINY = os.path.join(DATA, "tiny-a")
GREEDY = SamplerSettings(method="greedy")


@pytest.fixture(scope="module")
def tiny():
    """(cfg, params, golden arrays) of tiny-a, converted with our converter."""
    cfg = load_model_config(os.path.join(TINY, "model")).llm
    params = convert(load_state_dict(os.path.join(TINY, "model", "llm.pt")), cfg, "llm.pt")
    params = jax.tree.map(jnp.asarray, params)
    with np.load(os.path.join(TINY, "golden.npz")) as z:
        golden = {k: z[k] for k in z.files if k.startswith("llm")}
    return cfg, params, golden


def _tiny_request(golden) -> lm.LMRequest:
    return lm.LMRequest.zero_shot(golden["llm/text"], golden["llm/prompt_text"], golden["llm/prompt_speech_token"])


# ------------------------------------------------------------------------------------------------
# Parity on committed cases
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", ["llm", "llm_greedy"])
def test_parity(group):
    cases = cases_with_group(group)
    assert cases, f"no committed case holds group {group}"
    for path in cases:
        case = load_case(path)
        mc = load_model_config(case.model_dir)
        params = convert(load_state_dict(os.path.join(case.model_dir, "llm.pt")), mc.llm, "llm.pt")
        model = ConvertedModel(config=mc, params={"llm": params}, buffers={})
        result = RUNNERS[group](case, group, model)
        failed = [format_comparison(c) for c in result.comparisons if not c.passed]
        assert not failed, f"{os.path.basename(path)}:\n" + "\n".join(failed)
        produced = {k.split("/", 1)[1] for k in result.outputs}
        assert set(case.group(group)) - set(INPUT_KEYS[group]) <= produced


# ------------------------------------------------------------------------------------------------
# Cross-check against HF Qwen2 at dims the committed case does not use (GQA x3, head_dim != D/N,
# a different rope theta, untied lm_head), through our converter.
# ------------------------------------------------------------------------------------------------
def _hf_reference_model(seed=0):
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    hf_cfg = Qwen2Config(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=12, vocab_size=300, rms_norm_eps=1e-6,
                         rope_theta=5000.0, tie_word_embeddings=False, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF inits biases to zero and norms to one; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    cfg = LLMConfig(hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=12, intermediate_size=80,
                    vocab_size=300, rms_norm_eps=1e-6, rope_theta=5000.0, tie_word_embeddings=False,
                    max_position_embeddings=32768, speech_token_size=40, llm_input_size=48, llm_output_size=48)
    state = {f"llm.model.{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    state["speech_embedding.weight"] = torch.randn(cfg.speech_vocab_size, 48).numpy()
    state["llm_decoder.weight"] = (0.2 * torch.randn(cfg.speech_vocab_size, 48)).numpy()
    return model, cfg, state


def test_against_hf_qwen2_other_dims():
    torch = pytest.importorskip("torch")
    hf, cfg, state = _hf_reference_model()
    params = jax.tree.map(jnp.asarray, convert(state, cfg, "random"))
    req = lm.LMRequest.zero_shot(text=[5, 17, 250, 3], prompt_text=[9, 8, 7], prompt_speech=[1, 39, 2, 2, 30])
    targets = [4, 0, 39, 12, 12, 7]
    ours = lm.llm_forward(params, cfg, [req], [targets])
    x = torch.from_numpy(ours["lm_input"].copy())
    with torch.no_grad():
        out = hf(inputs_embeds=x, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        logits = hidden @ torch.from_numpy(state["llm_decoder.weight"]).T
    np.testing.assert_allclose(ours["hidden"], hidden.numpy(), atol=2e-5, rtol=0)
    np.testing.assert_allclose(ours["logits"], logits.numpy(), atol=2e-5, rtol=0)
    # Our KV-cache path, teacher-forced, against the full pass at the speech prediction positions.
    prefix = int(ours["prefix_lengths"][0])
    state0 = lm.start(params, cfg, [req], jax.random.key(0)[None], GREEDY)
    _, step_logits = decode.decode_forced(params, state0, np.asarray([targets], np.int32), cfg=cfg)
    np.testing.assert_allclose(np.asarray(step_logits[0]), logits.numpy()[0, prefix - 1:prefix - 1 + len(targets)],
                               atol=2e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# lm_input assembly, batching
# ------------------------------------------------------------------------------------------------
def test_layout_modes(tiny):
    cfg, _, _ = tiny
    ids, speech = lm.build_layout(cfg, lm.LMRequest.zero_shot([5, 6], [7], [1, 2]))
    assert ids.tolist() == [cfg.sos, 7, 5, 6, cfg.task_id, 1, 2]
    assert speech.tolist() == [True, False, False, False, True, True, True]
    ids, speech = lm.build_layout(cfg, lm.LMRequest.cross_lingual([5, 6]))
    assert ids.tolist() == [cfg.sos, 5, 6, cfg.task_id] and speech.tolist() == [True, False, False, True]
    ids, _ = lm.build_layout(cfg, lm.LMRequest.instruct2([5, 6], [9, 9, 9]))
    assert ids.tolist() == [cfg.sos, 9, 9, 9, 5, 6, cfg.task_id]
    # min/max_len count the tts text only, not the prompt/instruct text.
    assert lm.length_limits(lm.LMRequest.instruct2([5, 6, 7], [9] * 11)) == (6, 60)


def _mixed_requests(golden):
    full = _tiny_request(golden)
    return [full,
            lm.LMRequest.cross_lingual(full.text[:5]),
            lm.LMRequest.instruct2(full.text[2:], full.prompt_text[:3])]


def test_batched_forward_rows_equal_single(tiny):
    cfg, params, golden = tiny
    reqs = _mixed_requests(golden)
    targets = [tuple(golden["llm/speech_token"][0][:n]) for n in (16, 3, 9)]
    batched = lm.llm_forward(params, cfg, reqs, targets)
    for b, (r, t) in enumerate(zip(reqs, targets)):
        single = lm.llm_forward(params, cfg, [r], [t])
        n = int(single["lengths"][0])
        assert int(batched["lengths"][b]) == n
        np.testing.assert_array_equal(batched["lm_input"][b, :n], single["lm_input"][0])
        np.testing.assert_allclose(batched["logits"][b, :n], single["logits"][0], atol=1e-5, rtol=0)


def test_batched_greedy_rows_equal_single(tiny):
    cfg, params, golden = tiny
    reqs = _mixed_requests(golden)
    keys = jax.random.split(jax.random.key(0), len(reqs))
    batched = lm.generate(params, cfg, reqs, keys, GREEDY, chunk_size=10, record_logits=True)
    for b, r in enumerate(reqs):
        alone = lm.generate(params, cfg, [r], keys[b:b + 1], GREEDY, chunk_size=25, record_logits=True)[0]
        np.testing.assert_array_equal(batched[b].tokens, alone.tokens)
        assert batched[b].stop_token == alone.stop_token
        np.testing.assert_allclose(batched[b].step_logits, alone.step_logits, atol=1e-5, rtol=0)
    # the full request reproduces the reference greedy run inside a batch too
    np.testing.assert_array_equal(batched[0].tokens, golden["llm_greedy/tokens"][0])


def test_ras_independent_of_batching_and_chunking(tiny):
    cfg, params, golden = tiny
    reqs = _mixed_requests(golden)
    ras = SamplerSettings.from_config(cfg.sampling)
    keys = jax.random.split(jax.random.key(7), len(reqs))
    batched = lm.generate(params, cfg, reqs, keys, ras, chunk_size=25)
    alone = lm.generate(params, cfg, reqs[1:2], keys[1:2], ras, chunk_size=6)[0]
    np.testing.assert_array_equal(batched[1].tokens, alone.tokens)
    assert batched[1].stop_token == alone.stop_token
    other = lm.generate(params, cfg, reqs[1:2], jax.random.split(jax.random.key(8), 1), ras, chunk_size=25)[0]
    assert not np.array_equal(other.tokens, alone.tokens) or other.stop_token != alone.stop_token


def test_max_len_forces_stop_and_stops_are_not_emitted(tiny):
    cfg, params, golden = tiny
    req = _tiny_request(golden)
    # max_len = int(8 * 0.5) = 4 < the 36 tokens greedy would emit
    g = lm.generate(params, cfg, [req], jax.random.key(0)[None], GREEDY, record_logits=True,
                    max_ratio=0.5)[0]
    np.testing.assert_array_equal(g.tokens, golden["llm_greedy/tokens"][0][:4])
    assert g.stop_token == -1 and not g.stopped_by_token and g.step_logits.shape[0] == 4
    assert (g.tokens < cfg.speech_token_size).all()


def test_min_len_mask_upstream_quirk_and_corrected_option(tiny):
    cfg, _, _ = tiny
    logits = jnp.zeros((2, cfg.speech_vocab_size), jnp.float32)
    step, min_len = jnp.asarray(3, jnp.int32), jnp.asarray([4, 3], jnp.int32)  # row 0 masked, row 1 not
    quirk = np.asarray(decode.step_scores(cfg, GREEDY, logits, step, min_len))
    assert np.isneginf(quirk[0]).tolist() == [i == cfg.speech_token_size for i in range(cfg.speech_vocab_size)]
    assert np.isfinite(quirk[1]).all()
    fixed = np.asarray(decode.step_scores(
        cfg, SamplerSettings(method="greedy", mask_all_stop_ids_before_min_len=True), logits, step, min_len))
    assert np.isneginf(fixed[0]).tolist() == [i >= cfg.speech_token_size for i in range(cfg.speech_vocab_size)]
    assert np.isfinite(fixed[1]).all()


def test_corrected_min_len_prevents_early_stop(tiny):
    cfg, params, golden = tiny
    # A decoder whose only non-zero logits are +-c*h[0] on eos and eos+1: one of those two stop ids
    # always wins.  Upstream's quirk (only sos masked) stops at step 0; masking every stop id keeps
    # the run going for min_len steps (id 0 wins the all-zero rest).
    kernel = np.zeros(params["llm_decoder"]["kernel"].shape, np.float32)
    kernel[0, cfg.eos], kernel[0, cfg.eos + 1] = 50.0, -50.0
    p = dict(params, llm_decoder={"kernel": jnp.asarray(kernel)})
    req = _tiny_request(golden)
    quirk = lm.generate(p, cfg, [req], jax.random.key(0)[None], GREEDY)[0]
    assert len(quirk.tokens) == 0 and quirk.stop_token in (cfg.eos, cfg.eos + 1)
    fixed = lm.generate(p, cfg, [req], jax.random.key(0)[None],
                        SamplerSettings(method="greedy", mask_all_stop_ids_before_min_len=True))[0]
    min_len, _ = lm.length_limits(req)
    assert fixed.tokens.tolist() == [0] * min_len and fixed.stop_token in (cfg.eos, cfg.eos + 1)


def test_bfloat16_close_to_float32(tiny):
    cfg, params, golden = tiny
    req = _tiny_request(golden)
    targets = [tuple(golden["llm/speech_token"][0])]
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = lm.llm_forward(bf16, cfg, [req], targets)
    assert out["logits"].dtype == np.float32
    ref = golden["llm/logits"]
    assert np.abs(out["logits"] - ref).max() < 0.1 * np.abs(ref).max()
    assert np.mean(out["logits"].argmax(-1) == ref.argmax(-1)) > 0.8


# ------------------------------------------------------------------------------------------------
# Compile counts
# ------------------------------------------------------------------------------------------------
def test_no_recompile_between_chunks_or_similar_utterances(tiny):
    cfg, params, golden = tiny
    ras = SamplerSettings.from_config(cfg.sampling)
    full = _tiny_request(golden)
    first = [full, lm.LMRequest.cross_lingual(full.text)]
    # different prompt and text lengths (so different min/max_len), same length buckets
    second = [lm.LMRequest.zero_shot(full.text[:7], full.prompt_text[:4], full.prompt_speech[:8]),
              lm.LMRequest.instruct2(full.text[1:], full.prompt_text[:2])]
    with CompileCounter() as warmup:
        lm.generate(params, cfg, first, jax.random.split(jax.random.key(3), 2), ras, chunk_size=5)
    assert warmup.count >= 2  # prefill + decode_chunk at least (the counter works)
    with CompileCounter() as later:
        out = lm.generate(params, cfg, second, jax.random.split(jax.random.key(3), 2), ras, chunk_size=5)
        lm.generate(params, cfg, first, jax.random.split(jax.random.key(4), 2), ras, chunk_size=5)
    assert sum(len(g.tokens) for g in out) > 5  # several chunks ran
    assert later.count == 0, f"{later.count} recompilation(s) between chunks / similar utterances"


# ------------------------------------------------------------------------------------------------
# RAS sampling
# ------------------------------------------------------------------------------------------------
def test_nucleus_set_includes_crossing_token():
    probs = jnp.asarray([0.05, 0.5, 0.2, 0.15, 0.1], jnp.float32)
    values, ids, keep = nucleus_keep(probs, top_p=0.8, top_k=25)
    assert ids.tolist() == [1, 2, 3, 4, 0]
    # cum before each: 0, .5, .7, .85 -> keep 1, 2, 3 (3 crosses 0.8 and is kept)
    assert keep.tolist() == [True, True, True, False, False]
    _, ids, keep = nucleus_keep(probs, top_p=0.99, top_k=2)
    assert ids.tolist() == [1, 2] and keep.tolist() == [True, True]
    # ties: lower id first, as torch's stable descending sort
    _, ids, _ = nucleus_keep(jnp.asarray([0.25, 0.25, 0.25, 0.25]), top_p=0.5, top_k=4)
    assert ids.tolist() == [0, 1, 2, 3]


def _draw(settings, scores, recent, n=4000, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    scores = jnp.broadcast_to(scores, (n,) + scores.shape)
    recent = jnp.broadcast_to(recent, (n,) + recent.shape)
    return np.asarray(jax.jit(sample, static_argnames="settings")(keys, scores, recent, settings))


def test_ras_draws_from_renormalised_nucleus():
    probs = np.asarray([0.05, 0.4, 0.2, 0.15, 0.1, 0.06, 0.04], np.float32)
    settings = SamplerSettings(top_p=0.7, top_k=25)
    tokens = _draw(settings, jnp.log(jnp.asarray(probs)), jnp.full((10,), -1, jnp.int32))
    kept = [1, 2, 3]  # cum before: 0, .4, .6 < .7 -> kept; .75 stops
    assert set(np.unique(tokens).tolist()) == set(kept)
    freq = np.bincount(tokens, minlength=len(probs))[kept] / len(tokens)
    want = probs[kept] / probs[kept].sum()
    np.testing.assert_allclose(freq, want, atol=0.03)
    # top_k caps the set
    tokens = _draw(SamplerSettings(top_p=1.0, top_k=2), jnp.log(jnp.asarray(probs)), jnp.full((10,), -1, jnp.int32))
    assert set(np.unique(tokens).tolist()) == {1, 2}


def test_ras_fallback_on_repetition_excludes_repeated_token():
    probs = np.asarray([0.9, 0.04, 0.03, 0.02, 0.01], np.float32)
    settings = SamplerSettings(top_p=0.8, top_k=25, win_size=10, tau_r=0.1)
    scores = jnp.log(jnp.asarray(probs))
    # nucleus is {0} only; 0 occurs once in the window -> count 1 >= 10 * 0.1 -> fallback
    recent = jnp.asarray([-1] * 9 + [0], jnp.int32)
    tokens = _draw(settings, scores, recent)
    assert not (tokens == 0).any()
    freq = np.bincount(tokens, minlength=5)[1:] / len(tokens)
    np.testing.assert_allclose(freq, probs[1:] / probs[1:].sum(), atol=0.03)
    # token 0 outside the window (other ids there): no fallback, always 0
    tokens = _draw(settings, scores, jnp.asarray([3] * 10, jnp.int32))
    assert (tokens == 0).all()
    # a higher tau_r needs more repeats: 2 of 10 < 10 * 0.3 -> no fallback
    tokens = _draw(SamplerSettings(top_p=0.8, win_size=10, tau_r=0.3), scores,
                   jnp.asarray([-1] * 8 + [0, 0], jnp.int32))
    assert (tokens == 0).all()


def test_ras_fallback_can_return_stop_ids_but_not_masked_ones(tiny):
    cfg, _, _ = tiny
    logits = np.full((1, cfg.speech_vocab_size), -30.0, np.float32)
    logits[0, 3] = 10.0
    logits[0, cfg.sos] = 9.0
    logits[0, cfg.eos] = 9.0
    settings = SamplerSettings.from_config(cfg.sampling)
    n = 2000
    scores = decode.step_scores(cfg, settings, jnp.asarray(np.repeat(logits, n, 0)), jnp.asarray(0, jnp.int32),
                                jnp.full((n,), 5, jnp.int32))  # step 0 < min_len: sos masked
    recent = jnp.asarray(np.repeat([[3] + [-1] * (settings.win_size - 1)], n, 0), jnp.int32)
    tokens = np.asarray(sample(jax.random.split(jax.random.key(1), n), scores, recent, settings))
    assert (tokens == cfg.eos).mean() > 0.9 and not (tokens == 3).any() and not (tokens == cfg.sos).any()


# ------------------------------------------------------------------------------------------------
# Bad inputs: ValueError before any device call
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def no_device(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("device function called before input validation")

    for name in ("prefill", "decode_chunk"):
        monkeypatch.setattr(decode, name, forbidden)
    monkeypatch.setattr(lm, "embed_layout", forbidden)


@pytest.mark.parametrize("request_kwargs, match", [
    (dict(text=()), "text is empty"),
    (dict(text=(1, 512)), r"text: id 512 at index 1 is outside \[0, 512\)"),
    (dict(text=(1, -1)), "text: id -1"),
    (dict(text=(1,), prompt_text=(600,)), "prompt_text: id 600"),
    (dict(text=(1,), prompt_speech=(3, 64)), r"prompt_speech: id 64 at index 1 is outside \[0, 64\)"),
])
def test_bad_requests(tiny, no_device, request_kwargs, match):
    cfg, params, _ = tiny
    with pytest.raises(ValueError, match=match):
        lm.generate(params, cfg, [lm.LMRequest(**request_kwargs)], jax.random.key(0)[None], GREEDY)
    with pytest.raises(ValueError, match=match):
        lm.llm_forward(params, cfg, [lm.LMRequest(**request_kwargs)])


def test_cache_too_small_and_bad_keys(tiny, no_device):
    cfg, params, golden = tiny
    req = _tiny_request(golden)
    with pytest.raises(ValueError, match="cache_len=64 is too small: the prompt needs 26 slots"):
        lm.generate(params, cfg, [req], jax.random.key(0)[None], GREEDY, cache_len=64)
    with pytest.raises(ValueError, match="keys must be 2 typed PRNG keys"):
        lm.generate(params, cfg, [req, req], jax.random.key(0)[None], GREEDY)
    with pytest.raises(ValueError, match="endofprompt"):
        lm.generate(params, cfg, [req], jax.random.key(0)[None], GREEDY, require_endofprompt=True)
    with pytest.raises(ValueError, match="speech_targets: id 264"):
        lm.llm_forward(params, cfg, [req], [(1, cfg.speech_vocab_size)])


def test_sampler_settings_validation():
    with pytest.raises(ValueError, match="method='beam'"):
        SamplerSettings(method="beam")
    with pytest.raises(ValueError, match="top_p=1.5"):
        SamplerSettings(top_p=1.5)
    hash(SamplerSettings())  # static jit argument


# ------------------------------------------------------------------------------------------------
# Converter
# ------------------------------------------------------------------------------------------------
def test_converter_checks_tied_lm_head(tiny):
    cfg, _, _ = tiny
    state = load_state_dict(os.path.join(TINY, "model", "llm.pt"))
    state[LM_HEAD] = state[LM_HEAD].copy()
    state[LM_HEAD][3, 4] += 1.0
    with pytest.raises(ConversionError, match="lm_head.weight differs from"):
        convert(state, cfg, "llm.pt")
    del state[LM_HEAD]
    convert(state, cfg, "llm.pt")  # lm_head is optional: never used
    state["llm_decoder.bias"] = np.zeros(cfg.speech_vocab_size, np.float32)  # CosyVoice2 layout
    with pytest.raises(ConversionError, match="unexpected keys: llm_decoder.bias"):
        convert(state, cfg, "llm.pt")


def test_full_size_shapes(full_size_manifest, full_size_model_dir):
    cfg = load_model_config(full_size_model_dir).llm
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (24, 896, 14, 2, 64)
    state = shape_only_state_dict(full_size_manifest["files"]["llm.pt"]["keys"])
    params = convert(state, cfg, "llm.pt (manifest)")
    shapes = param_shapes(cfg)
    got = jax.tree.map(lambda a: tuple(a.shape), params)
    assert got == jax.tree.map(lambda s: tuple(s.shape), shapes)
    assert got["llm"]["embed_tokens"]["embedding"] == (151936, 896)
    assert got["llm_decoder"]["kernel"] == (896, cfg.speech_vocab_size)
    # nothing was materialised: every leaf is still a zero-stride view
    assert all(0 in a.strides for a in jax.tree.leaves(params))
