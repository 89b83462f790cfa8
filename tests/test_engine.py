"""The serving engine (cosyjax/serving/engine.py): batched LLM slots, each request equal to its solo run.

On the committed tiny release: 8 concurrent requests of mixed length and kind (stream and not,
voice conversion) each give exactly their solo ``CosyVoice3Model.tts`` output (same key); so do
requests that start and finish at staggered times, whose rows move (compaction) and whose decode
bucket changes; one request decodes at batch 1; ``decode_rows`` / ``move_row`` themselves; a short
request submitted behind a long one finishes first; cancellation frees the slot; a full queue is
refused with a retry hint; deadlines; bad input refused at submit.
"""

from __future__ import annotations

import io
import threading
import time

import jax
import numpy as np
import pytest

from cosyjax.llm import decode
from cosyjax.model import CosyVoice3Model, Trace
from cosyjax.serving import DeadlineExceeded, Engine, EngineConfig, QueueFull, RequestCancelled
from cosyjax.serving.engine import row_buckets

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


class _ProgramSpy:
    """Records (function name, static arguments, argument specs) of every program a ``ProgramCache``
    runs or compiles (``ProgramCache.__call__`` goes through ``compile``)."""

    def __init__(self, programs):
        self.programs, self.calls = programs, []
        self._compile = programs.compile

    def __call__(self, fn, *args, **static):
        self.calls.append((getattr(fn, "__name__", repr(fn)), static, args))
        return self._compile(fn, *args, **static)

    def of(self, name):
        return [(static, args) for n, static, args in self.calls if n == name]


ENGINE_PROGRAMS = {"decode_rows", "decode_chunk", "move_row", "insert_row", "release_row"}


def _engine_programs(model):
    """How many of the engine's programs (any shapes) the model's cache holds."""
    return sum(p.name in ENGINE_PROGRAMS for p in model.programs.programs())


def test_row_buckets():
    assert row_buckets(1) == [1] and row_buckets(8) == [1, 2, 4, 8] and row_buckets(6) == [1, 2, 4, 6]
    assert row_buckets(4) == [1, 2, 4] and row_buckets(5) == [1, 2, 4, 5]


def test_decode_rows_and_move_row_equal_the_full_decode(model):
    """decode_rows(rows=2) of a 4-row state advances rows 0-1 exactly as decode_chunk over all 4 does
    and leaves rows 2-3 bit for bit; move_row copies a row and leaves the source done."""
    llm, cfg = model.params["llm"], model.config.llm
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size - 300, (4, 16)).astype(np.int32)
    lengths = np.array([5, 9, 16, 3], np.int32)
    static = dict(cfg=cfg, settings=model.sampler, num_steps=7, record_logits=False, precision=model.policy.llm,
                  fixed_trip=None)

    def fresh():
        return decode.prefill(llm, ids, np.zeros_like(ids, bool), lengths, np.full(4, 2, np.int32),
                              np.full(4, 40, np.int32), jax.random.split(jax.random.key(3), 4), cfg=cfg,
                              cache_len=model.cache_len, window=model.sampler.win_size, precision=model.policy.llm)

    def host(state):
        return jax.tree.map(lambda a: np.asarray(jax.random.key_data(a) if jax.dtypes.issubdtype(
            a.dtype, jax.dtypes.prng_key) else a), state)

    full_state, full = decode.decode_chunk(llm, fresh(), **static)
    full_state, full = host(full_state), host(full)
    before = host(fresh())
    part_state, part = decode.decode_rows(llm, fresh(), rows=2, **static)
    part_state, part = host(part_state), host(part)
    assert part.tokens.shape == (2, 7) and part.count.shape == (2,)
    np.testing.assert_array_equal(part.tokens, full.tokens[:2])
    np.testing.assert_array_equal(part.count, full.count[:2])
    for got, want_head, want_tail in zip(jax.tree.leaves(part_state), jax.tree.leaves(full_state),
                                         jax.tree.leaves(before)):
        np.testing.assert_array_equal(got[:2], want_head[:2])
        np.testing.assert_array_equal(got[2:], want_tail[2:])
    # Move row 3 into row 1: row 1 becomes row 3, row 3 is left done, the others untouched.
    moved = host(decode.move_row(fresh(), np.int32(3), np.int32(1)))
    for name in ("valid", "positions", "end_index", "logits", "step", "recent", "min_len", "max_len", "keys"):
        got, want = getattr(moved, name), getattr(before, name)
        np.testing.assert_array_equal(got[[0, 1, 2, 3]], want[[0, 3, 2, 3]], err_msg=name)
    for got, want in zip(jax.tree.leaves(moved.cache), jax.tree.leaves(before.cache)):
        np.testing.assert_array_equal(got, want[[0, 3, 2, 3]])
    assert moved.done.tolist() == [False, False, False, True]
    with pytest.raises(ValueError, match="rows=5"):
        decode.decode_rows(llm, fresh(), rows=5, **static)


