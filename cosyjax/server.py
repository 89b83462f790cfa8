"""HTTP server: upstream's FastAPI wire format (``runtime/python/fastapi/server.py``, SPEC §9.1), an
OpenAI-compatible speech route, a speaker registry and Prometheus metrics, on the batching engine.

Routes (upstream's accept GET and POST with multipart form fields, as upstream's do):

=============================  ==============================================================
``/inference_zero_shot``       ``tts_text``, ``prompt_text``, file ``prompt_wav``
``/inference_cross_lingual``   ``tts_text``, file ``prompt_wav``
``/inference_instruct2``       ``tts_text``, ``instruct_text``, file ``prompt_wav``
``/inference_vc``              file ``source_wav``, file ``prompt_wav`` (not in upstream's server)
``/inference_sft``             501: CosyVoice3 has no SFT speakers
``/inference_instruct``        501: CosyVoice3 has no v1 instruct mode (use instruct2)
``POST /v1/audio/speech``      OpenAI's speech API (JSON; :mod:`cosyjax.serving.openai`)
``POST /speakers``             register a voice: file ``prompt_wav``, ``prompt_text``, optional ``spk_id``
``GET /speakers``              JSON ``{"speakers": [ids]}``
``POST /synthesize``           JSON ``text``, ``prompt_text``, ``prompt_audio``, ``speed``, ``seed`` -> wav
``GET /metrics``               Prometheus text format (:mod:`cosyjax.serving.metrics`)
``GET /health``                JSON: sample rate, sample format, dtype, backend, speakers, engine stats
=============================  ==============================================================

Optional fields of the upstream routes beyond upstream's: ``stream`` (bool, default false: upstream's
server calls the model with its defaults), ``seed`` (int, default 0; not on vc, whose pipeline call
takes none), ``speed`` (float, default 1, non-stream only) and, on the three text routes, ``spk_id``:
a registered voice that replaces ``prompt_wav`` (zero-shot also takes its transcript from the
cache); ``language`` and ``strict_prompt`` (bool), the pipeline's ``language`` / ``strict``.
CosyVoice3 expects ``<|endofprompt|>`` in ``prompt_text``, in ``instruct_text`` and, for
cross-lingual, in ``tts_text``; without it the pipeline builds the prompt
(``cosyjax.pipeline.build_prompt``, logged as a warning), or answers 400 with ``strict_prompt=true``.

Response body of the upstream routes: headerless int16 little-endian mono PCM at the model rate
(24 kHz), one chunk per model yield, produced as upstream's ``(x * 2**15).astype(int16)``
(truncation toward zero; values outside [-1, 1) are clipped instead of wrapping around).  Extra
headers ``X-Sample-Rate``, ``X-Channels`` and ``X-Sample-Format`` (``s16le``) describe it.
``/synthesize`` and ``/v1/audio/speech`` send the same samples as a 16-bit wav (or flac, mp3, pcm).

Errors are JSON ``{"detail": ...}``, sent before any audio byte (input is checked and the first
chunk synthesised before the 200 status): 400 for bad input (an empty or whitespace-only or too long
text field, missing or undecodable audio, named by form field and file name, an unknown speaker),
401 without the API key, 409 for a speaker id already taken, 413 for an oversized upload, 422 for a
value of the wrong type (FastAPI's message), 503 with ``Retry-After`` when the server or the engine
queue is full or the server is shutting down.

``prompt_audio`` of ``/synthesize`` is, in this order: a registered speaker id (zero-shot with its
cached transcript; ``prompt_text`` is then ignored); a file name (it has a ``.``) inside the
server's ``--prompt-dir`` (absolute paths, ``..`` and symlinks leading out of the directory are
refused); else base64 of an audio file (a ``data:...;base64,`` prefix is accepted).

Concurrency: every request runs on its own thread, which drives the pipeline's generator; the
pipeline submits each text segment to the shared :class:`cosyjax.serving.Engine` (started with
``CosyVoice3.use_engine``), which batches the LLM decode of all running requests in its slots, so a
short request behind a long one finishes first, and each request's audio equals its solo run with
the same seed (tests/test_server.py).  Chunks are queued to the connection as they are produced, so
a slow client does not hold up the device.  A client that disconnects cancels its request (its
engine handle; the slot is freed at the next decode chunk).  Beyond ``max_pending`` requests in
flight, or when the engine's queue is full (``QueueFull``), the answer is 503 with ``Retry-After``.
On shutdown the server refuses new requests, lets in-flight ones finish for up to
``drain_seconds``, then cancels the rest and stops the engine.

Security defaults (``cosyjax serve``): listens on 127.0.0.1; no CORS headers unless origins are
given (never with credentials); with an API key every route but ``/health`` needs
``Authorization: Bearer KEY`` (401 with ``WWW-Authenticate: Bearer`` otherwise).

Example (``cosyjax serve --model-dir pretrained_models/Fun-CosyVoice3-0.5B --port 50000``)::

    curl -sS -X POST http://localhost:50000/inference_zero_shot \\
        -F 'tts_text=Hello, this is a test.' \\
        -F 'prompt_text=You are a helpful assistant.<|endofprompt|>Transcript of the prompt.' \\
        -F 'prompt_wav=@prompt.wav' -F stream=true --output out.pcm
    sox -t raw -r 24000 -e signed -b 16 -c 1 -L out.pcm out.wav

    curl -sS http://localhost:50000/speakers -F spk_id=alice -F prompt_wav=@prompt.wav \\
        -F 'prompt_text=You are a helpful assistant.<|endofprompt|>Transcript of the prompt.'
    curl -sS http://localhost:50000/v1/audio/speech -H 'Content-Type: application/json' \\
        -d '{"model": "cosyvoice3", "input": "Hello!", "voice": "alice"}' --output out.wav
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import itertools
import logging
import math
import os
import re
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator

import numpy as np

INSTALL_HINT = ('the cosyjax server needs fastapi, uvicorn, python-multipart and prometheus-client: '
                'pip install "cosyjax[server]"')

try:
    from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel

    from cosyjax.serving.metrics import MetricsMiddleware, ServerMetrics
except ImportError as e:  # the server is an optional extra
    raise ImportError(INSTALL_HINT) from e

from cosyjax.frontend.audio import load_audio
from cosyjax.serving.engine import (DeadlineExceeded, EngineConfig, EngineStopped, HandleGroup, QueueFull,
                                    RequestCancelled)
from cosyjax.serving.openai import add_routes as add_openai_routes, encode_audio
from cosyjax.serving.fields import DEFAULT_MAX_TEXT_CHARS, check_text_length
from cosyjax.serving.pcm import to_pcm16
from cosyjax.serving.speakers import SPK_ID, SpeakerExists, SpeakerRegistry, check_spk_id

if TYPE_CHECKING:
    from cosyjax.pipeline import CosyVoice3

log = logging.getLogger(__name__)

CHANNELS = 1
SAMPLE_FORMAT = "s16le"
DEFAULT_MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # a 30 s prompt is ~6 MB even as 48 kHz float32 stereo WAV
DEFAULT_MAX_PENDING = 16
DEFAULT_DRAIN_SECONDS = 30.0
OPEN_PATHS = ("/health",)  # reachable without the API key
SFT_MESSAGE = ("CosyVoice3 has no SFT speakers (its release ships no spk2info with pretrained voices): use "
               "/inference_zero_shot with a prompt_wav and prompt_text, or with spk_id of a voice registered on "
               "this server (POST /speakers, cosyjax serve --spkinfo DIR)")
INSTRUCT_MESSAGE = ("CosyVoice3 has no v1 instruct mode (speaker id + instruction): use /inference_instruct2 "
                    "with tts_text, instruct_text and a prompt_wav (or spk_id of a registered voice)")
_DONE = object()  # end-of-stream marker in a job's queue
_SEED_RANGE = (-(2 ** 63), 2 ** 63)  # what jax.random.key accepts
_POLL_SECONDS = 0.25  # how often a waiting request checks that its client is still there
CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; nobody receives it
_BYTESIO = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")

# Form field types (module level: FastAPI resolves the string annotations in this module's globals)
OptText = Annotated[str | None, Form()]
OptFile = Annotated[UploadFile | None, File()]
Stream = Annotated[bool, Form()]
Seed = Annotated[int, Form()]
Speed = Annotated[float, Form()]
SpkId = Annotated[str, Form()]
Language = Annotated[str, Form()]
Strict = Annotated[bool, Form()]


@dataclass(frozen=True)
class _Upload:
    field: str
    filename: str
    data: bytes

    def checked(self) -> bytes:
        """The file's bytes after the §2.1 loader's checks, errors named by form field and file name.

        Loaded at 16 kHz, as the speech tokenizer will (so a rate the pipeline refuses is refused
        here, with the field's name); the pipeline decodes the bytes again at 16 and 24 kHz.
        """
        name = self.filename or "(no file name)"
        src = io.BytesIO(self.data)
        src.name = name
        try:
            load_audio(src, 16000)
        except ValueError as e:
            raise ValueError(f"{self.field}: {_BYTESIO.sub(name, str(e))}") from None
        return self.data


class _Job:
    """One request: a generator factory run on its own thread, audio chunks handed to the event loop."""

    def __init__(self, ident: int, route: str, start: Callable[[], Iterator[dict[str, Any]]],
                 loop: asyncio.AbstractEventLoop):
        self.id = ident
        self.route = route
        self.start = start
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.received = time.monotonic()
        self.first_chunk: float | None = None
        self.samples = 0
        self.outcome = "running"
        # the engine requests its thread submits (Engine.collect_handles), cancelled with the job
        self.handles = HandleGroup()

    def cancel(self) -> None:
        self.cancelled.set()
        self.handles.cancel()

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.cancel()


class _ClientGone(Exception):
    pass


def _prompt_options(language: str, strict_prompt: bool) -> dict[str, Any]:
    """The form's prompt options for the pipeline call, only those set (the defaults stay the pipeline's)."""
    return {name: value for name, value in (("language", language), ("strict", strict_prompt)) if value}


class _BearerAuth:
    """ASGI middleware: every HTTP path but ``OPEN_PATHS`` needs ``Authorization: Bearer <key>``."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse({"detail": "missing or wrong API key: send 'Authorization: Bearer <key>'"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class SynthesizeRequest(BaseModel):
    text: str | None = None
    prompt_text: str | None = None
    prompt_audio: str | None = None
    speed: float = 1.0
    seed: int = 0


