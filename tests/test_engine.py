"""The serving engine (cosyjax/serving/engine.py): batched LLM slots, each request equal to its solo run.

On the committed tiny release: 8 concurrent requests of mixed length and kind (stream and not,
voice conversion) each give exactly their solo ``CosyVoice3Model.tts`` output (same key); a short
request submitted behind a long one finishes first; cancellation frees the slot; a full queue is
refused with a retry hint; deadlines; bad input refused at submit.
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

from cosyjax.model import CosyVoice3Model, Trace
from cosyjax.serving import DeadlineExceeded, Engine, EngineConfig, QueueFull, RequestCancelled

from conftest import TINY_PROMPT_TEXT, voice_wav_bytes


@pytest.fixture(scope="module")
def model(tiny_converted):
    from cosyjax.checkpoint import load_converted

    return CosyVoice3Model(load_converted(tiny_converted))


def _request(model, seed, text_len, prompt_len, stream):
    rng = np.random.default_rng(seed)
    cfg = model.config
    kw = dict(text_ids=rng.integers(0, cfg.llm.vocab_size - 300, text_len),
              prompt_text_ids=rng.integers(0, cfg.llm.vocab_size - 300, 3),
              llm_prompt_speech_tokens=rng.integers(0, cfg.flow.vocab_size, prompt_len),
              flow_prompt_speech_tokens=rng.integers(0, cfg.flow.vocab_size, prompt_len),
              prompt_feat=rng.standard_normal((2 * prompt_len, cfg.flow.output_size)).astype(np.float32),
              embedding=rng.standard_normal(cfg.flow.spk_embed_dim).astype(np.float32), key=seed)
    return kw, stream


def _solo(model, kw, stream):
    trace = Trace()
    chunks = [c["tts_speech"] for c in model.tts(**kw, stream=stream, trace=trace)]
    return chunks, trace


def _collect(handle):
    return [c["tts_speech"] for c in handle]


def test_concurrent_requests_equal_their_solo_runs(model):
    cfg = model.config
    requests = [_request(model, s, t, p, st) for s, t, p, st in
                [(1, 3, 8, False), (2, 9, 20, True), (3, 1, 5, True), (4, 6, 12, False),
                 (5, 2, 30, True), (6, 8, 4, False), (7, 4, 16, True)]]
    vc = dict(source_speech_tokens=np.random.default_rng(8).integers(0, cfg.flow.vocab_size, 40),
              flow_prompt_speech_tokens=np.arange(6), prompt_feat=np.zeros((12, cfg.flow.output_size), np.float32),
              embedding=np.ones(cfg.flow.spk_embed_dim, np.float32))
    requests.append((vc, True))
    solo = [_solo(model, kw, st) for kw, st in requests]
    engine = Engine(model, EngineConfig(slots=4)).start()
    try:
        traces = [Trace() for _ in requests]
        handles = [engine.submit(**kw, stream=st, trace=tr) for (kw, st), tr in zip(requests, traces)]
        results = [None] * len(handles)

        def read(i):
            results[i] = _collect(handles[i])

        threads = [threading.Thread(target=read, args=(i,)) for i in range(len(handles))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        for i, ((chunks, trace), got, tr) in enumerate(zip(solo, results, traces)):
            np.testing.assert_array_equal(tr.llm_tokens, trace.llm_tokens, err_msg=f"request {i}")
            assert [c.shape for c in got] == [c.shape for c in chunks], i
            for a, b in zip(got, chunks):
                np.testing.assert_array_equal(a, b, err_msg=f"request {i}")  # the same programs on the same tokens
        stats = engine.stats()
        assert stats["completed"] == len(requests) and stats["failed"] == 0 and stats["slots_busy"] == 0
    finally:
        engine.shutdown()


def test_short_behind_long_finishes_first_and_cancel_frees_the_slot(model):
    engine = Engine(model, EngineConfig(slots=2)).start()
    try:
        long_kw, _ = _request(model, 11, 30, 10, False)
        short_kw, _ = _request(model, 12, 1, 10, False)
        long = engine.submit(**long_kw)
        short = engine.submit(**short_kw)
        _collect(short)
        assert long.finished is None or short.finished < long.finished
        _collect(long)
        assert short.finished < long.finished
        # Cancellation: a stream request cancelled after its first chunk frees its slot.
        kw, _ = _request(model, 13, 30, 10, True)
        handle = engine.submit(**kw, stream=True)
        it = iter(handle)
        next(it)
        handle.cancel()
        with pytest.raises(RequestCancelled):
            for _ in it:
                pass
        deadline = time.monotonic() + 30
        while engine.stats()["slots_busy"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["slots_busy"] == 0 and engine.stats()["cancelled"] == 1
    finally:
        engine.shutdown()


def test_limits_queue_and_deadline(model):
    engine = Engine(model, EngineConfig(slots=1, max_pending=1, retry_after=2.5)).start()
    try:
        kw, _ = _request(model, 21, 20, 8, False)
        with pytest.raises(ValueError, match="text_ids: 401 tokens exceed the limit of 400"):
            engine.submit(**{**kw, "text_ids": np.zeros(401, np.int64)})
        with pytest.raises(ValueError, match="unknown argument"):
            engine.submit(**kw, colour="blue")
        first = engine.submit(**kw)
        deadline = time.monotonic() + 60
        while not engine.stats()["slots_busy"] and time.monotonic() < deadline:  # the first holds the one slot
            time.sleep(0.005)
        second = engine.submit(**kw)  # waits for the slot
        with pytest.raises(QueueFull) as refused:
            engine.submit(**kw)
        assert refused.value.retry_after == 2.5 and engine.stats()["rejected"] == 1
        _collect(first)
        _collect(second)
        late = engine.submit(**kw, deadline_seconds=1e-6)
        with pytest.raises(DeadlineExceeded):
            _collect(late)
    finally:
        engine.shutdown()


def test_engine_tts_is_a_drop_in_for_model_tts(model):
    engine = Engine(model).start()
    try:
        kw, _ = _request(model, 31, 5, 9, True)
        got = [c["tts_speech"] for c in engine.tts(**kw, stream=True)]
        want, _ = _solo(model, kw, True)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    finally:
        engine.shutdown()


def test_pipeline_through_the_engine_gives_the_same_audio(tts):
    wav = io.BytesIO(voice_wav_bytes())
    direct = np.concatenate([c["tts_speech"] for c in tts.inference_zero_shot("Hello there.", TINY_PROMPT_TEXT,
                                                                               wav, stream=True, seed=4)], axis=1)
    engine = tts.use_engine(EngineConfig(slots=2))
    try:
        wav.seek(0)
        served = np.concatenate([c["tts_speech"] for c in tts.inference_zero_shot("Hello there.", TINY_PROMPT_TEXT,
                                                                                   wav, stream=True, seed=4)], axis=1)
    finally:
        engine.shutdown()
        tts.engine = None
    np.testing.assert_array_equal(served, direct)
