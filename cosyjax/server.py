"""HTTP server with upstream's FastAPI wire format (``runtime/python/fastapi/server.py``, SPEC §9.1).

Routes (each accepts GET and POST with multipart form fields, as upstream's do):

=============================  ==============================================================
``/inference_zero_shot``       ``tts_text``, ``prompt_text``, file ``prompt_wav``
``/inference_cross_lingual``   ``tts_text``, file ``prompt_wav``
``/inference_instruct2``       ``tts_text``, ``instruct_text``, file ``prompt_wav``
``/inference_vc``              file ``source_wav``, file ``prompt_wav`` (not in upstream's server)
``/inference_sft``             501: CosyVoice3 has no SFT speakers
``/inference_instruct``        501: CosyVoice3 has no v1 instruct mode (use instruct2)
``/health`` (GET)              JSON: sample rate, sample format, dtype, backend, cached speakers
=============================  ==============================================================

Optional fields beyond upstream's: ``stream`` (bool, default false: upstream's server calls the
model with its defaults), ``seed`` (int, default 0; not on vc, whose pipeline call takes none),
``speed`` (float, default 1, non-stream only) and, on the three text routes, ``spk_id``: a voice
cached with ``CosyVoice3.add_zero_shot_spk`` / ``load_spkinfo`` (``cosyjax serve --spkinfo DIR``)
that replaces ``prompt_wav`` (zero-shot also takes its transcript from the cache); ``language``
and ``strict_prompt`` (bool), the pipeline's ``language`` / ``strict``.  CosyVoice3 expects
``<|endofprompt|>`` in ``prompt_text``, in ``instruct_text`` and, for cross-lingual, in ``tts_text``;
without it the pipeline builds the prompt (``cosyjax.pipeline.build_prompt``, logged as a warning),
or answers 400 with ``strict_prompt=true``, as upstream refuses such input.

Response body: headerless int16 little-endian mono PCM at the model rate (24 kHz), one chunk per
model yield, produced as upstream's ``(x * 2**15).astype(int16)`` (truncation toward zero; values
outside [-1, 1) are clipped instead of wrapping around, which the model's 0.99 output limit never
reaches).  Extra headers ``X-Sample-Rate``, ``X-Channels`` and ``X-Sample-Format`` (``s16le``)
describe it.  Errors are JSON ``{"detail": ...}``: 400 for bad input (empty or too long text,
missing or undecodable audio, an unknown ``spk_id``; the pipeline's own message), 422 for a
missing required field or a value of the wrong type (FastAPI's message), 413 for an oversized
upload, 503 when ``max_pending`` requests are already queued.  Input is checked and the first
chunk is synthesised before the 200 status is sent, so a request that fails does so with a
status code, never with a truncated 200.

Uploaded files are read as bytes and decoded by :func:`cosyjax.frontend.audio.load_audio`, the
§2.1 loader (any format libsndfile reads; loaded separately at 16 kHz and 24 kHz).  Upstream's
server instead hands the frontend an int16 tensor, which its ``load_wav`` cannot open (SPEC §9.3).

Concurrency: one model runs one request at a time.  ``CosyVoice3Model`` keeps per-request state
on the instance (upstream's never-reset stream hop, traces), and JAX's default-device setting is
thread-local, so every model call runs on one dedicated worker thread, and a request's generator
runs to its end before the next request starts (first come, first served).  Synthesised chunks
are queued to the connection as they are produced, so a slow client does not hold up the model.
A client that disconnects stops its request at the next chunk boundary; a queued request whose
client has gone is skipped.  Beyond ``max_pending`` queued or running requests the answer is 503.

Example (``cosyjax serve --model-dir pretrained_models/Fun-CosyVoice3-0.5B --port 50000``)::

    curl -sS -X POST http://localhost:50000/inference_zero_shot \\
        -F 'tts_text=Hello, this is a test.' \\
        -F 'prompt_text=You are a helpful assistant.<|endofprompt|>Transcript of the prompt.' \\
        -F 'prompt_wav=@prompt.wav' -F stream=true --output out.pcm
    sox -t raw -r 24000 -e signed -b 16 -c 1 -L out.pcm out.wav
    ffmpeg -f s16le -ar 24000 -ac 1 -i out.pcm out.wav

or in Python::

    import numpy as np, soundfile
    pcm = np.fromfile("out.pcm", dtype="<i2")          # int16 little-endian, mono
    soundfile.write("out.wav", pcm, 24000)              # the rate is in the X-Sample-Rate header
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator

import numpy as np

INSTALL_HINT = 'the cosyjax server needs fastapi, uvicorn and python-multipart: pip install "cosyjax[server]"'

try:
    from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import Response, StreamingResponse
except ImportError as e:  # the server is an optional extra
    raise ImportError(INSTALL_HINT) from e

from cosyjax.frontend.audio import load_audio, read_audio

if TYPE_CHECKING:
    from cosyjax.pipeline import CosyVoice3

log = logging.getLogger(__name__)

CHANNELS = 1
SAMPLE_FORMAT = "s16le"
DEFAULT_MAX_TEXT_CHARS = 2000
DEFAULT_MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # a 30 s prompt is ~6 MB even as 48 kHz float32 stereo WAV
DEFAULT_MAX_PENDING = 16
SFT_MESSAGE = ("CosyVoice3 has no SFT speakers (its release ships no spk2info with pretrained voices): use "
               "/inference_zero_shot with a prompt_wav and prompt_text, or with spk_id of a voice cached on "
               "this server (cosyjax serve --spkinfo DIR)")
INSTRUCT_MESSAGE = ("CosyVoice3 has no v1 instruct mode (speaker id + instruction): use /inference_instruct2 "
                    "with tts_text, instruct_text and a prompt_wav (or spk_id of a cached voice)")
_DONE = object()  # end-of-stream marker in a job's queue
_SEED_RANGE = (-(2 ** 63), 2 ** 63)  # what jax.random.key accepts
_POLL_SECONDS = 0.25  # how often a queued request checks that its client is still there
CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; nobody receives it

# Form field types (module level: FastAPI resolves the string annotations in this module's globals)
TextField = Annotated[str, Form()]
OptText = Annotated[str | None, Form()]
OptFile = Annotated[UploadFile | None, File()]
Stream = Annotated[bool, Form()]
Seed = Annotated[int, Form()]
Speed = Annotated[float, Form()]
SpkId = Annotated[str, Form()]
Language = Annotated[str, Form()]
Strict = Annotated[bool, Form()]


def to_pcm16(audio: np.ndarray) -> bytes:
    """Upstream's wire conversion: float audio -> int16 little-endian bytes.

    Args:
      audio: [1, T] or [T] float waveform in [-1, 1).
    Returns:
      2*T bytes: ``(x * 2**15).astype(int16)``, truncated toward zero as upstream; out-of-range
      values are clipped to the int16 range instead of wrapping around.
    """
    scaled = np.asarray(audio, np.float32).reshape(-1) * np.float32(2 ** 15)
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes()


@dataclass(frozen=True)
class _Upload:
    field: str
    filename: str
    data: bytes

    def checked(self) -> bytes:
        """The file's bytes after the §2.1 loader's checks, errors named by the form field.

        Decoding here, at the file's own rate, costs a decode but no resampling; the pipeline
        decodes the bytes again at 16 and 24 kHz.
        """
        src = io.BytesIO(self.data)
        src.name = self.filename or self.field
        try:
            _, sample_rate = read_audio(src)
            src.seek(0)
            load_audio(src, sample_rate)
        except ValueError as e:
            raise ValueError(f"{self.field}: {e}") from None
        return self.data


class _Job:
    """One request: a generator factory run on the model thread, chunks handed to the event loop."""

    def __init__(self, name: str, start: Callable[[], Iterator[dict[str, Any]]], loop: asyncio.AbstractEventLoop):
        self.name = name
        self.start = start
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.cancelled.set()


class _ModelWorker:
    """Runs jobs one after another on a single thread (see the module docstring, Concurrency)."""

    def __init__(self, max_pending: int):
        self.max_pending = max_pending
        self.pending = 0
        self._lock = threading.Lock()
        # one thread for the app's lifetime (started on first use): never two model threads at once
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cosyjax-model")
        self._jobs: set[_Job] = set()

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self.pending >= self.max_pending:
                raise HTTPException(503, f"server busy: {self.pending} requests are queued or running "
                                         f"(max_pending={self.max_pending}); retry later")
            self.pending += 1
            self._jobs.add(job)
            self._executor.submit(self._run, job)

    def cancel_all(self) -> None:
        """Server shutdown: queued jobs are skipped, a running one stops at its next chunk."""
        with self._lock:
            for job in self._jobs:
                job.cancelled.set()

    def _run(self, job: _Job) -> None:
        gen = None
        try:
            if job.cancelled.is_set():
                job.put(_stopped())  # ends a wait for the first chunk (server shutdown)
                return
            began, samples = time.perf_counter(), 0
            gen = job.start()
            for out in gen:
                pcm = to_pcm16(out["tts_speech"])
                samples += len(pcm) // 2
                job.put(pcm)
                if job.cancelled.is_set():
                    log.info("%s: stopped (client gone or server shutting down)", job.name)
                    job.put(_stopped())
                    return
            job.put(_DONE)
            log.info("%s: %d samples in %.2f s", job.name, samples, time.perf_counter() - began)
        except Exception as e:  # handed to the request, which turns it into a status code or an abort
            job.put(e)
        finally:
            if gen is not None and hasattr(gen, "close"):
                gen.close()
            with self._lock:
                self.pending -= 1
                self._jobs.discard(job)


def _prompt_options(language: str, strict_prompt: bool) -> dict[str, Any]:
    """The form's prompt options for the pipeline call, only those set (the defaults stay the pipeline's)."""
    return {name: value for name, value in (("language", language), ("strict", strict_prompt)) if value}


def _stopped() -> HTTPException:
    return HTTPException(503, "request stopped: the client went away or the server is shutting down")


def _http_error(e: Exception) -> HTTPException:
    if isinstance(e, HTTPException):
        return e
    if isinstance(e, KeyError):  # unknown cached speaker; str(KeyError) would add quotes
        return HTTPException(400, str(e.args[0]) if e.args else "unknown key")
    if isinstance(e, ValueError):  # the pipeline's bad-input errors (AudioError is one)
        return HTTPException(400, str(e))
    log.error("synthesis failed", exc_info=e)
    return HTTPException(500, f"synthesis failed: {type(e).__name__}: {e}")


class _PCMResponse(StreamingResponse):
    """Streams a job's chunks; stops the job when the connection ends, whatever the reason."""

    def __init__(self, first: Any, job: _Job, headers: dict[str, str]):
        self._job = job
        super().__init__(self._chunks(first), headers=headers)

    async def _chunks(self, item: Any):
        while item is not _DONE:
            if isinstance(item, Exception):  # the status line is already sent: all we can do is abort
                log.error("%s: failed mid-stream", self._job.name, exc_info=item)
                raise RuntimeError(f"{self._job.name}: synthesis failed mid-stream") from item
            if item:  # an empty yield (no speech tokens) adds nothing to the body
                yield item
            item = await self._job.queue.get()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancelled.set()