class _Server:
    """What the routes share: the model, limits, in-flight requests, speakers, metrics."""

    def __init__(self, model: Any, *, engine: Any, max_text_chars: int, max_upload_bytes: int, max_pending: int,
                 retry_after: float, speakers: SpeakerRegistry, metrics: ServerMetrics, prompt_dir: str | None):
        self.model = model
        self.engine = engine
        self.sample_rate = int(model.sample_rate)
        self.headers = {"X-Sample-Rate": str(self.sample_rate), "X-Channels": str(CHANNELS),
                        "X-Sample-Format": SAMPLE_FORMAT}
        self.max_text_chars = max_text_chars
        self.max_upload_bytes = max_upload_bytes
        self.max_pending = max_pending
        self.retry_after = retry_after
        self.speakers = speakers
        self.metrics = metrics
        self.prompt_dir = os.path.realpath(prompt_dir) if prompt_dir else None
        self.accepting = True
        self.jobs: set[_Job] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    @property
    def pending(self) -> int:
        return len(self.jobs)

    # ------------------------------------------------------------------ input checks
    def text(self, name: str, value: Any, *, required: bool = True) -> str:
        """A text field: missing, empty and whitespace-only are the same 400; too long is 400."""
        value = "" if value is None else value
        if not isinstance(value, str):
            raise HTTPException(400, f"{name} must be a string")
        if required and not value.strip():
            raise HTTPException(400, f"{name} is missing or empty")
        try:
            return check_text_length(name, value, self.max_text_chars)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None

    @staticmethod
    def check_seed(seed: int) -> None:
        if not _SEED_RANGE[0] <= seed < _SEED_RANGE[1]:
            raise HTTPException(400, f"seed={seed} is outside the 64-bit signed range")

    def check_speaker(self, spk_id: str, field: str = "spk_id") -> None:
        try:
            check_spk_id(spk_id, field)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        if not self.speakers.has(spk_id):
            raise HTTPException(400, f"{field}={spk_id!r} is not a voice registered on this server "
                                     "(GET /speakers lists them, POST /speakers adds one)")

    async def upload(self, name: str, file: UploadFile | None) -> _Upload | None:
        if file is None:
            return None
        label = f"{name} ({file.filename})" if file.filename else name
        if file.size is not None and file.size > self.max_upload_bytes:
            raise HTTPException(413, f"{label}: {file.size} bytes is over the limit of {self.max_upload_bytes}")
        data = await file.read(self.max_upload_bytes + 1)
        if len(data) > self.max_upload_bytes:
            raise HTTPException(413, f"{label}: over the limit of {self.max_upload_bytes} bytes")
        if not data:
            raise HTTPException(400, f"{label}: the uploaded file is empty")
        return _Upload(name, file.filename or "", data)

    # ------------------------------------------------------------------ running requests
    def _busy(self, message: str) -> HTTPException:
        return HTTPException(503, message, headers={"Retry-After": str(max(1, math.ceil(self.retry_after)))})

    def submit(self, request: Request, route: str, start: Callable[[], Iterator[dict[str, Any]]]) -> _Job:
        """Start a request's thread (503 when ``max_pending`` are in flight or the server is stopping)."""
        job = _Job(next(self._ids), route, start, asyncio.get_running_loop())
        with self._lock:
            if not self.accepting:
                raise self._busy("the server is shutting down; retry on another replica or later")
            if len(self.jobs) >= self.max_pending:
                raise self._busy(f"server busy: {len(self.jobs)} requests are in flight "
                                 f"(max_pending={self.max_pending}); retry later")
            self.jobs.add(job)
        self.metrics.in_flight.inc()
        threading.Thread(target=self._run, args=(job,), name=f"cosyjax-request-{job.id}", daemon=True).start()
        return job

    def _run(self, job: _Job) -> None:
        gen = None
        collect = getattr(self.engine, "collect_handles", None)
        try:
            with collect(job.handles) if collect is not None else contextlib.nullcontext():
                gen = job.start()
                for out in gen:
                    audio = np.asarray(out["tts_speech"], np.float32).reshape(-1)
                    if job.first_chunk is None:
                        job.first_chunk = time.monotonic()
                    job.samples += audio.size
                    job.put(audio)
                    if job.cancelled.is_set():
                        raise RequestCancelled("cancelled")
            job.outcome = "ok"
            job.put(_DONE)
        except Exception as e:  # handed to the request: a status code, or an abort mid-stream
            job.outcome = "cancelled" if job.cancelled.is_set() else type(e).__name__
            job.put(e)
        finally:
            if gen is not None and hasattr(gen, "close"):
                gen.close()  # an unfinished engine segment is cancelled (Engine.tts's finally)
            self._finished(job)

    def _finished(self, job: _Job) -> None:
        with self._lock:
            self.jobs.discard(job)
        self.metrics.in_flight.dec()
        wall = time.monotonic() - job.received
        audio = job.samples / self.sample_rate
        first = None if job.first_chunk is None else job.first_chunk - job.received
        if job.outcome == "ok":
            self.metrics.audio_seconds.inc(audio)
            if first is not None:
                self.metrics.first_chunk.observe(first)
            if audio > 0:
                self.metrics.rtf.observe(wall / audio)
        log.info("request id=%d route=%s outcome=%s audio_s=%.2f first_chunk_s=%s wall_s=%.3f rtf=%s", job.id,
                 job.route, job.outcome, audio, "-" if first is None else f"{first:.3f}", wall,
                 f"{wall / audio:.3f}" if audio > 0 else "-")

    def http_error(self, e: BaseException) -> HTTPException:
        if isinstance(e, HTTPException):
            return e
        if isinstance(e, QueueFull):
            return HTTPException(503, f"server busy: {e}; retry later",
                                 headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))})
        if isinstance(e, EngineStopped):
            return self._busy(f"{e}; retry later")
        if isinstance(e, DeadlineExceeded):
            return HTTPException(504, str(e))
        if isinstance(e, RequestCancelled):
            return HTTPException(CLIENT_CLOSED, "request cancelled")
        if isinstance(e, KeyError):  # unknown cached speaker; str(KeyError) would add quotes
            return HTTPException(400, str(e.args[0]) if e.args else "unknown key")
        if isinstance(e, ValueError):  # the pipeline's bad-input errors (AudioError is one)
            return HTTPException(400, _BYTESIO.sub("the uploaded file", str(e)))
        log.error("synthesis failed", exc_info=e)
        return HTTPException(500, f"synthesis failed: {type(e).__name__}: {e}")

    async def _next(self, request: Request, job: _Job) -> Any:
        """The job's next item; a client that leaves meanwhile cancels the job (``_ClientGone``)."""
        getter = asyncio.ensure_future(job.queue.get())
        try:
            while not (await asyncio.wait({getter}, timeout=_POLL_SECONDS))[0]:
                if await request.is_disconnected():
                    log.info("request id=%d: client went away", job.id)
                    job.cancel()
                    raise _ClientGone()
            return getter.result()
        except BaseException:
            job.cancel()
            getter.cancel()
            raise

    async def first(self, request: Request, job: _Job) -> Any:
        item = await self._next(request, job)
        if isinstance(item, BaseException):
            job.cancel()
            raise self.http_error(item)
        return item

    async def stream(self, request: Request, job: _Job, media_type: str | None = None) -> Response:
        """Stream the job's chunks as int16 PCM (the status is sent with the first chunk)."""
        try:
            first = await self.first(request, job)
        except _ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        return _PCMResponse(first, job, self.headers, media_type)

    async def collect(self, request: Request, job: _Job) -> np.ndarray:
        """All of the job's audio as int16 samples."""
        try:
            item = await self.first(request, job)
            chunks = []
            while item is not _DONE:
                if isinstance(item, BaseException):
                    raise self.http_error(item)
                chunks.append(item)
                item = await self._next(request, job)
        except _ClientGone:
            raise HTTPException(CLIENT_CLOSED, "client went away") from None
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        return np.frombuffer(to_pcm16(audio), "<i2")

    async def drain(self, seconds: float) -> None:
        """Refuse new requests; wait up to ``seconds`` for those in flight, then cancel the rest."""
        with self._lock:
            self.accepting = False
        end = time.monotonic() + max(0.0, seconds)
        while self.jobs and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for job in list(self.jobs):
            log.warning("request id=%d: cancelled by shutdown after the %.0f s drain", job.id, seconds)
            job.cancel()


