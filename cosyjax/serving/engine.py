"""The serving engine: many requests share one device, their LLM decodes batched in fixed slots.

Design (the serving design note in the README summarises it):

- **One scheduler thread owns the device.**  Callers ``submit`` requests (validated at once, on
  the caller's thread: bad input is a ``ValueError`` before anything is queued) and read their
  audio from a ``Handle``; the thread does all device work.
- **LLM: continuous batching in slots** (the shape of JetStream's engine API: prefill -> insert
  into a decode slot -> generate over the busy slots).  The KV cache is one static
  [slots, S, K, H] array per layer (S from the model's ``Limits``); each row has its own write
  slot, step and rotary position (``cosyjax.llm.decode``).  Between decode chunks, waiting
  requests are prefilled one at a time (batch 1) and inserted into free rows, so a new request
  stalls the running ones by at most its prefill; a finished, cancelled or expired request frees
  its row at the next chunk boundary.  Requests are admitted first come, first served; a short
  request behind a long one runs beside it and finishes first.
- **Only the busy rows decode.**  The n busy rows are kept packed in rows 0..n-1: a new request
  takes row n, and when a row frees up below the last busy one, the last one moves into it
  (``decode.move_row``, a copy: a row carries its own keys, step, positions and cache).  Each chunk
  decodes rows [0, bucket(n)) (``decode.decode_rows``; buckets: powers of two below ``slots``,
  and ``slots``), so one request decodes at batch 1, not at the cost of every slot.
- **After the LLM: each request's ``RequestRun``** (``cosyjax.request``, the same state machine
  ``CosyVoice3Model.tts`` drives): after every decode chunk the new tokens of each row are fed to
  its run, which performs the stream hops (flow + vocoder) those tokens allow, or, non-stream, the
  final flow + vocoder once the LLM is done; voice conversion and forced tokens skip the slots.
- **The LLM overlaps the flow and vocoder** (the shape of sglang-omni's CosyVoice3 scheduler: the
  AR stage beside the flow/HiFT stage).  The feeds run on ``EngineConfig.workers`` worker threads,
  not on the scheduler thread, so the next decode chunk runs while earlier tokens are vocoded, and
  the hops of different requests run side by side (jax releases the GIL while a program runs; on a
  2-core CPU two requests' hops take both cores).  A request's feeds run in order, one at a time
  (its ``_Job.feeds`` queue, one worker task at a time), so its output is what a solo run gives;
  each task runs one feed and queues the next behind the other requests' (round robin, so a new
  request's first chunk does not wait for an old request's backlog).  A row is freed as soon as
  its LLM is done, not when its audio is.
- **Same seed, same output.**  A row's sampling keys are its request's (``fold_in(key, step)``
  with its own step count), its cache and positions are its own and masked rows never mix, so the
  tokens do not depend on what runs beside them, on the bucket they decode in or on the row they
  moved to; the flow and vocoder run per request, on the same programs as a solo
  ``CosyVoice3Model.tts``.
- **Limits**: the model's ``Limits`` (text, prompt, output seconds) are checked at submit; a
  request may carry a deadline; the queue is bounded (``QueueFull``, which servers answer with
  503 + Retry-After).

Each request's chunks are delivered to its ``Handle`` as they are produced (a queue), so a slow
reader never holds up the device.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.llm import decode, lm
from cosyjax.model import CosyVoice3Model
from cosyjax.programs import run as run_program
from cosyjax.request import RequestRun, Trace

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The engine's queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class RequestCancelled(RuntimeError):
    """The request was cancelled before it finished."""


class DeadlineExceeded(TimeoutError):
    """The request did not finish before its deadline."""


class EngineStopped(RuntimeError):
    """The engine shut down before the request finished."""


def row_buckets(slots: int) -> list[int]:
    """The decode batch sizes of an engine with ``slots`` rows: powers of two below ``slots``, then ``slots``."""
    out, n = [], 1
    while n < slots:
        out.append(n)
        n *= 2
    return out + [slots]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Attributes:
      slots: LLM decode rows (requests decoding at once).
      max_pending: requests waiting for a slot beyond which ``submit`` raises ``QueueFull``.
      retry_after: seconds a refused caller is told to wait.
      workers: threads that run the requests' flow and vocoder work beside the LLM decode.
    """

    slots: int = 8
    max_pending: int = 64
    retry_after: float = 1.0
    workers: int = 2

    def __post_init__(self):
        if self.slots < 1 or self.max_pending < 0 or self.workers < 1:
            raise ValueError(f"EngineConfig: slots={self.slots} and workers={self.workers} must be >= 1 and "
                             f"max_pending={self.max_pending} >= 0")