def create_app(model: "CosyVoice3", *, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pending: int = DEFAULT_MAX_PENDING,
               cors_origins: tuple[str, ...] = ("*",)) -> FastAPI:
    """The FastAPI app serving ``model`` with upstream's routes and wire format.

    Args:
      model: a loaded :class:`cosyjax.pipeline.CosyVoice3` (its speaker cache serves ``spk_id``).
      max_text_chars: longest accepted ``tts_text`` / ``prompt_text`` / ``instruct_text`` (400 beyond).
      max_upload_bytes: largest accepted audio upload (413 beyond).
      max_pending: requests queued or running at once; one more gets 503.
      cors_origins: allowed CORS origins (upstream allows ``*``); empty for no CORS middleware.
    Returns:
      The app; run it with ``uvicorn.run(app, host=..., port=...)`` or ``cosyjax serve``.
    """
    for name, value in (("max_text_chars", max_text_chars), ("max_upload_bytes", max_upload_bytes),
                        ("max_pending", max_pending)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    sample_rate = int(model.sample_rate)
    headers = {"X-Sample-Rate": str(sample_rate), "X-Channels": str(CHANNELS), "X-Sample-Format": SAMPLE_FORMAT}
    worker = _ModelWorker(max_pending)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        worker.cancel_all()

    app = FastAPI(title="cosyjax CosyVoice3", lifespan=lifespan,
                  description="CosyVoice3 on JAX with upstream's FastAPI wire format: int16 LE mono PCM.")
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_credentials=True,
                           allow_methods=["*"], allow_headers=["*"], expose_headers=list(headers))

    def text(name: str, value: str | None, *, required: bool = True) -> str:
        value = value or ""
        if required and not value.strip():
            raise HTTPException(400, f"{name} is missing or empty")
        if len(value) > max_text_chars:
            raise HTTPException(400, f"{name} has {len(value)} characters; this server accepts at most "
                                     f"{max_text_chars} per request (split the text over several requests)")
        return value

    async def upload(name: str, file: UploadFile | None) -> _Upload | None:
        if file is None:
            return None
        if file.size is not None and file.size > max_upload_bytes:
            raise HTTPException(413, f"{name}: {file.size} bytes is over the limit of {max_upload_bytes}")
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name}: over the limit of {max_upload_bytes} bytes")
        if not data:
            raise HTTPException(400, f"{name}: the uploaded file is empty")
        return _Upload(name, file.filename or "", data)

    def voice(prompt: _Upload | None, spk_id: str) -> None:
        if prompt is not None and spk_id:
            raise HTTPException(400, "give either a prompt_wav file or spk_id (a cached voice), not both")
        if prompt is None and not spk_id:
            raise HTTPException(400, "prompt_wav (a file upload: curl -F prompt_wav=@prompt.wav) is required, "
                                     "or spk_id naming a voice cached on this server")

    def check_seed(seed: int) -> None:
        if not _SEED_RANGE[0] <= seed < _SEED_RANGE[1]:
            raise HTTPException(400, f"seed={seed} is outside the 64-bit signed range")

    async def respond(request: Request, name: str, start: Callable[[], Iterator[dict[str, Any]]]) -> Response:
        job = _Job(name, start, asyncio.get_running_loop())
        worker.submit(job)
        getter = asyncio.ensure_future(job.queue.get())
        try:
            # A queued client that gives up must not cost model time: check for it while waiting.
            while not (await asyncio.wait({getter}, timeout=_POLL_SECONDS))[0]:
                if await request.is_disconnected():
                    log.info("%s: client went away before the first chunk", name)
                    job.cancelled.set()
                    getter.cancel()
                    return Response(status_code=CLIENT_CLOSED)
            first = getter.result()
        except BaseException:
            job.cancelled.set()
            getter.cancel()
            raise
        if isinstance(first, Exception):
            job.cancelled.set()
            raise _http_error(first)
        return _PCMResponse(first, job, headers)

    both = ["GET", "POST"]

    @app.api_route("/inference_zero_shot", methods=both)
    async def inference_zero_shot(request: Request, tts_text: TextField, prompt_text: OptText = None,
                                  prompt_wav: OptFile = None, spk_id: SpkId = "", stream: Stream = False,
                                  seed: Seed = 0, speed: Speed = 1.0, language: Language = "",
                                  strict_prompt: Strict = False) -> Response:
        tts_text = text("tts_text", tts_text)
        prompt_text = text("prompt_text", prompt_text, required=not spk_id)
        prompt = await upload("prompt_wav", prompt_wav)
        voice(prompt, spk_id)
        check_seed(seed)
        return await respond(request, "inference_zero_shot", lambda: model.inference_zero_shot(
            tts_text, prompt_text, prompt.checked() if prompt else None, zero_shot_spk_id=spk_id, stream=stream,
            speed=speed, seed=seed, **_prompt_options(language, strict_prompt)))

    @app.api_route("/inference_cross_lingual", methods=both)
    async def inference_cross_lingual(request: Request, tts_text: TextField, prompt_wav: OptFile = None,
                                      spk_id: SpkId = "", stream: Stream = False, seed: Seed = 0,
                                      speed: Speed = 1.0, language: Language = "",
                                      strict_prompt: Strict = False) -> Response:
        tts_text = text("tts_text", tts_text)
        prompt = await upload("prompt_wav", prompt_wav)
        voice(prompt, spk_id)
        check_seed(seed)
        return await respond(request, "inference_cross_lingual", lambda: model.inference_cross_lingual(
            tts_text, prompt.checked() if prompt else None, zero_shot_spk_id=spk_id, stream=stream, speed=speed,
            seed=seed, **_prompt_options(language, strict_prompt)))

    @app.api_route("/inference_instruct2", methods=both)
    async def inference_instruct2(request: Request, tts_text: TextField, instruct_text: OptText = None,
                                  prompt_wav: OptFile = None, spk_id: SpkId = "", stream: Stream = False,
                                  seed: Seed = 0, speed: Speed = 1.0, language: Language = "",
                                  strict_prompt: Strict = False) -> Response:
        tts_text = text("tts_text", tts_text)
        instruct_text = text("instruct_text", instruct_text)
        prompt = await upload("prompt_wav", prompt_wav)
        voice(prompt, spk_id)
        check_seed(seed)
        return await respond(request, "inference_instruct2", lambda: model.inference_instruct2(
            tts_text, instruct_text, prompt.checked() if prompt else None, zero_shot_spk_id=spk_id, stream=stream,
            speed=speed, seed=seed, **_prompt_options(language, strict_prompt)))

    @app.api_route("/inference_vc", methods=both)
    async def inference_vc(request: Request, source_wav: OptFile = None, prompt_wav: OptFile = None,
                           stream: Stream = False, speed: Speed = 1.0) -> Response:
        source = await upload("source_wav", source_wav)
        prompt = await upload("prompt_wav", prompt_wav)
        for name, given in (("source_wav", source), ("prompt_wav", prompt)):
            if given is None:
                raise HTTPException(400, f"{name} (a file upload: curl -F {name}=@{name.split('_')[0]}.wav) "
                                         "is required")
        return await respond(request, "inference_vc", lambda: model.inference_vc(
            source.checked(), prompt.checked(), stream=stream, speed=speed))

    @app.api_route("/inference_sft", methods=both)
    async def inference_sft() -> None:
        raise HTTPException(501, SFT_MESSAGE)

    @app.api_route("/inference_instruct", methods=both)
    async def inference_instruct() -> None:
        raise HTTPException(501, INSTRUCT_MESSAGE)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        device = getattr(model, "device", None)
        return {"status": "ok", "model": "CosyVoice3", "sample_rate": sample_rate, "channels": CHANNELS,
                "sample_format": SAMPLE_FORMAT,
                "dtype": getattr(getattr(getattr(model, "model", None), "policy", None), "name", "unknown"),
                "backend": getattr(device, "platform", "unknown"), "device": str(device),
                "speakers": sorted(getattr(model, "spk2info", {})), "pending": worker.pending,
                "max_pending": max_pending, "max_text_chars": max_text_chars}

    return app
