"""OpenAI-compatible speech route, ``POST /v1/audio/speech``, and the audio encoders the server uses.

Request (JSON), the fields of OpenAI's ``audio.speech.create``:

- ``input`` (required): the text to speak (at most the server's ``max_text_chars``).
- ``voice`` (required): the id of a speaker registered on this server (``POST /speakers``,
  ``cosyjax serve --spkinfo DIR``); OpenAI's built-in names (alloy, ...) exist only if registered.
- ``model``: accepted and ignored (this server has one model).
- ``response_format``: ``wav`` (default here; OpenAI's default is mp3), ``pcm`` (headerless int16
  little-endian mono at 24 kHz, as OpenAI's), ``flac`` or ``mp3`` (where libsndfile can write MP3,
  1.1 or newer; otherwise 400).  Other OpenAI formats (opus, aac) are refused with 400.
- ``speed``: 0.25 to 4.0 as OpenAI's; the pipeline accepts speed != 1 only without streaming.
- ``stream``: true sends ``pcm`` chunks as they are synthesised (chunked transfer encoding).
- ``seed`` (extension): the pipeline's seed (default 0).

All formats hold the same int16 samples as the upstream routes' PCM, the web UI's and ``cosyjax tts``'s wavs
(``cosyjax.serving.pcm.pcm16``: ``x * 2**15`` truncated toward zero, clipped).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel

from cosyjax.serving.pcm import pcm16, wav16_bytes
from cosyjax.serving.speakers import check_spk_id

if TYPE_CHECKING:
    from cosyjax.server import _Server

FORMATS = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg"}
SPEED_RANGE = (0.25, 4.0)


def mp3_available() -> bool:
    """Whether this libsndfile writes MP3 (soundfile lists it among its formats from libsndfile 1.1)."""
    import soundfile

    return "MP3" in soundfile.available_formats()


def check_format(response_format: Any, field: str = "response_format") -> str:
    """The lower-cased format, or ``ValueError`` naming the field and what is accepted."""
    fmt = str(response_format or "wav").strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"{field}={response_format!r} is not supported: use one of {', '.join(FORMATS)}")
    if fmt == "mp3" and not mp3_available():
        raise ValueError(f"{field}='mp3' is unsupported on this server: its libsndfile cannot write MP3 "
                         "(libsndfile 1.1 or newer can); use wav, flac or pcm")
    return fmt


def encode_audio(pcm: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """Audio as a ``fmt`` file (``pcm``: the raw little-endian bytes).

    ``pcm``: int16 mono samples (``cosyjax.serving.pcm.pcm16``'s), or float audio, converted by that same
    ``pcm16``; every format starts from those int16 samples (wav and flac hold them exactly; mp3 encodes
    them, as floats ``pcm / 32768``).
    """
    pcm = pcm16(pcm)
    if fmt == "pcm":
        return pcm.astype("<i2").tobytes()
    if fmt == "wav":
        return wav16_bytes(pcm, sample_rate)
    import soundfile

    out = io.BytesIO()
    if fmt == "mp3":
        soundfile.write(out, pcm.astype(np.float32) / 32768.0, sample_rate, format="MP3", subtype="MPEG_LAYER_III")
    else:
        soundfile.write(out, pcm, sample_rate, format=fmt.upper(), subtype="PCM_16")
    return out.getvalue()


class SpeechRequest(BaseModel):
    model: Any = None
    input: str | None = None
    voice: str | None = None
    response_format: str | None = "wav"
    speed: float = 1.0
    stream: bool = False
    seed: int = 0


def add_routes(app: FastAPI, server: "_Server") -> None:
    """Add ``POST /v1/audio/speech`` to ``app``, running on ``server``'s model."""

    @app.post("/v1/audio/speech")
    async def speech(request: Request, body: SpeechRequest) -> Response:
        text = server.text("input", body.input)
        if not body.voice:
            raise HTTPException(400, "voice is missing: give the id of a speaker registered on this server "
                                     "(GET /speakers lists them, POST /speakers adds one)")
        try:
            voice = check_spk_id(body.voice, "voice")
            fmt = check_format(body.response_format)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        if not server.speakers.has(voice):
            raise HTTPException(400, f"voice={voice!r} is not a speaker registered on this server "
                                     "(GET /speakers lists them, POST /speakers adds one)")
        if not SPEED_RANGE[0] <= body.speed <= SPEED_RANGE[1]:
            raise HTTPException(400, f"speed={body.speed} is outside [{SPEED_RANGE[0]}, {SPEED_RANGE[1]}]")
        if body.stream and fmt != "pcm":
            raise HTTPException(400, f"stream=true sends raw 16-bit PCM chunks: set response_format to 'pcm' "
                                     f"(got {fmt!r}), or stream=false")
        server.check_seed(body.seed)
        model, stream, speed, seed = server.model, body.stream, body.speed, body.seed
        job = server.submit(request, "/v1/audio/speech", lambda: model.inference_zero_shot(
            text, "", None, zero_shot_spk_id=voice, stream=stream, speed=speed, seed=seed))
        if stream:
            return await server.stream(request, job, media_type=FORMATS["pcm"])
        pcm = await server.collect(request, job)
        return Response(encode_audio(pcm, server.sample_rate, fmt), media_type=FORMATS[fmt],
                        headers=server.headers)


__all__ = ["FORMATS", "SpeechRequest", "add_routes", "check_format", "encode_audio", "mp3_available"]
