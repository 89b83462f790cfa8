"""gRPC service with upstream CosyVoice's contract (``runtime/python/grpc``), on the serving engine.

``cosyjax/serving/cosyvoice.proto`` keeps upstream's package (``cosyvoice``), service
(``CosyVoice``), rpc (``Inference``, server-streaming), message names and field numbers, so
upstream's ``client.py`` works unchanged against :func:`serve_grpc`.  Request kinds:

=========================  =====================================================================
``zero_shot_request``      ``CosyVoice3.inference_zero_shot(tts_text, prompt_text, prompt)``
``cross_lingual_request``  ``CosyVoice3.inference_cross_lingual(tts_text, prompt)``
``instruct2_request``      ``CosyVoice3.inference_instruct2(tts_text, instruct_text, prompt)`` (new, field 5)
``vc_request``             ``CosyVoice3.inference_vc(source, prompt)`` (new, field 6)
``sft_request``            ``UNIMPLEMENTED``: CosyVoice3 has no SFT speakers
``instruct_request``       ``UNIMPLEMENTED``: CosyVoice3 has no v1 instruct mode (use instruct2)
=========================  =====================================================================

Optional ``Request`` fields beyond upstream's (its client leaves them unset, which gives the
pipeline's defaults, as upstream's server calls it): ``stream``, ``seed`` (default 0; not on vc)
and ``speed`` (default 1, non-stream only).

Wire format, as upstream's client and server make it: ``prompt_audio`` / ``source_audio`` are
headerless int16 PCM at 16 kHz (``(wav_16k * 2**15).astype(np.int16).tobytes()``), read back as
``int16 / 2**15``; each model yield comes back as one ``Response`` whose ``tts_audio`` is
``(tts_speech * 2**15).astype(np.int16).tobytes()`` at the model rate (24 kHz; upstream truncates
toward zero and so does this; values outside [-1, 1) are clipped instead of wrapping around).  The
initial metadata carries ``x-sample-rate``, ``x-channels`` and ``x-sample-format`` (``s16le``);
upstream's client ignores them (it saves at a hard-coded rate).

Status codes: ``INVALID_ARGUMENT`` for bad input (the message names the field, or gives the
pipeline's own message prefixed by the request kind), ``UNIMPLEMENTED`` for sft / v1 instruct,
``RESOURCE_EXHAUSTED`` when the engine's queue is full (trailing metadata ``retry-after``) or more
than ``max_concurrent_rpcs`` calls are open, ``UNAUTHENTICATED`` without the API key,
``UNAVAILABLE`` when the engine is shutting down, ``INTERNAL`` for a synthesis failure.  Input
errors are found before the first ``Response`` is sent.

Concurrency: every RPC runs the pipeline's frontend on its own worker thread and submits its
segments to the pipeline's ``cosyjax.serving.Engine`` (``CosyVoice3.use_engine``), which batches
the LLM decodes of concurrent requests; each request's audio equals its solo run (same seed).
A client that cancels (or whose deadline passes) cancels its engine requests at once.

Example::

    from cosyjax.pipeline import CosyVoice3
    from cosyjax.serving.grpc_service import run_grpc

    run_grpc(CosyVoice3("pretrained_models/Fun-CosyVoice3-0.5B"), host="0.0.0.0", port=50000)

then, from upstream's checkout, ``python runtime/python/grpc/client.py --port 50000 --mode
zero_shot ...`` (its generated modules are wire-compatible with these).
"""

from __future__ import annotations

import hmac
import io
import logging
import math
import signal
import threading
import time
from concurrent import futures
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn

import numpy as np

INSTALL_HINT = 'the cosyjax gRPC service needs grpcio and protobuf: pip install "cosyjax[server]"'

try:
    import grpc
except ImportError as e:  # the service is an optional extra
    raise ImportError(INSTALL_HINT) from e

from cosyjax.frontend.audio import AudioError, check_waveform
from cosyjax.serving import cosyvoice_pb2 as pb
from cosyjax.serving import cosyvoice_pb2_grpc as pb_grpc
from cosyjax.serving.engine import DeadlineExceeded, EngineStopped, QueueFull, RequestCancelled
from cosyjax.serving.fields import DEFAULT_MAX_TEXT_CHARS, check_text_length
from cosyjax.serving.pcm import to_pcm16

if TYPE_CHECKING:
    from cosyjax.pipeline import CosyVoice3

