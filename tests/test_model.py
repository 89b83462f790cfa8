"""CosyVoice3Model orchestration: modes, stream schedule, silent filter, PRNG, batching, parity."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cosyjax import model as model_mod
from cosyjax.llm import lm
from cosyjax.llm.sampling import SamplerSettings
from cosyjax.model import CosyVoice3Model, HopState, SilentTokenFilter, Trace, interpolate_linear, stream_seams
from cosyjax.parity.case import load_case
from cosyjax.parity.compare import format_comparison
from cosyjax.parity.error_model import tolerance, ulp_perturb
from cosyjax.parity.stages.tts import RUNNERS

from conftest import cases_with_group

TTS_CASES = cases_with_group("tts")


_CONVERTED: dict[str, tuple] = {}


def _load(case_dir: str):
    """(case, ConvertedModel), converted once per session (conversion costs seconds)."""
    if case_dir not in _CONVERTED:
        from cosyjax.convert import convert_model

        case = load_case(case_dir)
        _CONVERTED[case_dir] = (case, convert_model(case.model_dir, progress=False))
    return _CONVERTED[case_dir]


@pytest.fixture(scope="module")
def case_model():
    """(case, ConvertedModel) of the first case with the tts groups."""
    if not TTS_CASES:
        pytest.skip("no committed case with the tts groups")
    return _load(TTS_CASES[0])


def _prompt(case):
    a = case.group("tts")
    return dict(flow_prompt_speech_tokens=a["flow_prompt_speech_token"][0], prompt_feat=a["prompt_speech_feat"][0],
                embedding=a["flow_embedding"][0])


def _traced(m, **kwargs):
    """(audio [1, n], chunk lengths, Trace) of one ``tts`` call."""
    trace = Trace()
    chunks = [c["tts_speech"] for c in m.tts(**kwargs, trace=trace)]
    return np.concatenate(chunks, axis=1), [c.shape[1] for c in chunks], trace


def _speech(m, **kwargs):
    audio, lengths, _ = _traced(m, **kwargs)
    return audio, lengths


def _codes(converted, n, seed=0, avoid_silent=True):
    """n random speech codes (no silent ones unless asked)."""
    rng = np.random.default_rng(seed)
    vocab = converted.config.flow.vocab_size
    pool = [t for t in range(vocab) if not (avoid_silent and t in model_mod.SILENT_TOKENS)]
    return rng.choice(pool, size=n)


# --------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_dir", TTS_CASES)
@pytest.mark.parametrize("group", ["tts", "tts_stream"])
def test_parity(case_dir, group):
    case, converted = _load(case_dir)
    result = RUNNERS[group](case, group, converted)
    failed = [format_comparison(c) for c in result.comparisons if not c.passed]
    assert not failed, "\n".join(failed)
    assert {c.key for c in result.comparisons} >= {f"{group}/audio"}


# --------------------------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------------------------
def test_modes_reach_llm(case_model, monkeypatch):
    case, converted = case_model
    a = case.group("tts")
    seen = []
    real_start = lm.start

    def spy(params, cfg, requests, keys, settings, **kw):
        seen.extend(requests)
        return real_start(params, cfg, requests, keys, settings, **kw)

    monkeypatch.setattr(model_mod.lm, "start", spy)
    m = CosyVoice3Model(converted)
    text, prompt_text, prompt_speech = a["text"][0], a["prompt_text"][0], a["llm_prompt_speech_token"][0]
    _speech(m, text_ids=text, prompt_text_ids=prompt_text, llm_prompt_speech_tokens=prompt_speech, **_prompt(case))
    _speech(m, text_ids=text, **_prompt(case))  # cross-lingual: marker inside the text
    _speech(m, text_ids=text, prompt_text_ids=prompt_text[:3], **_prompt(case))  # instruct2
    # Each request is capped by the output limit and by what the flow's noise buffer leaves after the prompt.
    room = min(m.limits.output_tokens(converted.config.token_frame_rate),
               converted.buffers["flow_rand_noise"].shape[-1] // converted.config.flow.token_mel_ratio
               - len(_prompt(case)["flow_prompt_speech_tokens"]))
    assert seen == [dataclasses.replace(r, max_tokens=room) for r in (
        lm.LMRequest.zero_shot(text, prompt_text, prompt_speech), lm.LMRequest.cross_lingual(text),
        lm.LMRequest.instruct2(text, prompt_text[:3]))]


def test_voice_conversion_skips_llm_and_filter_and_keeps_untrimmed_prompt(case_model, monkeypatch):
    case, converted = case_model

    def no_llm(*_a, **_k):
        raise AssertionError("the LLM ran")

    monkeypatch.setattr(model_mod.lm, "start", no_llm)
    m = CosyVoice3Model(converted)
    silent = [t for t in model_mod.SILENT_TOKENS if t < converted.config.flow.vocab_size][0]
    source = np.concatenate([_codes(converted, 6), np.full(8, silent)])
    prompt = _prompt(case)
    feat = prompt["prompt_feat"][:-3]  # VC: prompt mel frames != ratio * prompt tokens
    audio, _, trace = _traced(m, source_speech_tokens=source,
                              flow_prompt_speech_tokens=prompt["flow_prompt_speech_tokens"], prompt_feat=feat,
                              embedding=prompt["embedding"])
    np.testing.assert_array_equal(trace.flow_tokens, source)  # no silent filter in VC
    ratio = converted.config.flow.token_mel_ratio
    frames = ratio * (len(prompt["flow_prompt_speech_tokens"]) + len(source)) - len(feat)
    assert audio.shape == (1, converted.config.hift.upsample_scale * frames)


# --------------------------------------------------------------------------------------------
# silent-token filter
# --------------------------------------------------------------------------------------------
def test_silent_filter_unit():
    f = SilentTokenFilter(silent_tokens=(1, 2), max_run=5)
    tokens = [7, 1, 2, 1, 1, 2, 1, 2, 1, 9, 1, 1]
    assert f(tokens[:4]) + f(tokens[4:]) == [7, 1, 2, 1, 1, 2, 9, 1, 1]  # state carries across chunks
    assert SilentTokenFilter((1, 2), 5, enabled=False)(tokens) == tokens


def test_silent_filter_in_model(case_model):
    case, converted = case_model
    silent = [t for t in model_mod.SILENT_TOKENS if t < converted.config.flow.vocab_size][:2]
    forced = np.concatenate([_codes(converted, 5), np.resize(silent, 8), _codes(converted, 4, 1)])
    for enabled, kept in ((True, len(forced) - 3), (False, len(forced))):
        m = CosyVoice3Model(converted, silent_filter=enabled)
        _, _, trace = _traced(m, forced_tokens=forced, **_prompt(case))
        np.testing.assert_array_equal(trace.llm_tokens, forced)
        assert len(trace.flow_tokens) == kept


# --------------------------------------------------------------------------------------------
# stream schedule
# --------------------------------------------------------------------------------------------
def test_hop_schedule_quirk_and_corrected(case_model):
    case, converted = case_model
    flow = converted.config.flow
    base = flow.static_chunk_size // flow.token_mel_ratio
    la = flow.pre_lookahead_len
    prompt = _prompt(case)
    p = len(prompt["flow_prompt_speech_tokens"])
    pad = -(-p // base) * base - p
    forced = _codes(converted, pad + 7 * base + la + 2)
    expected_first = [base + pad, 2 * base, 4 * base]
    max_hop = 4 * base
    pad_max = -(-p // max_hop) * max_hop - p

    m = CosyVoice3Model(converted, upstream_hop_quirk=True)  # one HopState shared by every request
    assert m.schedule.base == base and m.schedule.max_hop == max_hop
    _, lengths, trace = _traced(m, forced_tokens=forced, stream=True, **prompt)
    assert trace.hops.tolist() == expected_first
    calls = trace.flow_calls.tolist()
    assert calls[:-1] == [[sum(expected_first[:i + 1]) + la, 1, 0] for i in range(3)]
    assert calls[-1] == [len(forced), 0, 1]
    assert len(lengths) == 4
    _, _, trace = _traced(m, forced_tokens=forced, stream=True, **prompt)  # stale hop: starts at the max
    assert trace.hops.tolist()[0] == max_hop + pad_max

    # The same sharing made explicit: a HopState handed to the requests that should share it.
    m = CosyVoice3Model(converted)
    shared = HopState(base)
    for first in (base + pad, max_hop + pad_max):
        _, _, trace = _traced(m, forced_tokens=forced, stream=True, hop_state=shared, **prompt)
        assert trace.hops.tolist()[0] == first
    for _ in range(2):  # the default: every request starts the fresh schedule
        _, _, trace = _traced(m, forced_tokens=forced, stream=True, **prompt)
        assert trace.hops.tolist() == expected_first


def test_stream_concatenation_matches_offline_when_no_hop(case_model):
    case, converted = case_model
    m = CosyVoice3Model(converted)
    forced = _codes(converted, 5)  # shorter than the first hop: stream = one final call
    offline, _ = _speech(m, forced_tokens=forced, **_prompt(case))
    streamed, lengths = _speech(m, forced_tokens=forced, stream=True, **_prompt(case))
    assert len(lengths) == 1
    np.testing.assert_array_equal(streamed, offline)


def _perturbed(converted, seed):
    """The converted model with every flow/HiFT weight moved by one ulp (the HiFT f0 predictor, which
    runs in float64 on every path, aside): an error-model probe (cosyjax.parity.error_model)."""
    return dataclasses.replace(converted, params=ulp_perturb(converted.params, seed,
                                                             lambda path: path.startswith("hift/f0_predictor")))


def _chain_tolerance(converted, fn):
    """KAPPA x how far one-ulp weight probes move ``fn(converted)`` (one array): two float32
    evaluations of the same chain (different buffer sizes, carried state) differ by about that much."""
    base = np.asarray(fn(converted), np.float64)
    sigma = max(float(np.abs(np.asarray(fn(_perturbed(converted, seed)), np.float64) - base).max())
                for seed in (1, 2))
    return tolerance(sigma, base)


def test_stream_audio_is_upstreams_stream_schedule_and_seams_measure_it(case_model):
    """The stream is what upstream's loop computes (chunk-causal flow on each prefix, the last chunk with
    full attention over everything, the vocoder on all mel so far), assembled here from plain offline
    calls; ``stream_seams`` measures how far that is from the offline audio."""
    from cosyjax.flow.flow import flow_inference
    from cosyjax.hift.generator import hift_inference

    case, converted = case_model
    prompt = _prompt(case)
    forced = _codes(converted, 24, 3)
    m = CosyVoice3Model(converted)
    offline, _ = _speech(m, forced_tokens=forced, **prompt)
    chunks = [c["tts_speech"] for c in m.tts(forced_tokens=forced, stream=True, **prompt)]
    trace = _traced(m, forced_tokens=forced, stream=True, **prompt)[2]
    assert len(chunks) > 2

    def assembled(conv):
        cfg = conv.config.flow
        args = (np.asarray(prompt["flow_prompt_speech_tokens"])[None], np.asarray(prompt["prompt_feat"])[None],
                np.asarray(prompt["embedding"])[None])
        mels, offset = [], 0
        for (n, streaming, finalize), hop in zip(trace.flow_calls[:-1], trace.hops):
            mel = flow_inference(conv.params["flow"], forced[None, :n], *args, cfg=cfg,
                                 noise=conv.buffers["flow_rand_noise"], streaming=True, finalize=False)
            mels.append(np.asarray(mel)[:, cfg.token_mel_ratio * offset:])
            offset += hop
        last = flow_inference(conv.params["flow"], forced[None], *args, cfg=cfg, noise=conv.buffers["flow_rand_noise"],
                              streaming=False, finalize=True)
        mels.append(np.asarray(last)[:, cfg.token_mel_ratio * offset:])
        return hift_inference(conv.params["hift"], np.concatenate(mels, axis=1), cfg=conv.config.hift)

    streamed = np.concatenate(chunks, axis=1)
    expected = np.asarray(assembled(converted))
    tol = _chain_tolerance(converted, assembled)
    np.testing.assert_allclose(streamed, expected, rtol=0, atol=tol)

    seams = stream_seams(chunks, offline)
    diff = np.abs(streamed.astype(np.float64) - offline)
    assert seams["max_abs"] == float(diff.max()) > 100 * tol  # the chunk mask really changes the audio
    edges = np.cumsum([c.shape[1] for c in chunks])[:-1]
    assert [s["sample"] for s in seams["seams"]] == edges.tolist()
    for s, e in zip(seams["seams"], edges):
        assert s["max_abs"] == float(diff[:, max(0, e - 480):e + 480].max())
    energy = float(np.sum(offline.astype(np.float64) ** 2))
    assert seams["snr_db"] == pytest.approx(10 * np.log10(energy / float(np.sum(diff ** 2))))
    with pytest.raises(ValueError, match="differ in length"):
        stream_seams(chunks[:-1], offline)


def test_same_key_same_audio_and_the_shared_hop_exception(case_model):
    """Repeated calls with the same key and options give the same audio, streamed or not; only a hop
    state shared across requests (upstream's quirk) makes a stream depend on the requests before it."""
    case, converted = case_model
    prompt = _prompt(case)
    forced = _codes(converted, 40, 4)
    m = CosyVoice3Model(converted)
    for stream in (False, True):
        first, lengths = _speech(m, forced_tokens=forced, stream=stream, key=5, **prompt)
        again, lengths2 = _speech(m, forced_tokens=forced, stream=stream, key=5, **prompt)
        np.testing.assert_array_equal(first, again)
        assert lengths == lengths2
    quirk = CosyVoice3Model(converted, upstream_hop_quirk=True)
    a, _, trace_a = _traced(quirk, forced_tokens=forced, stream=True, key=5, **prompt)
    b, _, trace_b = _traced(quirk, forced_tokens=forced, stream=True, key=5, **prompt)
    np.testing.assert_array_equal(a, first)  # the first request on a fresh model: the fresh schedule
    assert trace_a.hops.tolist() != trace_b.hops.tolist() and not np.array_equal(a, b)


def test_long_stream_matches_upstream_rerun_and_the_growth_is_the_phase_integral(case_model):
    """>= 8 hops of the default stream (incremental flow, carried vocoder) against upstream's algorithm
    (re-run flow on the prefix, re-run vocoder on all mel) with the same hops.  The mel stays at float32
    rounding, but the audio difference grows hop by hop: the NSF phase integrates the f0 the mel implies
    over every sample.  The error model follows that growth: per chunk, the difference stays within KAPPA
    times how far one-ulp weight probes move the same chunk of the re-run."""
    from cosyjax.hift.generator import hift_inference

    case, converted = case_model
    prompt = _prompt(case)
    base = converted.config.flow.static_chunk_size // converted.config.flow.token_mel_ratio
    forced = _codes(converted, 40 * base + 7, 5)

    def chunks_of(conv, **options):
        trace = Trace(record_mel=True)
        out = [c["tts_speech"] for c in CosyVoice3Model(conv, **options).tts(forced_tokens=forced, stream=True,
                                                                                trace=trace, **prompt)]
        return out, trace

    carried, trace_c = chunks_of(converted)
    rerun, trace_r = chunks_of(converted, flow_carry=False, hift_carry=False)
    probes = [chunks_of(_perturbed(converted, seed), flow_carry=False, hift_carry=False)[0] for seed in (1, 2)]
    assert len(trace_c.hops) >= 8 and [c.shape for c in carried] == [c.shape for c in rerun]
    mel_tol = _chain_tolerance(converted, lambda conv: chunks_of(conv, flow_carry=False)[1].mel)
    np.testing.assert_allclose(trace_c.mel, trace_r.mel, rtol=0, atol=mel_tol)
    errors, sigmas = [], []
    for i, (c, r) in enumerate(zip(carried, rerun)):
        sigma = max(float(np.abs(p[i] - r).max()) for p in probes)
        errors.append(float(np.abs(c - r).max()))
        sigmas.append(sigma)
        assert errors[-1] <= tolerance(sigma, r), (i, errors[-1], sigma)
    # The growth: late chunks differ (and probe) far more than the first, while the mel does not grow.
    assert max(errors[-3:]) > 20 * errors[0] and max(sigmas[-3:]) > 20 * sigmas[0]
    # ... and it is the phase: the f0 of the two mels differs at float32 resolution only.
    f0 = [np.asarray(hift_inference(converted.params["hift"], t.mel, cfg=converted.config.hift,
                                    return_intermediates=True)["f0"]) for t in (trace_c, trace_r)]
    assert np.abs(f0[0] - f0[1]).max() <= 1e-4 * np.abs(f0[1]).max()


def test_output_beyond_the_noise_buffer_is_bounded_before_decoding(case_model, monkeypatch):
    """Prompt + output frames must fit the flow's fixed noise buffer: given tokens that do not fit are
    refused before anything runs, and the LLM's max_len is capped by the room left."""
    case, converted = case_model
    prompt = _prompt(case)
    ratio = converted.config.flow.token_mel_ratio
    p = len(prompt["flow_prompt_speech_tokens"])
    frames = ratio * (p + 20)
    small = dataclasses.replace(converted, buffers={**converted.buffers,
                                                    "flow_rand_noise": converted.buffers["flow_rand_noise"][:, :, :frames]})
    m = CosyVoice3Model(small)

    def no_device(*_a, **_k):
        raise AssertionError("device work started for a request that cannot fit")

    with monkeypatch.context() as mp:
        mp.setattr(model_mod, "flow_inference", no_device)
        with pytest.raises(ValueError, match=rf"21 tokens \+ {p} prompt tokens need {ratio * (p + 21)} mel frames"):
            m.tts(forced_tokens=_codes(converted, 21), **prompt)
        with pytest.raises(ValueError, match="nothing is left to generate"):
            m.tts(forced_tokens=_codes(converted, 2), **{**prompt, "flow_prompt_speech_tokens": _codes(converted, p + 20)})
    seen = []
    real_start = lm.start

    def spy(params, cfg, requests, keys, settings, **kw):
        seen.extend(requests)
        return real_start(params, cfg, requests, keys, settings, **kw)

    monkeypatch.setattr(model_mod.lm, "start", spy)
    a = case.group("tts")
    _, _, trace = _traced(m, text_ids=a["text"][0], prompt_text_ids=a["prompt_text"][0],
                          llm_prompt_speech_tokens=a["llm_prompt_speech_token"][0], **prompt)
    assert seen[0].max_tokens == 20 and lm.length_limits(seen[0])[1] == min(20, 20 * len(a["text"][0]))
    assert len(trace.llm_tokens) <= 20


# --------------------------------------------------------------------------------------------
# PRNG and batching
# --------------------------------------------------------------------------------------------
def test_stream_tokens_equal_offline_tokens_for_same_key(case_model):
    case, converted = case_model
    a = case.group("tts")
    # Every stop id masked before min_len, so the random tiny LLM emits enough tokens to stream.
    sampler = SamplerSettings.from_config(converted.config.llm.sampling, mask_all_stop_ids_before_min_len=True)
    m = CosyVoice3Model(converted, sampler=sampler, upstream_hop_quirk=False)
    kw = dict(text_ids=a["text"][0], prompt_text_ids=a["prompt_text"][0],
              llm_prompt_speech_tokens=a["llm_prompt_speech_token"][0], **_prompt(case))
    tokens = {}
    for key in (1, 2):
        offline = _traced(m, key=key, **kw)[2].llm_tokens
        np.testing.assert_array_equal(_traced(m, key=key, stream=True, **kw)[2].llm_tokens, offline)
        assert len(offline) >= 2 * len(a["text"][0])
        tokens[key] = offline
    assert not np.array_equal(tokens[1][:len(tokens[2])], tokens[2][:len(tokens[1])])  # keys matter


def test_batch_rows_equal_single(case_model):
    case, converted = case_model
    a = case.group("tts")
    prompt = _prompt(case)
    m = CosyVoice3Model(converted)
    requests = [
        dict(forced_tokens=_codes(converted, 9, 4), **prompt),
        dict(text_ids=a["text"][0], prompt_text_ids=a["prompt_text"][0],
             llm_prompt_speech_tokens=a["llm_prompt_speech_token"][0], key=5, **prompt),
        dict(forced_tokens=_codes(converted, 20, 5), speed=1.25, flow_prompt_speech_tokens=prompt[
            "flow_prompt_speech_tokens"][:4], prompt_feat=prompt["prompt_feat"][:8], embedding=-prompt["embedding"]),
    ]
    batch = m.tts_batch(requests)
    for i, r in enumerate(requests):
        single, _ = _speech(m, **r)
        assert batch[i].shape == single.shape, i
        np.testing.assert_allclose(batch[i], single, atol=2e-5, err_msg=f"row {i}")


# --------------------------------------------------------------------------------------------
# small pieces and bad inputs
# --------------------------------------------------------------------------------------------
def test_interpolate_linear_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((1, 37, 5)).astype(np.float32)
    for size in (24, 29, 50, 1):
        ref = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 2, 1)), size=size, mode="linear")
        np.testing.assert_array_equal(interpolate_linear(x, size), ref.numpy().transpose(0, 2, 1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(text_ids=[]), "text is empty"),
    (dict(forced_tokens=[3], stream=True, speed=1.5), "only supported with stream=False"),
    (dict(forced_tokens=[3], speed=0.0), "positive"),
    (dict(forced_tokens=[10 ** 6]), "forced_tokens: ids"),
    (dict(forced_tokens=[]), "forced_tokens is empty"),
    (dict(source_speech_tokens=[1], forced_tokens=[1]), "not both"),
    (dict(forced_tokens=[3], prompt_feat=np.zeros((4, 3), np.float32)), "prompt_feat"),
    (dict(forced_tokens=[3], embedding=np.zeros(3, np.float32)), "embedding"),
    (dict(forced_tokens=[3], key="seed"), "key"),
])
def test_bad_inputs_raise_before_device_work(case_model, monkeypatch, kwargs, match):
    case, converted = case_model
    m = CosyVoice3Model(converted)

    def boom(*_a, **_k):
        raise AssertionError("device work started")

    monkeypatch.setattr(model_mod, "flow_inference", boom)
    monkeypatch.setattr(model_mod.lm, "start", boom)
    base = _prompt(case)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        m.tts(**base)  # raises at call time, not at the first next()