def test_staggered_requests_move_rows_and_equal_their_solo_runs(model, monkeypatch):
    """slots=4: A, B, C start together (rows 0-2, bucket 4); B, the shortest, finishes first and C moves
    into its row; D starts once B is done (row 2; C, shorter than D, usually finishes first and D moves
    in turn; A ends alone, at bucket 1).  Every request equals its solo run, the decode ran over the
    row buckets only, and after ``program_specs`` is compiled the engine compiles none of its programs."""
    requests = {"A": _request(model, 41, 10, 10, False), "B": _request(model, 42, 1, 6, True),
                "C": _request(model, 43, 4, 8, True), "D": _request(model, 44, 5, 12, False)}
    solo = {name: _solo(model, kw, st) for name, (kw, st) in requests.items()}
    lengths = {name: len(trace.llm_tokens) for name, (_, trace) in solo.items()}
    base = model.schedule.base
    # What the test needs of these seeds: A and C run several chunks longer than B.
    assert lengths["B"] + 3 * base < min(lengths["A"], lengths["C"]), lengths
    engine = Engine(model, EngineConfig(slots=4))
    for fn, args, static in engine.program_specs():  # a warmed engine: every program it runs is here
        model.programs.compile(fn, *args, **static)
    warmed = _engine_programs(model)
    spy = _ProgramSpy(model.programs)
    monkeypatch.setattr(model.programs, "compile", spy)
    engine.start()
    try:
        traces = {name: Trace() for name in requests}
        handles = {}
        with engine._lock:  # the scheduler admits A, B and C together, in this order (rows 0, 1, 2)
            for name in "ABC":
                kw, st = requests[name]
                handles[name] = engine.submit(**kw, stream=st, trace=traces[name])
        results = {"B": _collect(handles["B"])}
        kw, st = requests["D"]
        handles["D"] = engine.submit(**kw, stream=st, trace=traces["D"])
        for name in "ACD":
            results[name] = _collect(handles[name])
        for name, (chunks, trace) in solo.items():
            np.testing.assert_array_equal(traces[name].llm_tokens, trace.llm_tokens, err_msg=name)
            got = results[name]
            assert [c.shape for c in got] == [c.shape for c in chunks], name
            for a, b in zip(got, chunks):
                np.testing.assert_array_equal(a, b, err_msg=name)
        buckets = [static["rows"] for static, _ in spy.of("decode_rows")]
        assert buckets[0] == 4 and set(buckets) <= {1, 2, 4}, buckets
        moves = spy.of("move_row")
        assert moves and [(int(s), int(d)) for _, (_, s, d) in moves][0] == (2, 1), moves
        for static, (_, state) in spy.of("decode_rows"):
            assert state.done.shape == (4,)  # the slot state; only its first rows decode
        assert not spy.of("decode_chunk")
        assert _engine_programs(model) == warmed  # nothing of the engine's compiled after program_specs
        stats = engine.stats()
        assert stats["completed"] == 4 and stats["failed"] == 0 and stats["slots_busy"] == 0
    finally:
        engine.shutdown()


def test_one_request_decodes_at_batch_one(model, monkeypatch):
    spy = _ProgramSpy(model.programs)
    monkeypatch.setattr(model.programs, "compile", spy)
    engine = Engine(model, EngineConfig(slots=4)).start()
    try:
        kw, _ = _request(model, 51, 8, 9, True)
        got = _collect(engine.submit(**kw, stream=True))
    finally:
        engine.shutdown()
    runs = spy.of("decode_rows")
    assert len(runs) >= 2 and all(static["rows"] == 1 for static, _ in runs), [s["rows"] for s, _ in runs]
    assert not spy.of("decode_chunk")  # never the decode over all 4 slots
    program = model.programs.compile(decode.decode_rows, *runs[0][1], **runs[0][0])
    assert program.static["rows"] == 1
    want, _ = _solo(model, kw, True)
    assert [c.shape for c in got] == [c.shape for c in want]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


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


def test_flow_and_vocoder_run_on_worker_threads_one_feed_per_request_at_a_time(model, monkeypatch):
    """Each request's flow/vocoder work (``RequestRun.feed``) runs on the engine's worker threads, beside
    the scheduler thread's LLM decode, never on it; a request's feeds run one at a time, in order (so
    its chunks equal its solo run's)."""
    from cosyjax.request import RequestRun

    calls, lock = [], threading.Lock()
    real = RequestRun.feed

    def feed(self, new, llm_done):
        start = time.perf_counter()
        try:
            return real(self, new, llm_done)
        finally:
            with lock:
                calls.append((id(self), threading.current_thread().name, start, time.perf_counter()))

    monkeypatch.setattr(RequestRun, "feed", feed)
    requests = [_request(model, 20 + i, 2 + 2 * i, 6 + i, bool(i % 2)) for i in range(4)]
    solo = [_solo(model, kw, st)[0] for kw, st in requests]
    calls.clear()
    engine = Engine(model, EngineConfig(slots=4, workers=2)).start()
    try:
        handles = [engine.submit(**kw, stream=st) for kw, st in requests]
        got = [_collect(h) for h in handles]
    finally:
        engine.shutdown()
    for a, b in zip(got, solo):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert calls and all(name.startswith("cosyjax-vocoder") for _, name, _, _ in calls), {c[1] for c in calls}
    runs = {}
    for run, _, start, end in calls:
        runs.setdefault(run, []).append((start, end))
    assert len(runs) == len(requests)
    for spans in runs.values():  # one feed of a request at a time
        spans.sort()
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:]))


def test_engine_config_refuses_no_workers():
    with pytest.raises(ValueError, match="workers"):
        EngineConfig(workers=0)