_END = object()


class Handle:
    """One submitted request: iterate over it for its chunks (``{"tts_speech": [1, n]}``), or ``cancel()``.

    Iteration blocks until the next chunk; an error of the request is raised from the iteration.
    Attributes after it finishes: ``trace`` (what it did), ``submitted`` / ``first_chunk`` /
    ``finished`` (``time.monotonic()`` stamps), ``audio_samples``.
    """

    def __init__(self, ident: int, stream: bool, deadline: float | None):
        self.id = ident
        self.stream = stream
        self.deadline = deadline
        self.trace = Trace()
        self.submitted = time.monotonic()
        self.first_chunk: float | None = None
        self.finished: float | None = None
        self.audio_samples = 0
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Stop the request at the next chunk boundary (its slot is freed)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # the scheduler's side
    def _put(self, chunk: dict[str, np.ndarray]) -> None:
        if self.first_chunk is None:
            self.first_chunk = time.monotonic()
        self.audio_samples += int(np.shape(chunk["tts_speech"])[-1])
        self._queue.put(chunk)

    def _end(self, error: BaseException | None = None) -> None:
        self.finished = time.monotonic()
        self._queue.put(error if error is not None else _END)


class HandleGroup(list):
    """The handles of one caller's requests (a pipeline call submits one per text segment; see
    ``Engine.collect_handles``).  ``cancel()`` cancels every request in it, and any added afterwards
    as soon as it is added, so a server can stop a whole call when its client goes away."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self.cancelled = False

    def append(self, handle: Handle) -> None:
        with self._lock:
            super().append(handle)
            if self.cancelled:
                handle.cancel()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            handles = list(self)
        for handle in handles:  # a finished request ignores it
            handle.cancel()


@dataclasses.dataclass(eq=False)
class _Job:
    """One admitted request.  ``slot``: its decode row (scheduler thread only).  ``feeds``: LLM tokens
    waiting for the flow/vocoder, ``draining``: a worker is running them, ``abort``: stop before the
    next feed, ``ended``: its handle has ended (these four under the engine's lock)."""

    handle: Handle
    run: RequestRun
    slot: int | None = None
    feeds: collections.deque = dataclasses.field(default_factory=collections.deque)
    draining: bool = False
    abort: BaseException | None = None
    ended: bool = False


@dataclasses.dataclass
class EngineMetrics:
    """Counters and recent latencies (the server exports them)."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    tokens: int = 0
    audio_seconds: float = 0.0
    first_chunk_seconds: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=1024))
    rtf: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=1024))


class Engine:
    """Batches requests for one ``CosyVoice3Model`` (see the module docstring).

    Usage::

        engine = Engine(model).start()
        handle = engine.submit(text_ids=..., flow_prompt_speech_tokens=..., prompt_feat=..., embedding=...,
                               stream=True, key=0)
        for chunk in handle: ...
        engine.shutdown()

    ``engine.tts(**kwargs)`` is a drop-in for ``model.tts`` that runs through the engine.
    ``device``: the device the model's arrays live on (the scheduler thread runs there).
    """

    def __init__(self, model: CosyVoice3Model, config: EngineConfig | None = None, *, device: Any = None):
        self.model = model
        self.device = device
        self.config = config or EngineConfig()
        self.metrics = EngineMetrics()
        self._pending: collections.deque[_Job] = collections.deque()
        self._jobs: list[_Job] = []  # admitted: decoding in a slot, or running without the LLM
        self._rows: list[_Job] = []  # the busy decode rows, packed: self._rows[r].slot == r
        self._buckets = row_buckets(self.config.slots)
        self._state: decode.DecodeState | None = None
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._stopping = False
        self._accepting = True
        self._local = threading.local()  # per caller thread: the lists collect_handles() fills

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        if self._thread is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.config.workers, "cosyjax-vocoder")
            self._thread = threading.Thread(target=self._loop, name="cosyjax-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, drain_seconds: float = 30.0) -> None:
        """Refuse new requests, let the running and queued ones finish for up to ``drain_seconds``,
        then stop: whatever is left ends with ``EngineStopped``."""
        with self._lock:
            self._accepting = False
            self._lock.notify_all()
        end = time.monotonic() + max(0.0, drain_seconds)
        while time.monotonic() < end:
            with self._lock:
                if not self._pending and not self._jobs:
                    break
            time.sleep(0.02)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        stopped = EngineStopped("the engine shut down before this request finished")
        for job in list(self._jobs):  # a worker ends its job after the feed it is running
            self._stop(job, stopped)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for job in list(self._pending) + list(self._jobs):
            self._end(job, stopped)
        with self._lock:
            self._pending.clear()
            self._jobs.clear()
            self._rows.clear()

    def warmup(self, **kwargs: Any):
        """``model.warmup`` plus the engine's own programs (``program_specs``)."""
        report = self.model.warmup(**kwargs)
        for fn, args, static in self.program_specs():
            self.model.programs.compile(fn, *args, **static)
        return dataclasses.replace(report, total=len(self.model.programs))

    def program_specs(self) -> list[tuple]:
        """The engine's own programs as (fn, arg specs, static) (``cosyjax.programs``): the all-done
        prefill of the slot state, the decode of each row bucket, and row insert/release/move."""
        model = self.model

        def llm_programs(batch):  # [prefill of the shortest bucket, decode chunk] at this batch
            return lm.programs(model.config.llm, model.params["llm"], max_prefill=1, cache_len=model.cache_len,
                               settings=model.sampler, chunk_size=model.schedule.base, batch=batch,
                               precision=model.policy.llm)

        slots, single = llm_programs(self.config.slots), llm_programs(1)
        _, (params, state), static = slots[-1]  # decode_chunk at the slot batch: its arguments
        row = single[-1][1][1]  # a batch-1 state
        slot = jax.ShapeDtypeStruct((), jnp.int32)
        return (slots[:-1] + [(decode.decode_rows, (params, state), {**static, "rows": rows}) for rows in self._buckets]
                + [(decode.insert_row, (state, row, slot), {}), (decode.release_row, (state, slot), {}),
                   (decode.move_row, (state, slot, slot), {})])

    # ------------------------------------------------------------------ submitting
    def submit(self, *, stream: bool = False, deadline_seconds: float | None = None, trace: Trace | None = None,
               **request: Any) -> Handle:
        """Queue one request (``CosyVoice3Model.tts``'s keyword arguments); returns its ``Handle``.

        Raises (on the caller's thread, before queueing): ``ValueError`` for a bad or out-of-limits
        request (``CosyVoice3Model``'s messages), ``QueueFull`` when ``max_pending`` requests wait,
        ``EngineStopped`` after ``shutdown``.
        """
        model = self.model
        req = model._request(request.pop("text_ids", ()), request.pop("prompt_text_ids", ()),
                             request.pop("llm_prompt_speech_tokens", ()), request.pop("flow_prompt_speech_tokens", ()),
                             request.pop("prompt_feat", None), request.pop("embedding", None),
                             request.pop("source_speech_tokens", None), request.pop("forced_tokens", None),
                             request.pop("speed", 1.0), request.pop("key", None), stream,
                             request.pop("voice_prefix", None))
        if request:
            raise ValueError(f"unknown argument(s) {sorted(request)}")
        if deadline_seconds is not None and not deadline_seconds > 0:
            raise ValueError(f"deadline_seconds={deadline_seconds!r}: expected a positive number of seconds")
        handle = Handle(next(self._ids), stream,
                        None if deadline_seconds is None else time.monotonic() + float(deadline_seconds))
        if trace is not None:
            handle.trace = trace
        job = _Job(handle, model.start_run(req, handle.trace, stream=stream))
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the engine is shutting down")
            if len(self._pending) >= self.config.max_pending:
                self.metrics.rejected += 1
                raise QueueFull(f"{len(self._pending)} requests are waiting (max_pending="
                                f"{self.config.max_pending})", self.config.retry_after)
            self._pending.append(job)
            self.metrics.submitted += 1
            self._lock.notify_all()
        for sink in tuple(getattr(self._local, "sinks", ())):
            sink.append(handle)
        if self._thread is None:
            self.start()
        return handle

    @contextlib.contextmanager
    def collect_handles(self, into: list | None = None) -> Iterator[list[Handle]]:
        """Inside the block, the handles of the requests this thread submits are appended to the
        yielded list (``into``, or a new ``HandleGroup``): how a server reaches the requests a pipeline
        call made (one per text segment), to ``cancel()`` them when its client goes away.  Blocks may nest."""
        handles: list[Handle] = HandleGroup() if into is None else into
        sinks = self._local.__dict__.setdefault("sinks", [])
        sinks.append(handles)
        try:
            yield handles
        finally:  # by identity: the list may be closed from another thread (a collected generator)
            for i, sink in enumerate(sinks):
                if sink is handles:
                    del sinks[i]
                    break

    def tts(self, *, stream: bool = False, **request: Any) -> Iterator[dict[str, np.ndarray]]:
        """``CosyVoice3Model.tts`` through the engine: the same chunks for the same request."""
        trace = request.pop("trace", None)
        if request.pop("hop_state", None) is not None:
            raise ValueError("hop_state: the engine gives every request the fresh stream schedule")
        handle = self.submit(stream=stream, trace=trace, **request)
        try:
            yield from handle
        finally:
            if handle.finished is None:
                handle.cancel()

    def stats(self) -> dict[str, Any]:
        """Queue depth, busy slots and the counters (a snapshot)."""
        with self._lock:
            m = self.metrics
            return {"pending": len(self._pending), "active": len(self._jobs),
                    "slots": self.config.slots, "slots_busy": len(self._rows),
                    "submitted": m.submitted, "completed": m.completed, "failed": m.failed,
                    "cancelled": m.cancelled, "rejected": m.rejected, "tokens": m.tokens,
                    "audio_seconds": m.audio_seconds}

    # ------------------------------------------------------------------ the scheduler
    def _free_rows(self, batch: int) -> decode.DecodeState:
        """A decode state of ``batch`` rows that are all done (free slots), at the model's cache length:
        the prefill of one-token dummy prompts with max_len 0."""
        model = self.model
        ids = np.zeros((batch, lm.bucket(1)), np.int32)
        rows = np.zeros((batch,), np.int32)
        return run_program(model.programs, decode.prefill, model.params["llm"], ids, ids.astype(bool), rows + 1,
                           rows, rows, jax.random.split(jax.random.key(0), batch), cfg=model.config.llm,
                           cache_len=model.cache_len, window=model.sampler.win_size, precision=model.policy.llm)

    def _loop(self) -> None:
        if self.device is not None:  # the default device is per thread: this one does the device work
            with jax.default_device(self.device):
                self._serve()
        else:
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._lock:
                # Nothing to decode or admit: sleep until a submit or a job's end, waking now and then
                # while jobs are being vocoded to apply their cancellations and deadlines.
                while not self._stopping and not self._rows and not self._admissible():
                    self._lock.wait(timeout=0.05 if self._jobs else None)
                    if self._jobs:
                        break
                if self._stopping:
                    return
            try:
                self._admit()
                self._step()
            except Exception as e:  # a bug in the engine itself: fail what decodes, keep serving
                log.exception("engine step failed")
                self._state = None  # it may have been donated to the failed call: every row is freed
                with self._lock:
                    rows, self._rows = list(self._rows), []
                for job in rows:
                    job.slot = None
                    self._stop(job, e)

    def _admissible(self) -> bool:
        """A pending request can be admitted now (caller holds the lock)."""
        if not self._pending:
            return False
        return not self._pending[0].run.req.uses_llm or len(self._rows) < self.config.slots

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._admissible():
                    return
                job = self._pending.popleft()
                self._jobs.append(job)
            if job.handle.cancelled or self._late(job):
                self._stop(job, self._stop_reason(job))
                continue
            try:
                if job.run.req.uses_llm:
                    self._insert(job)
                else:  # voice conversion / forced tokens: no LLM, no slot
                    req = job.run.req
                    self._feed(job, req.source_speech if req.source_speech is not None else req.forced_tokens, True)
            except Exception as e:
                self._stop(job, e)

    def _insert(self, job: _Job) -> None:
        model = self.model
        if self._state is None:
            self._state = self._free_rows(self.config.slots)
        row = model.prefill(job.run.req)
        slot = len(self._rows)  # the busy rows stay packed: the new one goes after them
        self._state = run_program(model.programs, decode.insert_row, self._state, row, np.int32(slot))
        job.slot = slot
        with self._lock:
            self._rows.append(job)

    def _step(self) -> None:
        for job in list(self._rows):  # a request that failed on a worker frees its row
            if job.ended:
                self._free_row(job)
        for job in list(self._jobs):  # cancelled and expired requests stop, freeing their row first
            if not job.ended and (job.handle.cancelled or self._late(job)):
                if job.slot is not None:
                    self._free_row(job)
                self._stop(job, self._stop_reason(job))
        decoding = list(self._rows)  # row r of this chunk is decoding[r]
        if not decoding:
            return
        model = self.model
        rows = next(b for b in self._buckets if b >= len(decoding))
        self._state, chunk = run_program(model.programs, decode.decode_rows, model.params["llm"], self._state,
                                         rows=rows, cfg=model.config.llm, settings=model.sampler,
                                         num_steps=model.schedule.base, record_logits=False,
                                         precision=model.policy.llm, fixed_trip=None)
        tokens, counts = np.asarray(chunk.tokens), np.asarray(chunk.count)
        done = np.asarray(self._state.done)
        for row, job in enumerate(decoding):
            new = tokens[row, :counts[row]]
            self.metrics.tokens += int(new.size)
            self._feed(job, new, bool(done[row]))
        for row, job in enumerate(decoding):  # a row whose LLM is done is free now (its audio may follow)
            if done[row] and job.slot is not None:
                self._free_row(job)

    # ------------------------------------------------------------------ flow + vocoder, on the workers
    def _feed(self, job: _Job, tokens: Any, llm_done: bool) -> None:
        """Queue LLM tokens for ``job``'s run; a worker drains its queue in order."""
        with self._lock:
            if job.ended:
                return
            job.feeds.append((tokens, llm_done))
            if job.draining:
                return
            job.draining = True
        self._submit_drain(job)

    def _drain(self, job: _Job) -> None:
        """Run ``job``'s next queued feed and deliver its chunks; while more are queued, queue itself again
        behind the other requests' work (round robin: a request with a backlog of tokens does not hold a
        worker while a new request waits for its first chunk).  One task per job at a time, so its feeds
        run in order."""
        with self._lock:
            if job.handle.cancelled and job.abort is None:
                job.abort = RequestCancelled("cancelled")
            if job.ended or job.abort is not None or not job.feeds:
                job.draining = False
                stop = None if job.ended else job.abort
                if stop is None:
                    return
            else:
                stop = None
                tokens, llm_done = job.feeds.popleft()
        if stop is not None:
            self._end(job, stop)
            return
        try:
            with jax.default_device(self.device) if self.device is not None else contextlib.nullcontext():
                chunks = job.run.feed(tokens, llm_done)
        except Exception as e:  # this request's own failure (its row is freed by the scheduler)
            with self._lock:
                job.draining = False
            self._end(job, e)
            return
        for chunk in chunks:
            job.handle._put(chunk)
        with self._lock:
            more = not job.run.finished and (bool(job.feeds) or job.abort is not None or job.handle.cancelled)
            if not more:
                job.draining = False
        if job.run.finished:
            self._end(job, None)
        elif more:
            self._submit_drain(job)

    def _submit_drain(self, job: _Job) -> None:
        try:
            self._pool.submit(self._drain, job)
        except (RuntimeError, AttributeError):  # the pool is shut down (engine shutdown): stop here
            with self._lock:
                job.draining = False
            self._end(job, EngineStopped("the engine shut down before this request finished"))

    def _late(self, job: _Job) -> bool:
        return job.handle.deadline is not None and time.monotonic() > job.handle.deadline

    def _stop_reason(self, job: _Job) -> BaseException:
        if job.handle.cancelled:
            return RequestCancelled("cancelled")
        return DeadlineExceeded(f"request {job.handle.id} missed its deadline")

    def _stop(self, job: _Job, error: BaseException) -> None:
        """End ``job`` with ``error``: now, or, while a worker runs one of its feeds, after that feed."""
        with self._lock:
            if job.ended:
                return
            if job.abort is None:
                job.abort = error
            if job.draining:
                return
        self._end(job, error)

    def _free_row(self, job: _Job) -> None:
        """Free ``job``'s decode row, keeping the busy rows packed: the last busy row moves into it
        (``move_row`` leaves the last row done), or, when it is the last, it is marked done."""
        slot, last = job.slot, len(self._rows) - 1
        assert self._rows[slot] is job, (slot, job.handle.id)
        programs = self.model.programs
        if slot != last:
            moved = self._rows[last]
            if self._state is not None:
                self._state = run_program(programs, decode.move_row, self._state, np.int32(last), np.int32(slot))
            moved.slot = slot
            with self._lock:
                self._rows[slot] = moved
                self._rows.pop()
        else:
            if self._state is not None and not np.asarray(self._state.done)[slot]:
                self._state = run_program(programs, decode.release_row, self._state, np.int32(slot))
            with self._lock:
                self._rows.pop()
        job.slot = None

    def _end(self, job: _Job, error: BaseException | None) -> None:
        """The request is over (any thread; once): count it and end its handle.  Its decode row, if it
        still has one, is freed by the scheduler at its next step (``job.ended``)."""
        with self._lock:
            if job.ended:
                return
            job.ended = True
            if job in self._jobs:
                self._jobs.remove(job)
            self._count(job, error)
            self._lock.notify_all()
        job.handle._end(error)

    def _count(self, job: _Job, error: BaseException | None) -> None:
        m = self.metrics
        if error is None:
            m.completed += 1
            seconds = job.handle.audio_samples / self.model.config.sample_rate
            m.audio_seconds += seconds
            if job.handle.first_chunk is not None:
                m.first_chunk_seconds.append(job.handle.first_chunk - job.handle.submitted)
            if seconds > 0:
                m.rtf.append((time.monotonic() - job.handle.submitted) / seconds)
        elif isinstance(error, RequestCancelled):
            m.cancelled += 1
        else:
            m.failed += 1


__all__ = ["DeadlineExceeded", "Engine", "EngineConfig", "EngineMetrics", "EngineStopped", "Handle", "HandleGroup",
           "QueueFull", "RequestCancelled", "row_buckets"]