def test_voice_prefix_gives_the_same_tokens_and_audio(case_model):
    """A cached voice's prompt-text prefix (its KV cache, prefilled once): the request prefills only
    the rest of its prompt, and decodes exactly the tokens of the uncached path; the first chunk's
    stage times are in the trace."""
    case, converted = case_model
    a = case.group("tts")
    m = CosyVoice3Model(converted)
    prefix = m.voice_prefix(a["prompt_text"][0])
    for key, stream in ((1, False), (2, True)):
        kw = dict(text_ids=a["text"][0], prompt_text_ids=a["prompt_text"][0],
                  llm_prompt_speech_tokens=a["llm_prompt_speech_token"][0], key=key, stream=stream, **_prompt(case))
        plain, _, t_plain = _traced(m, **kw)
        cached, _, t_cached = _traced(m, **kw, voice_prefix=prefix)
        np.testing.assert_array_equal(t_cached.llm_tokens, t_plain.llm_tokens)
        np.testing.assert_array_equal(cached, plain)
        assert {"prefill", "first_decode_chunk", "first_flow", "first_vocoder", "first_chunk"} <= set(t_cached.timings)
    with pytest.raises(ValueError, match="voice_prefix"):
        m.tts(text_ids=a["text"][0], prompt_text_ids=a["prompt_text"][0][:-1], voice_prefix=prefix, **_prompt(case))
