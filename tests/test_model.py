"""CosyVoice3Model orchestration: modes, stream schedule, silent filter, PRNG, batching, parity."""

from __future__ import annotations

import numpy as np
import pytest

from cosyjax import model as model_mod
from cosyjax.llm import lm
from cosyjax.llm.sampling import SamplerSettings
from cosyjax.model import CosyVoice3Model, HopState, SilentTokenFilter, Trace, interpolate_linear
from cosyjax.parity.case import load_case
from cosyjax.parity.compare import format_comparison
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
    assert seen == [lm.LMRequest.zero_shot(text, prompt_text, prompt_speech), lm.LMRequest.cross_lingual(text),
                    lm.LMRequest.instruct2(text, prompt_text[:3])]


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


def test_stream_audio_close_to_offline(case_model):
    """Stream chunks (chunk-masked flow) differ from offline only by the streaming attention."""
    case, converted = case_model
    m = CosyVoice3Model(converted, upstream_hop_quirk=False)
    forced = _codes(converted, 24, 3)
    offline, _ = _speech(m, forced_tokens=forced, **_prompt(case))
    streamed, lengths = _speech(m, forced_tokens=forced, stream=True, **_prompt(case))
    assert len(lengths) > 1 and streamed.shape == offline.shape
    assert np.isfinite(streamed).all()


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