class _PCMResponse(StreamingResponse):
    """Streams a job's chunks as int16 PCM; cancels the job when the connection ends, whatever the reason."""

    def __init__(self, first: Any, job: _Job, headers: dict[str, str], media_type: str | None = None):
        self._job = job
        super().__init__(self._chunks(first), headers=headers, media_type=media_type)

    async def _chunks(self, item: Any):
        while item is not _DONE:
            if isinstance(item, BaseException):  # the status line is already sent: all we can do is abort
                log.error("request id=%d: failed mid-stream", self._job.id, exc_info=item)
                raise RuntimeError(f"request {self._job.id}: synthesis failed mid-stream") from item
            if item.size:  # an empty yield (no speech tokens) adds nothing to the body
                yield to_pcm16(item)
            item = await self._job.queue.get()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancel()  # a no-op once it finished


def create_app(model: "CosyVoice3", *, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pending: int = DEFAULT_MAX_PENDING,
               engine_config: EngineConfig | None = None, cors_origins: tuple[str, ...] = (),
               api_key: str | None = None, spkinfo_dir: str | None = None, prompt_dir: str | None = None,
               warmup: bool = False, drain_seconds: float = DEFAULT_DRAIN_SECONDS) -> FastAPI:
    """The FastAPI app serving ``model`` (see the module docstring for the routes).

    Args:
      model: a loaded :class:`cosyjax.pipeline.CosyVoice3`.  The app runs it on its batching engine
        (``model.use_engine(engine_config)``) from creation until the app's shutdown, which stops that
        engine and detaches it again; an engine the model already has (shared with another frontend)
        is used as it is and left running.  An object without ``use_engine`` (a stand-in in tests) is
        called directly, one thread per request.
      max_text_chars: longest accepted text field (400 beyond).
      max_upload_bytes: largest accepted audio upload or decoded ``prompt_audio`` (413 beyond).
      max_pending: requests in flight (running or waiting) at once; one more gets 503.
      engine_config: the engine's slots and queue; default ``EngineConfig(max_pending=max_pending)``.
      cors_origins: origins allowed by CORS (none: no CORS headers).  Credentials are never allowed;
        the API key travels in a header the browser client sets itself.
      api_key: if set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``.
      spkinfo_dir: where ``POST /speakers`` saves voices and unknown ids are looked up (shared by
        replicas); None: registered voices live in memory only.
      prompt_dir: the directory ``/synthesize``'s ``prompt_audio`` may name files in.
      warmup: compile the engine's programs at start-up (before the first request is accepted).
      drain_seconds: how long shutdown waits for in-flight requests before cancelling them.
    Returns:
      The app; run it with ``uvicorn.run(app, host=..., port=...)`` or ``cosyjax serve``.
    """
    for name, value in (("max_text_chars", max_text_chars), ("max_upload_bytes", max_upload_bytes),
                        ("max_pending", max_pending)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: pass None for no authentication")
    if prompt_dir is not None and not os.path.isdir(prompt_dir):
        raise ValueError(f"prompt_dir={prompt_dir!r} is not a directory")
    if hasattr(model, "progress"):
        model.progress = False  # no progress bars in a server's output

    engine, owns = getattr(model, "engine", None), False
    if engine is None and hasattr(model, "use_engine"):
        engine = model.use_engine(engine_config or EngineConfig(max_pending=max_pending))
        owns = True
    retry_after = engine.config.retry_after if engine is not None else EngineConfig().retry_after
    metrics = ServerMetrics(engine.stats if engine is not None else (lambda: None))
    server = _Server(model, engine=engine, max_text_chars=max_text_chars, max_upload_bytes=max_upload_bytes,
                     max_pending=max_pending, retry_after=retry_after, speakers=SpeakerRegistry(model, spkinfo_dir),
                     metrics=metrics, prompt_dir=prompt_dir)

    def warm() -> None:
        import jax

        began = time.perf_counter()
        with jax.default_device(getattr(model, "device", None)):
            report = engine.warmup(voice_prefix=bool(getattr(model, "spk2info", {})))
        log.info("warm-up: %s programs compiled in %.1f s", getattr(report, "programs", "?"),
                 time.perf_counter() - began)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if warmup and engine is not None:
            await asyncio.to_thread(warm)
        log.info("ready: %d engine slots, max_pending=%d, auth=%s, cors=%s, spkinfo=%s, prompt_dir=%s",
                 engine.config.slots if engine is not None else 0, max_pending, "on" if api_key else "off",
                 ",".join(cors_origins) or "off", spkinfo_dir or "-", prompt_dir or "-")
        try:
            yield
        finally:
            await server.drain(drain_seconds)
            if owns:
                await asyncio.to_thread(engine.shutdown, 0.0 if server.jobs else drain_seconds)
                model.engine = None
            log.info("stopped")

    app = FastAPI(title="cosyjax CosyVoice3", lifespan=lifespan,
                  description="CosyVoice3 on JAX: upstream's FastAPI wire format (int16 LE mono PCM), "
                              "OpenAI-compatible /v1/audio/speech, speaker registry, Prometheus /metrics.")
    app.state.server = server
    app.state.engine = engine
    # Middleware: the last added is the outermost.  CORS answers preflights before auth is checked;
    # the metrics count every response, 401s included.
    if api_key is not None:
        app.add_middleware(_BearerAuth, api_key=api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=list(server.headers))

    text, upload = server.text, server.upload

    def upload_required(name: str, alternative: str = "") -> HTTPException:
        """The 400 for a missing file field, with the curl syntax that sends one."""
        return HTTPException(400, f"{name} (a file upload: curl -F {name}=@{name.split('_')[0]}.wav) is required"
                                  f"{alternative}")

    def voice(prompt: _Upload | None, spk_id: str) -> None:
        if prompt is not None and spk_id:
            raise HTTPException(400, "give either a prompt_wav file or spk_id (a registered voice), not both")
        if prompt is None and not spk_id:
            raise upload_required("prompt_wav", ", or spk_id naming a voice registered on this server")
        if spk_id:
            server.check_speaker(spk_id)

    async def respond(request: Request, route: str, start: Callable[[], Iterator[dict[str, Any]]]) -> Response:
        return await server.stream(request, server.submit(request, route, start))

    both = ["GET", "POST"]

    @app.api_route("/inference_zero_shot", methods=both)
    async def inference_zero_shot(request: Request, tts_text: OptText = None, prompt_text: OptText = None,
                                  prompt_wav: OptFile = None, spk_id: SpkId = "", stream: Stream = False,
                                  seed: Seed = 0, speed: Speed = 1.0, language: Language = "",
                                  strict_prompt: Strict = False) -> Response:
        tts_text = text("tts_text", tts_text)
        prompt_text = text("prompt_text", prompt_text, required=not spk_id)
        prompt = await upload("prompt_wav", prompt_wav)
        voice(prompt, spk_id)
        server.check_seed(seed)
        return await respond(request, "/inference_zero_shot", lambda: model.inference_zero_shot(
            tts_text, prompt_text, prompt.checked() if prompt else None, zero_shot_spk_id=spk_id, stream=stream,
            speed=speed, seed=seed, **_prompt_options(language, strict_prompt)))

    @app.api_route("/inference_cross_lingual", methods=both)
    async def inference_cross_lingual(request: Request, tts_text: OptText = None, prompt_wav: OptFile = None,
                                      spk_id: SpkId = "", stream: Stream = False, seed: Seed = 0,
                                      speed: Speed = 1.0, language: Language = "",
                                      strict_prompt: Strict = False) -> Response:
        tts_text = text("tts_text", tts_text)
        prompt = await upload("prompt_wav", prompt_wav)
        voice(prompt, spk_id)
        server.check_seed(seed)
        return await respond(request, "/inference_cross_lingual", lambda: model.inference_cross_lingual(
            tts_text, prompt.checked() if prompt else None, zero_shot_spk_id=spk_id, stream=stream, speed=speed,
            seed=seed, **_prompt_options(language, strict_prompt)))

    @app.api_route("/inference_instruct2", methods=both)
    async def inference_instruct2(request: Request, tts_text: OptText = None, instruct_text: OptText = None,
                                  prompt_wav: OptFile = None, spk_id: SpkId = "", stream: Stream = False,
                                  seed: Seed = 0, speed: Speed = 1.0, language: Language = "",
                                  strict_prompt: Strict = False) -> Response:
        tts_text = text("tts_text", tts_text)
        instruct_text = text("instruct_text", instruct_text)
        prompt = await upload("prompt_wav", prompt_wav)
        voice(prompt, spk_id)
        server.check_seed(seed)
        return await respond(request, "/inference_instruct2", lambda: model.inference_instruct2(
            tts_text, instruct_text, prompt.checked() if prompt else None, zero_shot_spk_id=spk_id, stream=stream,
            speed=speed, seed=seed, **_prompt_options(language, strict_prompt)))

    @app.api_route("/inference_vc", methods=both)
    async def inference_vc(request: Request, source_wav: OptFile = None, prompt_wav: OptFile = None,
                           stream: Stream = False, speed: Speed = 1.0) -> Response:
        source = await upload("source_wav", source_wav)
        prompt = await upload("prompt_wav", prompt_wav)
        for name, given in (("source_wav", source), ("prompt_wav", prompt)):
            if given is None:
                raise upload_required(name)
        return await respond(request, "/inference_vc", lambda: model.inference_vc(
            source.checked(), prompt.checked(), stream=stream, speed=speed))

    @app.api_route("/inference_sft", methods=both)
    async def inference_sft() -> None:
        raise HTTPException(501, SFT_MESSAGE)

    @app.api_route("/inference_instruct", methods=both)
    async def inference_instruct() -> None:
        raise HTTPException(501, INSTRUCT_MESSAGE)

    add_openai_routes(app, server)

    @app.post("/speakers", status_code=201)
    async def add_speaker(prompt_text: OptText = None, prompt_wav: OptFile = None,
                          spk_id: SpkId = "") -> dict[str, Any]:
        prompt_text = text("prompt_text", prompt_text)
        prompt = await upload("prompt_wav", prompt_wav)
        if prompt is None:
            raise upload_required("prompt_wav")
        try:
            if spk_id:
                check_spk_id(spk_id)
            data = prompt.checked()
            new_id = await asyncio.to_thread(server.speakers.add, prompt_text, data, spk_id or None)
        except SpeakerExists as e:
            raise HTTPException(409, str(e)) from None
        except ValueError as e:
            raise HTTPException(400, _BYTESIO.sub(prompt.filename or "prompt_wav", str(e))) from None
        return {"spk_id": new_id, "persisted": server.speakers.directory is not None}

    @app.get("/speakers")
    async def list_speakers() -> dict[str, Any]:
        return {"speakers": server.speakers.ids()}

    def prompt_source(value: str) -> tuple[str, Any]:
        """``/synthesize``'s ``prompt_audio``: ("spk", id) or ("audio", an _Upload of the bytes)."""
        value = value.strip()
        if value.startswith("data:") and "," in value:  # a data URL: base64 after the comma
            return "audio", _Upload("prompt_audio", "(base64)", decode_base64(value.split(",", 1)[1]))
        if SPK_ID.fullmatch(value):  # base64 of any audio file is longer than an id can be
            if not server.speakers.has(value):
                raise HTTPException(400, f"prompt_audio={value!r} is not a registered speaker id (GET /speakers "
                                         "lists them), a file name in the server's prompt directory, or base64 audio")
            return "spk", value
        if "." in value or value.startswith(("/", "\\", "~")):  # a file name; base64 never has a '.'
            return "audio", _Upload("prompt_audio", value, read_prompt_file(value))
        return "audio", _Upload("prompt_audio", "(base64)", decode_base64(value))

    def decode_base64(value: str) -> bytes:
        if len(value) * 3 // 4 > max_upload_bytes:
            raise HTTPException(413, f"prompt_audio: over the limit of {max_upload_bytes} bytes")
        try:
            data = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, "prompt_audio is neither a registered speaker id, a file name in the "
                                     "server's prompt directory, nor base64 of an audio file") from None
        return data

    def read_prompt_file(name: str) -> bytes:
        if server.prompt_dir is None:
            raise HTTPException(400, f"prompt_audio={name!r} looks like a file name, but this server has no "
                                     "prompt directory (cosyjax serve --prompt-dir DIR)")
        parts = re.split(r"[/\\]", name)
        if "\0" in name or os.path.isabs(name) or name.startswith("~") or re.match(r"[A-Za-z]:", name):
            raise HTTPException(400, f"prompt_audio={name!r}: absolute paths are refused; give a file name "
                                     "inside the server's prompt directory")
        if ".." in parts:
            raise HTTPException(400, f"prompt_audio={name!r}: '..' is refused; give a file name inside the "
                                     "server's prompt directory")
        full = os.path.realpath(os.path.join(server.prompt_dir, name))
        if os.path.commonpath([full, server.prompt_dir]) != server.prompt_dir:
            raise HTTPException(400, f"prompt_audio={name!r} leads outside the server's prompt directory "
                                     "(a symlink?)")
        if not os.path.isfile(full):
            raise HTTPException(400, f"prompt_audio={name!r}: no such file in the server's prompt directory")
        if os.path.getsize(full) > max_upload_bytes:
            raise HTTPException(413, f"prompt_audio={name!r}: over the limit of {max_upload_bytes} bytes")
        with open(full, "rb") as f:
            return f.read()

    @app.post("/synthesize")
    async def synthesize(request: Request, body: SynthesizeRequest) -> Response:
        tts_text = text("text", body.text)
        if not body.prompt_audio or not body.prompt_audio.strip():
            raise HTTPException(400, "prompt_audio is missing or empty: give a registered speaker id, a file name "
                                     "in the server's prompt directory, or base64 of an audio file")
        server.check_seed(body.seed)
        kind, source = prompt_source(body.prompt_audio)
        speed, seed = body.speed, body.seed
        if kind == "spk":
            start = lambda: model.inference_zero_shot(tts_text, "", None, zero_shot_spk_id=source, speed=speed,
                                                      seed=seed)
        else:
            prompt_text = text("prompt_text", body.prompt_text)
            try:
                audio = source.checked()
            except ValueError as e:
                raise HTTPException(400, str(e)) from None
            start = lambda: model.inference_zero_shot(tts_text, prompt_text, audio, speed=speed, seed=seed)
        pcm = await server.collect(request, server.submit(request, "/synthesize", start))
        return Response(encode_audio(pcm, server.sample_rate, "wav"), media_type="audio/wav", headers=server.headers)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        device = getattr(model, "device", None)
        return {"status": "ok" if server.accepting else "stopping", "model": "CosyVoice3",
                "sample_rate": server.sample_rate, "channels": CHANNELS, "sample_format": SAMPLE_FORMAT,
                "dtype": getattr(getattr(getattr(model, "model", None), "policy", None), "name", "unknown"),
                "backend": getattr(device, "platform", "unknown"), "device": str(device),
                "speakers": server.speakers.ids(), "pending": server.pending, "max_pending": max_pending,
                "max_text_chars": max_text_chars, "engine": engine.stats() if engine is not None else None}

    return app