log = logging.getLogger(__name__)

PROMPT_SAMPLE_RATE = 16000  # the rate of prompt_audio / source_audio on the wire (upstream's client)
DEFAULT_PORT = 50000  # upstream's server default
DEFAULT_MAX_WORKERS = 8
PAYLOAD = "RequestPayload"  # the oneof of Request
SUPPORTED = ("zero_shot_request", "cross_lingual_request", "instruct2_request", "vc_request")
# The request kinds -> CosyVoice3.inference's modes (cosyjax.pipeline.MODES).
KIND_MODES = {"zero_shot_request": "zero_shot", "cross_lingual_request": "cross_lingual",
              "instruct2_request": "instruct2", "vc_request": "vc"}
SFT_MESSAGE = ("sft_request: CosyVoice3 has no SFT speakers (its release ships no spk2info with pretrained "
               "voices); send a zero_shot_request with tts_text, prompt_text and prompt_audio instead")
INSTRUCT_MESSAGE = ("instruct_request: CosyVoice3 has no v1 instruct mode (speaker id + instruction); send an "
                    "instruct2_request (field 5) with tts_text, instruct_text and prompt_audio instead")


class _Reject(Exception):
    """A request refused with a status code (raised before anything is sent)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> _Reject:
    return _Reject(grpc.StatusCode.INVALID_ARGUMENT, message)


def pcm16_to_float(data: bytes, field: str) -> np.ndarray:
    """Decode upstream's prompt wire format: int16 PCM bytes (16 kHz, mono) -> float32 ``int16 / 2**15``.

    Raises:
      _Reject (INVALID_ARGUMENT, naming ``field``): empty, not whole samples, too short or too
        long for the frontend, or silent.
    """
    hint = "expected int16 PCM at 16 kHz, as upstream's client sends: (wav * 2**15).astype(np.int16).tobytes()"
    if not data:
        raise _invalid(f"{field} is empty: {hint}")
    if len(data) % 2:
        raise _invalid(f"{field}: {len(data)} bytes is not a whole number of int16 samples; {hint}")
    wav = np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(2 ** 15)
    try:
        check_waveform(wav, PROMPT_SAMPLE_RATE, field)  # the prompt checks of every other input path
    except AudioError as e:
        raise _invalid(str(e)) from None
    return wav


def _wav_bytes(wav: np.ndarray) -> bytes:
    """A float32 WAV file of a 16 kHz waveform (lossless), for pipeline inputs that take files only."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, wav, PROMPT_SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


class CosyVoiceServicer(pb_grpc.CosyVoiceServicer):
    """Upstream's ``CosyVoice`` service on a :class:`cosyjax.pipeline.CosyVoice3` (see the module docstring).

    Args:
      tts: the pipeline; its requests run through its engine (``tts.use_engine(engine_config)``).
      max_text_chars: the longest accepted ``tts_text`` / ``prompt_text`` / ``instruct_text``.
      engine_config: a ``cosyjax.serving.EngineConfig`` for a new engine (slots, queue length).
    """

    def __init__(self, tts: "CosyVoice3", *, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
                 engine_config: Any = None):
        if not isinstance(max_text_chars, int) or max_text_chars < 1:
            raise ValueError(f"max_text_chars={max_text_chars!r}: expected a positive integer")
        self.tts = tts
        self.max_text_chars = max_text_chars
        self.engine = tts.use_engine(engine_config)
        self.metadata = (("x-sample-rate", str(int(tts.sample_rate))), ("x-channels", "1"),
                         ("x-sample-format", "s16le"))

    # ------------------------------------------------------------------ request -> pipeline call
    def _text(self, value: str, field: str) -> str:
        if not value.strip():
            raise _invalid(f"{field} is empty")
        try:
            return check_text_length(field, value, self.max_text_chars)
        except ValueError as e:
            raise _invalid(str(e)) from None

    def plan(self, request: pb.Request) -> tuple[str, Callable[[], Iterator[dict[str, Any]]]]:
        """Check a request and bind its pipeline call: (request kind, a function starting the call).

        Raises:
          _Reject: UNIMPLEMENTED for sft / v1 instruct, INVALID_ARGUMENT for bad fields.
        """
        kind = request.WhichOneof(PAYLOAD)
        if kind == "sft_request":
            raise _Reject(grpc.StatusCode.UNIMPLEMENTED, SFT_MESSAGE)
        if kind == "instruct_request":
            raise _Reject(grpc.StatusCode.UNIMPLEMENTED, INSTRUCT_MESSAGE)
        if kind is None:
            raise _invalid(f"Request.{PAYLOAD}: no request is set; set one of {', '.join(SUPPORTED)}")
        options: dict[str, Any] = {"stream": bool(request.stream)}
        if request.HasField("speed"):
            if not (math.isfinite(request.speed) and request.speed > 0):
                raise _invalid(f"speed={request.speed}: expected a positive number")
            options["speed"] = float(request.speed)
        if request.HasField("seed"):
            if kind == "vc_request":
                raise _invalid("seed: voice conversion (vc_request) does not sample; leave seed unset")
            options["seed"] = int(request.seed)
        tts, body = self.tts, getattr(request, kind)

        def prompt(field: str = "prompt_audio") -> tuple[np.ndarray, int]:
            return pcm16_to_float(getattr(body, field), f"{kind}.{field}"), PROMPT_SAMPLE_RATE

        if kind == "vc_request":
            # the pipeline loads the source from a file (bytes), the prompt from (waveform, rate)
            options["source_wav"] = _wav_bytes(prompt("source_audio")[0])
        else:
            options["tts_text"] = self._text(body.tts_text, f"{kind}.tts_text")
            if kind == "zero_shot_request":
                options["prompt_text"] = self._text(body.prompt_text, f"{kind}.prompt_text")
            if kind == "instruct2_request":
                options["instruct_text"] = self._text(body.instruct_text, f"{kind}.instruct_text")
        options["prompt_wav"] = prompt()
        mode = KIND_MODES[kind]
        return kind, lambda: tts.inference(mode, **options)

    # ------------------------------------------------------------------ the rpc
    def Inference(self, request: pb.Request, context: grpc.ServicerContext) -> Iterator[pb.Response]:
        try:
            kind, start = self.plan(request)
        except _Reject as e:
            log.info("refused %s: %s", request.WhichOneof(PAYLOAD) or "empty request", e.message)
            context.abort(e.code, e.message)
        began = time.perf_counter()
        with self.engine.collect_handles() as handles:  # a HandleGroup: cancel() stops them all
            if not context.add_callback(handles.cancel):  # runs when the rpc ends: cancel, deadline, or done
                return  # already over (the client went away while the request was checked)
            chunks = None
            try:
                # the pipeline's checks and frontend run in the call, the engine's at the first chunk
                chunks = start()
                first = next(chunks, None)
            except Exception as e:
                if chunks is not None:
                    chunks.close()
                if handles.cancelled:  # the client went away while the request ran: nobody to answer
                    log.info("%s: cancelled by the client before the first chunk", kind)
                    return
                self._abort(context, kind, e)
                return  # not reached: _abort raises
            samples = 0
            try:
                context.send_initial_metadata(self.metadata)
                item = first
                while item is not None:
                    pcm = to_pcm16(item["tts_speech"])
                    if pcm:  # an empty yield (no speech tokens) adds nothing
                        samples += len(pcm) // 2
                        yield pb.Response(tts_audio=pcm)
                    if handles.cancelled:
                        break
                    item = next(chunks, None)
            except Exception as e:
                if handles.cancelled:  # the engine ended the request because the client went away
                    log.info("%s: cancelled by the client after %d samples", kind, samples)
                    return
                self._abort(context, kind, e)
            finally:
                chunks.close()  # a request still running in the engine is cancelled by its generator
        if handles.cancelled and not context.is_active():
            log.info("%s: cancelled by the client after %d samples", kind, samples)
        else:
            log.info("%s: %d samples in %.2f s", kind, samples, time.perf_counter() - began)

    @staticmethod
    def _abort(context: grpc.ServicerContext, kind: str, e: Exception) -> NoReturn:
        """End the call with the status code of ``e`` (``context.abort`` raises)."""
        if isinstance(e, QueueFull):
            context.set_trailing_metadata((("retry-after", f"{e.retry_after:g}"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {e}; retry after {e.retry_after:g} s")
        if isinstance(e, (ValueError, KeyError, TypeError)):  # the pipeline's and the model's bad-input errors
            detail = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{kind}: {detail}")
        if isinstance(e, DeadlineExceeded):
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{kind}: {e}")
        if isinstance(e, RequestCancelled):
            context.abort(grpc.StatusCode.CANCELLED, f"{kind}: {e}")
        if isinstance(e, EngineStopped):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{kind}: {e}")
        log.error("%s: synthesis failed", kind, exc_info=e)
        context.abort(grpc.StatusCode.INTERNAL, f"{kind}: synthesis failed: {type(e).__name__}: {e}")


class _BearerAuth(grpc.ServerInterceptor):
    """Lets a call through only with metadata ``authorization: Bearer <api_key>``."""

    def __init__(self, api_key: str):
        self._key = api_key.encode("utf-8")

    def intercept_service(self, continuation, handler_call_details):
        value = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = str(value).strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8"), self._key):
            return continuation(handler_call_details)
        message = ("invalid API key" if value else
                   "missing API key: send the metadata 'authorization: Bearer <api key>'")

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_stream_rpc_method_handler(deny)


def serve_grpc(tts: "CosyVoice3", host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
               max_workers: int = DEFAULT_MAX_WORKERS, api_key: str | None = None,
               max_concurrent_rpcs: int | None = None, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
               engine_config: Any = None) -> grpc.Server:
    """Start upstream's ``CosyVoice`` gRPC service on ``tts`` (see the module docstring).

    Args:
      tts: a loaded :class:`cosyjax.pipeline.CosyVoice3`; its engine is started (``use_engine``).
      host, port: where to listen (insecure, no TLS: put a TLS proxy in front beyond localhost);
        the port must be free (no SO_REUSEPORT sharing).
      max_workers: RPC worker threads (requests whose frontend runs / whose audio streams at once).
      api_key: when set, every call needs metadata ``authorization: Bearer <api_key>``
        (``UNAUTHENTICATED`` otherwise).
      max_concurrent_rpcs: open calls beyond which new ones get ``RESOURCE_EXHAUSTED`` (as upstream's
        ``--max_conc``); default ``max_workers``.
      max_text_chars: the longest accepted text field.
      engine_config: a ``cosyjax.serving.EngineConfig`` if the pipeline has no engine yet.
    Returns:
      The started server: ``server.wait_for_termination()`` to block, ``server.stop(grace)`` to stop
      (calls still open after ``grace`` seconds are cancelled, and with them their engine requests).
      The engine keeps running: ``tts.engine.shutdown()``.
    Raises:
      ValueError: a bad argument; RuntimeError: the address cannot be bound.
    """
    if not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers={max_workers!r}: expected a positive integer")
    if max_concurrent_rpcs is not None and (not isinstance(max_concurrent_rpcs, int) or max_concurrent_rpcs < 1):
        raise ValueError(f"max_concurrent_rpcs={max_concurrent_rpcs!r}: expected a positive integer or None")
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: pass None for no authentication")
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"port={port!r}: expected 0..65535")
    servicer = CosyVoiceServicer(tts, max_text_chars=max_text_chars, engine_config=engine_config)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cosyjax-grpc"),
                         interceptors=[_BearerAuth(api_key.strip())] if api_key is not None else None,
                         options=[("grpc.so_reuseport", 0)],
                         maximum_concurrent_rpcs=max_concurrent_rpcs or max_workers)
    pb_grpc.add_CosyVoiceServicer_to_server(servicer, server)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise RuntimeError(f"cannot listen on {address}: {e}") from e
    if not bound:
        raise RuntimeError(f"cannot listen on {address} (in use, or not an address of this machine)")
    server.start()
    log.info("cosyjax gRPC service (upstream's cosyvoice.CosyVoice) listening on %s%s", address,
             ", API key required" if api_key else "")
    return server


def run_grpc(tts: "CosyVoice3", host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
             grace_seconds: float = 10.0, **options: Any) -> None:
    """``serve_grpc`` and block until Ctrl-C or SIGTERM, then stop: open calls get ``grace_seconds``
    to finish, the engine is shut down.  ``options``: :func:`serve_grpc`'s keyword arguments.
    (What ``cosyjax serve --grpc`` would call.)"""
    server = serve_grpc(tts, host, port, **options)
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        log.info("stopping the gRPC service (%.0f s for open calls)", grace_seconds)
        server.stop(grace_seconds).wait()
        if tts.engine is not None:
            tts.engine.shutdown(drain_seconds=0)


__all__ = ["CosyVoiceServicer", "DEFAULT_PORT", "INSTRUCT_MESSAGE", "SFT_MESSAGE", "pcm16_to_float", "run_grpc",
           "serve_grpc"]
