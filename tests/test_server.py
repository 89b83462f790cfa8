"""HTTP server (cosyjax/server.py) on the committed tiny release: upstream's routes and int16 PCM wire
format, the batching engine underneath (concurrent requests equal their solo runs), the OpenAI speech
route, the speaker registry, /synthesize, /metrics, auth, CORS and the CLI's safe defaults.

Everything listens on loopback only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import importlib.util
import io
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # fastapi.testclient
pytest.importorskip("prometheus_client")
if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
    pytest.skip("python-multipart is not installed", allow_module_level=True)

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from cosyjax.server import INSTRUCT_MESSAGE, SFT_MESSAGE, create_app  # noqa: E402
from cosyjax.serving.openai import mp3_available  # noqa: E402

from conftest import TINY_PROMPT_TEXT as PROMPT_TEXT, TINY_RELEASE as RELEASE, voice_wav_bytes  # noqa: E402

# Inputs as in test_pipeline.py: the jitted stages are module-level, so in one pytest run the
# server's requests reuse that file's compilations (same shapes) instead of compiling their own.
CROSS_TEXT = "You are a helpful assistant.<|endofprompt|>Hello."
INSTRUCT_TEXT = "You are a helpful assistant. Speak fast.<|endofprompt|>"


@pytest.fixture(scope="module")
def prompt(tmp_path_factory):
    """(path, bytes) of a 3.2 s 16 kHz prompt; the server gets the bytes, the pipeline the path."""
    data = voice_wav_bytes()
    path = tmp_path_factory.mktemp("audio") / "prompt.wav"
    path.write_bytes(data)
    return str(path), data


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, prompt):
    """(spkinfo dir, prompt dir holding voice.wav, a wav outside the prompt dir)."""
    root = tmp_path_factory.mktemp("server")
    (root / "prompts").mkdir()
    (root / "prompts" / "voice.wav").write_bytes(prompt[1])
    (root / "secret.wav").write_bytes(prompt[1])
    (root / "prompts" / "link.wav").symlink_to(root / "secret.wav")
    return str(root / "spkinfo"), str(root / "prompts"), str(root / "secret.wav")


@pytest.fixture(scope="module")
def client(tts, dirs):
    """One app (and engine) for the module; its shutdown restores ``tts`` for the other test files."""
    spkinfo, prompts, _ = dirs
    with TestClient(create_app(tts, max_text_chars=200, spkinfo_dir=spkinfo, prompt_dir=prompts)) as c:
        yield c
    assert tts.engine is None  # the app's engine is stopped and detached again


def _upstream_pcm(gen) -> np.ndarray:
    """Upstream's conversion of each yield, written out independently of the server's code."""
    return np.concatenate([(np.asarray(out["tts_speech"]).reshape(-1) * (2 ** 15)).astype(np.int16) for out in gen])


def _pcm(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert len(response.content) % 2 == 0
    assert response.headers["x-sample-rate"] == "24000" and response.headers["x-channels"] == "1"
    return np.frombuffer(response.content, dtype="<i2")


def _wav(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    audio, rate = soundfile.read(io.BytesIO(response.content), dtype="int16")
    assert rate == 24000 and audio.ndim == 1
    return audio


def _until(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_health(client, tts):
    r = client.get("/health")
    assert r.status_code == 200
    info = r.json()
    assert info["sample_rate"] == tts.sample_rate == 24000
    assert info["channels"] == 1 and info["sample_format"] == "s16le"
    assert info["dtype"] == "float32" and info["backend"] == "cpu"
    assert info["engine"]["slots"] == 8 and info["engine"]["pending"] == 0  # requests run on the engine


def test_routes_match_the_pipeline_bit_for_bit(client, tts, prompt):
    path, data = prompt
    cases = [
        ("/inference_zero_shot", {"tts_text": "Hello.", "prompt_text": PROMPT_TEXT, "seed": "3"},
         {"prompt_wav": ("p.wav", data)},
         lambda: tts.inference_zero_shot("Hello.", PROMPT_TEXT, path, seed=3)),
        ("/inference_cross_lingual", {"tts_text": CROSS_TEXT}, {"prompt_wav": ("p.wav", data)},
         lambda: tts.inference_cross_lingual(CROSS_TEXT, path)),
        ("/inference_instruct2", {"tts_text": "Hello.", "instruct_text": INSTRUCT_TEXT},
         {"prompt_wav": ("p.wav", data)},
         lambda: tts.inference_instruct2("Hello.", INSTRUCT_TEXT, path)),
        ("/inference_vc", {}, {"source_wav": ("s.wav", data), "prompt_wav": ("p.wav", data)},
         lambda: tts.inference_vc(path, path)),
    ]
    for route, fields, files, direct in cases:
        got = _pcm(client.post(route, data=fields, files=files))
        want = _upstream_pcm(direct())
        assert got.size > 0, route
        np.testing.assert_array_equal(got, want, err_msg=route)
        if route == "/inference_instruct2":  # upstream's routes answer GET with the same form too
            np.testing.assert_array_equal(_pcm(client.request("GET", route, data=fields, files=files)), want)


def test_stream_is_the_pipeline_stream_one_chunk_per_yield(client, tts, prompt):
    path, data = prompt
    fields = {"tts_text": "Hello.", "prompt_text": PROMPT_TEXT, "seed": "3", "stream": "true"}
    got = _pcm(client.post("/inference_zero_shot", data=fields, files={"prompt_wav": ("p.wav", data)}))
    direct = [(np.asarray(o["tts_speech"]).reshape(-1) * 2 ** 15).astype(np.int16)
              for o in tts.inference_zero_shot("Hello.", PROMPT_TEXT, path, seed=3, stream=True)]
    assert len(direct) >= 2
    np.testing.assert_array_equal(got, np.concatenate(direct))

    # Raw ASGI: one http.response.body message per model yield (TestClient joins them).
    request = httpx.Request("POST", "http://test/inference_zero_shot", data=fields,
                            files={"prompt_wav": ("p.wav", data)})
    status, headers, bodies = _asgi(client.app, request)
    assert status == 200 and (b"x-sample-rate", b"24000") in headers
    assert [np.frombuffer(b, "<i2").size for b in bodies if b] == [c.size for c in direct if c.size]


def test_sft_and_v1_instruct_explain_why_not(client):
    for route, message in (("/inference_sft", SFT_MESSAGE), ("/inference_instruct", INSTRUCT_MESSAGE)):
        for method in ("GET", "POST"):
            r = client.request(method, route, data={"tts_text": "Hello.", "spk_id": "中文女"})
            assert r.status_code == 501 and r.json()["detail"] == message
    assert "no SFT speakers" in SFT_MESSAGE and "instruct2" in INSTRUCT_MESSAGE


def test_bad_inputs_get_4xx_with_the_reason_and_the_server_keeps_serving(client, prompt):
    _, data = prompt
    wav = {"prompt_wav": ("p.wav", data)}
    silent = io.BytesIO()
    soundfile.write(silent, np.zeros(32000, np.float32), 16000, format="WAV")

    def detail(route, fields, files=None, status=400):
        r = client.post(route, data=fields, files=files)
        assert r.status_code == status, (route, fields, r.text)
        return str(r.json()["detail"])

    # missing, empty and whitespace-only text: one status, one message
    messages = {detail("/inference_cross_lingual", fields, wav) for fields in ({}, {"tts_text": ""},
                                                                                {"tts_text": "  \n "})}
    assert messages == {"tts_text is missing or empty"}
    assert "nothing to speak" in detail("/inference_zero_shot", {"tts_text": "...!?", "prompt_text": PROMPT_TEXT},
                                        wav)
    assert detail("/inference_zero_shot", {"tts_text": "Hello.", "prompt_text": " "}, wav) == \
        "prompt_text is missing or empty"
    assert "instruct_text" in detail("/inference_instruct2", {"tts_text": "Hello."}, wav)
    assert "at most 200" in detail("/inference_cross_lingual", {"tts_text": "a" * 201}, wav)
    # the file under the wrong field name, or not at all
    assert "prompt_wav" in detail("/inference_cross_lingual", {"tts_text": CROSS_TEXT},
                                  {"prompt_speech": ("p.wav", data)})
    assert "source_wav" in detail("/inference_vc", {}, wav)
    assert "not both" in detail("/inference_cross_lingual", {"tts_text": CROSS_TEXT, "spk_id": "x"}, wav)
    assert "'bob' is not a voice registered" in detail("/inference_zero_shot", {"tts_text": "Hi.", "spk_id": "bob"})
    # audio the §2.1 loader refuses, named by form field and file name (never a BytesIO repr)
    for name, blob, reason in (("bad.wav", b"RIFF\x00\x00\x00\x00WAVEfmt garbage", "cannot decode audio"),
                               ("noise.bin", np.random.default_rng(0).bytes(4096), "cannot decode audio"),
                               ("phone.wav", voice_wav_bytes(sr=8000), "8000 Hz is below the minimum 16000 Hz")):
        msg = detail("/inference_cross_lingual", {"tts_text": CROSS_TEXT}, {"prompt_wav": (name, blob)})
        assert msg.startswith(f"prompt_wav: {name}: ") and reason in msg and "BytesIO" not in msg, msg
    assert "silent" in detail("/inference_vc", {}, {"source_wav": ("s.wav", silent.getvalue()), **wav})
    assert detail("/inference_cross_lingual", {"tts_text": CROSS_TEXT}, {"prompt_wav": ("p.wav", b"")}) == \
        "prompt_wav (p.wav): the uploaded file is empty"
    # options
    assert "speed" in detail("/inference_cross_lingual", {"tts_text": CROSS_TEXT, "stream": "true", "speed": "1.5"},
                             wav)
    assert "seed" in detail("/inference_cross_lingual", {"tts_text": CROSS_TEXT, "seed": "one"}, wav, status=422)
    assert "seed" in detail("/inference_cross_lingual", {"tts_text": CROSS_TEXT, "seed": str(2 ** 64)}, wav)
    assert client.get("/health").json()["pending"] == 0  # failed requests left nothing in flight
    assert _pcm(client.post("/inference_zero_shot", data={"tts_text": "Hello.", "prompt_text": PROMPT_TEXT},
                            files=wav)).size > 0


# ---------------------------------------------------------------------------------------- registry, OpenAI, seed-fork
def test_speaker_registry_openai_speech_and_synthesize(client, tts, prompt, dirs):
    path, data = prompt
    spkinfo, _, outside = dirs
    r = client.post("/speakers", data={"spk_id": "alice", "prompt_text": PROMPT_TEXT},
                    files={"prompt_wav": ("alice.wav", data)})
    assert r.status_code == 201 and r.json() == {"spk_id": "alice", "persisted": True}
    assert sorted(os.listdir(spkinfo)) == ["alice.json", "alice.npz"]  # no temp files left
    assert "alice" in client.get("/speakers").json()["speakers"]
    # refused registrations
    r = client.post("/speakers", data={"spk_id": "alice", "prompt_text": PROMPT_TEXT},
                    files={"prompt_wav": ("alice.wav", data)})
    assert r.status_code == 409 and "already registered" in r.json()["detail"]
    for bad in ("../evil", "a/b", ".hidden", "x" * 65):
        r = client.post("/speakers", data={"spk_id": bad, "prompt_text": PROMPT_TEXT},
                        files={"prompt_wav": ("v.wav", data)})
        assert r.status_code == 400 and "path characters" in r.json()["detail"], bad
    r = client.post("/speakers", data={"spk_id": "bob", "prompt_text": PROMPT_TEXT},
                    files={"prompt_wav": ("junk.wav", b"not audio at all")})
    assert r.status_code == 400 and r.json()["detail"].startswith("prompt_wav: junk.wav: cannot decode audio")
    r = client.post("/speakers", data={"spk_id": "bob", "prompt_text": ""}, files={"prompt_wav": ("v.wav", data)})
    assert r.status_code == 400 and r.json()["detail"] == "prompt_text is missing or empty"
    assert sorted(os.listdir(spkinfo)) == ["alice.json", "alice.npz"]

    # the upstream route with the registered voice = the pipeline with the same transcript and prompt
    want = _pcm(client.post("/inference_zero_shot", data={"tts_text": "Hello.", "spk_id": "alice", "seed": "5"}))
    np.testing.assert_array_equal(want, _upstream_pcm(tts.inference_zero_shot("Hello.", PROMPT_TEXT, path, seed=5)))

    # OpenAI: a playable 24 kHz wav holding the same samples; flac too; pcm streamed
    speech = {"model": "tts-1", "input": "Hello.", "voice": "alice", "seed": 5}
    r = client.post("/v1/audio/speech", json=speech)
    assert r.headers["content-type"] == "audio/wav"
    np.testing.assert_array_equal(_wav(r), want)
    np.testing.assert_array_equal(_wav(client.post("/v1/audio/speech", json={**speech, "response_format": "flac"})),
                                  want)
    streamed = client.post("/v1/audio/speech", json={**speech, "response_format": "pcm", "stream": True})
    assert streamed.headers["content-type"] == "audio/pcm"
    np.testing.assert_array_equal(_pcm(streamed), _upstream_pcm(tts.inference_zero_shot(
        "Hello.", PROMPT_TEXT, path, seed=5, stream=True)))
    r = client.post("/v1/audio/speech", json={**speech, "response_format": "mp3"})
    if mp3_available():
        audio, rate = soundfile.read(io.BytesIO(r.content), dtype="int16")
        assert r.status_code == 200 and rate == 24000 and abs(audio.size - want.size) < 4800  # codec delay/padding
    else:
        assert r.status_code == 400 and "mp3" in r.json()["detail"] and "unsupported" in r.json()["detail"]
    for body, words in (({**speech, "voice": "nobody"}, "'nobody' is not a speaker registered"),
                        ({**speech, "voice": "../alice"}, "path characters"),
                        ({**speech, "input": "  "}, "input is missing or empty"),
                        ({**speech, "response_format": "opus"}, "'opus' is not supported"),
                        ({**speech, "stream": True}, "set response_format to 'pcm'"),
                        ({**speech, "speed": 9}, "speed=9")):
        r = client.post("/v1/audio/speech", json=body)
        assert r.status_code == 400 and words in r.json()["detail"], (body, r.text)

    # Another replica registered the voice: an id missing in memory is read again from the directory.
    cached = tts.spk2info.pop("alice")
    try:
        np.testing.assert_array_equal(_wav(client.post("/v1/audio/speech", json=speech)), want)
        assert "alice" in tts.spk2info
    finally:
        tts.spk2info["alice"] = cached

    # /synthesize: base64, a registered id, a file in --prompt-dir; never a path outside it
    body = {"text": "Hello.", "prompt_text": PROMPT_TEXT, "seed": 5}
    from_b64 = _wav(client.post("/synthesize", json={**body, "prompt_audio": base64.b64encode(data).decode()}))
    np.testing.assert_array_equal(from_b64, want)  # the same voice as registered from the same recording
    np.testing.assert_array_equal(_wav(client.post("/synthesize", json={**body, "prompt_audio": "alice"})), want)
    np.testing.assert_array_equal(_wav(client.post("/synthesize", json={**body, "prompt_audio": "voice.wav"})), want)
    for name, words in (("../secret.wav", "'..' is refused"), ("sub/../../secret.wav", "'..' is refused"),
                        (outside, "absolute paths are refused"), ("link.wav", "outside the server's prompt dir"),
                        ("missing.wav", "no such file"), ("bob", "'bob' is not a registered speaker id"),
                        ("not base64!", "neither a registered speaker id"),
                        (base64.b64encode(b"noise" * 50).decode(), "prompt_audio: (base64): cannot decode")):
        r = client.post("/synthesize", json={**body, "prompt_audio": name})
        assert r.status_code == 400 and words in r.json()["detail"], (name, r.text)
    r = client.post("/synthesize", json={**body, "text": " ", "prompt_audio": "alice"})
    assert r.status_code == 400 and r.json()["detail"] == "text is missing or empty"

    # /metrics: the named series, with the values these requests left
    metrics = _metrics(client.get("/metrics").text)
    assert metrics[("cosyjax_requests_total", (("route", "/synthesize"), ("status", "200")))] == 3
    assert metrics[("cosyjax_requests_total", (("route", "/speakers"), ("status", "201")))] == 1
    assert metrics[("cosyjax_requests_total", (("route", "/v1/audio/speech"), ("status", "400")))] >= 6
    assert metrics[("cosyjax_engine_queue_depth", ())] == 0 and metrics[("cosyjax_engine_active_slots", ())] == 0
    assert metrics[("cosyjax_engine_slots", ())] == 8 and metrics[("cosyjax_engine_tokens_total", ())] > 0
    assert metrics[("cosyjax_first_chunk_seconds_count", ())] >= 8 and metrics[("cosyjax_rtf_count", ())] >= 8
    assert metrics[("cosyjax_engine_requests_total", (("outcome", "completed"),))] >= 8
    assert metrics[("cosyjax_requests_in_flight", ())] == 0


def _metrics(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ---------------------------------------------------------------------------------------- engine behaviour
def test_client_disconnect_cancels_the_engine_request(client, prompt):
    engine = client.app.state.engine
    before = engine.stats()["cancelled"]
    request = httpx.Request("POST", "http://test/inference_cross_lingual",
                            data={"tts_text": "You are a helpful assistant.<|endofprompt|>Hello there, a longer one.",
                                  "stream": "true"}, files={"prompt_wav": ("p.wav", prompt[1])})
    status, _, bodies = _asgi(client.app, request, disconnect_after=1)
    assert status == 200 and len(bodies) == 1
    _until(lambda: engine.stats()["cancelled"] == before + 1 and engine.stats()["slots_busy"] == 0)
    _until(lambda: client.get("/health").json()["pending"] == 0)


def test_full_engine_queue_is_503_with_retry_after(client, prompt, monkeypatch):
    engine = client.app.state.engine
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, max_pending=1, retry_after=2.5))
    gate, admit = threading.Event(), engine._admit

    def gated_admit():  # the scheduler takes nobody from the queue until the gate opens
        if gate.wait(0.05):
            admit()

    monkeypatch.setattr(engine, "_admit", gated_admit)
    form = {"tts_text": "Hello.", "prompt_text": PROMPT_TEXT}
    files = {"prompt_wav": ("p.wav", prompt[1])}
    first = []
    waiting = threading.Thread(target=lambda: first.append(client.post("/inference_zero_shot", data=form,
                                                                       files=files)))
    waiting.start()
    try:
        _until(lambda: engine.stats()["pending"] == 1)
        r = client.post("/inference_zero_shot", data=form, files=files)
        assert r.status_code == 503 and r.headers["retry-after"] == "3" and "max_pending=1" in r.json()["detail"]
    finally:
        gate.set()
        waiting.join(60)
    assert _pcm(first[0]).size > 0


@pytest.fixture(scope="module")
def live(client):
    """The module's app under a real uvicorn on 127.0.0.1 (an ephemeral port); lifespan stays the TestClient's."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(client.app, host="127.0.0.1", port=0, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _until(lambda: server.started, timeout=30)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def test_concurrent_requests_over_a_socket_equal_their_solo_runs(client, live, prompt):
    requests = pytest.importorskip("requests")
    path, data = prompt
    engine = client.app.state.engine
    _register_alice(client, data)

    def upstream_client(mode, payload):
        """The request upstream's runtime/python/fastapi/client.py sends: GET, a multipart form with the
        file named 'prompt_wav', the body read in 16000-byte pieces."""
        files = [("prompt_wav", ("prompt_wav", io.BytesIO(data), "application/octet-stream"))]
        response = requests.request("GET", f"{live}/inference_{mode}", data=payload, files=files, stream=True,
                                    timeout=300)
        assert response.status_code == 200, response.text
        return np.frombuffer(b"".join(response.iter_content(chunk_size=16000)), dtype=np.int16)

    def speech(text, seed, stream=False):
        body = {"input": text, "voice": "alice", "seed": seed, "response_format": "pcm", "stream": stream}
        return _pcm(httpx.post(f"{live}/v1/audio/speech", json=body, timeout=300))

    calls = [  # mixed lengths (2.4 to 8.8 s of audio), modes and stream settings
        lambda: upstream_client("zero_shot", {"tts_text": "Hello.", "prompt_text": PROMPT_TEXT}),
        lambda: upstream_client("zero_shot", {"tts_text": "Good morning.", "prompt_text": PROMPT_TEXT,
                                              "seed": "7", "stream": "true"}),
        lambda: upstream_client("cross_lingual", {"tts_text": "<|endofprompt|>Hi.", "seed": "2"}),
        lambda: upstream_client("instruct2", {"tts_text": "Hi.", "instruct_text": INSTRUCT_TEXT}),
        lambda: speech("Hi.", 1),
        lambda: speech("Good morning.", 4),
        lambda: speech("Yes.", 9, stream=True),
        lambda: speech("Hello.", 3, stream=True),
    ]
    solo = [call() for call in calls]  # one at a time
    assert all(s.size > 0 for s in solo)
    results: list = [None] * len(calls)
    busy = []

    def run(i):
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        busy.append(engine.stats()["slots_busy"])
        time.sleep(0.02)
    for t in threads:
        t.join(300)
    for i, (got, want) in enumerate(zip(results, solo)):
        np.testing.assert_array_equal(got, want, err_msg=f"request {i}")  # int16 PCM equal
    assert max(busy) >= 2  # they really shared the engine's decode batch


def _register_alice(client, data):
    if "alice" not in client.get("/speakers").json()["speakers"]:  # when run without the registry test
        client.post("/speakers", data={"spk_id": "alice", "prompt_text": PROMPT_TEXT},
                    files={"prompt_wav": ("alice.wav", data)}).raise_for_status()


def test_short_request_behind_a_long_one_returns_first(client, live, prompt):
    engine = client.app.state.engine
    _register_alice(client, prompt[1])
    done: dict[str, float] = {}

    def speak(name, text):
        r = httpx.post(f"{live}/v1/audio/speech", json={"input": text, "voice": "alice", "response_format": "pcm"},
                       timeout=300)
        assert r.status_code == 200, r.text
        done[name] = time.monotonic()

    before = engine.stats()["submitted"]
    long = threading.Thread(target=speak, args=("long", "Good morning."))  # 8.8 s of audio against 2.4 s
    long.start()
    _until(lambda: engine.stats()["submitted"] > before and engine.stats()["slots_busy"] >= 1)
    short = threading.Thread(target=speak, args=("short", "Hi."))
    short.start()
    short.join(300)
    long.join(300)
    assert done["short"] < done["long"]


# ---------------------------------------------------------------------------------------- stand-in model
class _FakeModel:
    """Stands in for CosyVoice3 (no engine): yields known chunks, can block, records overlap and closing."""

    sample_rate = 24000

    def __init__(self):
        self.spk2info: dict = {"x": {}}
        self.gate = threading.Event()  # the first chunk waits for it
        self.resume = threading.Event()  # chunks after the first wait for it
        self.active = self.max_active = 0
        self.started = self.closed = self.chunks_made = 0
        self._lock = threading.Lock()

    def inference_cross_lingual(self, tts_text, prompt_wav=None, zero_shot_spk_id="", stream=False, speed=1.0,
                                seed=0):
        def gen():
            with self._lock:
                self.started += 1
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            try:
                for i in range(3):
                    (self.gate if i == 0 else self.resume).wait(10)
                    self.chunks_made += 1
                    yield {"tts_speech": np.full((1, 4), (i + 1) / 4, np.float32)}
            finally:
                with self._lock:
                    self.active -= 1
                    self.closed += 1
        return gen()


_FAKE_PCM = b"".join(np.full(4, (i + 1) * 8192, "<i2").tobytes() for i in range(3))
_FAKE_FORM = {"tts_text": "Hi.", "spk_id": "x"}


def test_requests_run_concurrently_and_in_flight_requests_are_bounded():
    fake = _FakeModel()
    fake.resume.set()
    with TestClient(create_app(fake, max_pending=3)) as c:
        results = []
        threads = [threading.Thread(target=lambda: results.append(c.post("/inference_cross_lingual",
                                                                           data=_FAKE_FORM)))
                   for _ in range(3)]
        for t in threads:
            t.start()
        _until(lambda: c.get("/health").json()["pending"] == 3 and fake.active == 3)  # all three at once
        busy = c.post("/inference_cross_lingual", data=_FAKE_FORM)
        assert busy.status_code == 503 and "busy" in busy.json()["detail"] and busy.headers["retry-after"] == "1"
        fake.gate.set()
        for t in threads:
            t.join(20)
        assert [r.status_code for r in results] == [200] * 3
        assert all(r.content == _FAKE_PCM for r in results)
        assert fake.max_active == 3 and fake.closed == 3
        assert c.get("/health").json()["pending"] == 0


def test_client_disconnect_stops_the_request():
    fake = _FakeModel()
    fake.gate.set()
    app = create_app(fake)
    request = httpx.Request("POST", "http://test/inference_cross_lingual", data=_FAKE_FORM)
    status, _, bodies = _asgi(app, request, disconnect_after=1)
    assert status == 200 and bodies == [_FAKE_PCM[:8]]
    fake.resume.set()  # chunk 2 is made only now, after the server saw the disconnect
    _until(lambda: fake.closed == 1)
    assert fake.chunks_made < 3  # stopped at the next chunk boundary, not run to the end


class _KnownAudio:
    """Stands in for CosyVoice3 (no engine): every route's generator yields ``_EDGE_AUDIO`` in two chunks."""

    sample_rate = 24000

    def __init__(self):
        self.spk2info: dict = {"v": {}}

    def _chunks(self):
        half = _EDGE_AUDIO.size // 2
        yield {"tts_speech": _EDGE_AUDIO[None, :half].copy()}
        yield {"tts_speech": _EDGE_AUDIO[None, half:].copy()}

    def inference_cross_lingual(self, *args, **kwargs):
        return self._chunks()

    def inference_zero_shot(self, *args, **kwargs):
        return self._chunks()


# Values where rounding and truncating toward zero differ: half- and fractional LSB steps on both sides of
# zero, and the clipped ends (1.0 -> 32767, below -1 -> -32768).
_EDGE_AUDIO = np.concatenate([np.arange(-40, 41) * 0.5, [0.3, -0.3, 0.7, -0.7, 1.5, -1.5, 2.99, -2.99, 100.5,
                                                           -100.5, 32766.5, -32767.5, 32768.0, -32768.0,
                                                           -40000.0]]).astype(np.float32) / np.float32(32768)


def test_every_16_bit_output_holds_the_same_truncated_samples(tmp_path, monkeypatch):
    """The web UI's wav, ``cosyjax tts``'s wav file, the HTTP wire PCM (upstream routes, streamed), the
    /synthesize wav and the OpenAI route's wav/flac/pcm: one set of int16 samples, upstream's
    ``(x * 2**15).astype(int16)`` (truncated toward zero, clipped), not libsndfile's rounding."""
    import math

    from cosyjax import pipeline
    from cosyjax.cli import main
    from cosyjax.serving.pcm import pcm16, to_pcm16, wav16_bytes
    from cosyjax.webui import wav_bytes

    want = np.array([max(-32768, min(32767, math.trunc(float(x) * 32768))) for x in _EDGE_AUDIO], np.int16)
    assert not np.array_equal(want, np.clip(np.round(_EDGE_AUDIO.astype(np.float64) * 32768), -32768, 32767))

    def wav_samples(data: bytes, rate: int = 24000) -> np.ndarray:
        info = soundfile.info(io.BytesIO(data))
        assert (info.format, info.subtype, info.channels, info.samplerate) == ("WAV", "PCM_16", 1, rate)
        return soundfile.read(io.BytesIO(data), dtype="int16")[0]

    np.testing.assert_array_equal(pcm16(_EDGE_AUDIO), want)
    np.testing.assert_array_equal(np.frombuffer(to_pcm16(_EDGE_AUDIO[None]), "<i2"), want)
    np.testing.assert_array_equal(wav_samples(wav16_bytes(_EDGE_AUDIO, 24000)), want)
    webui = wav_samples(wav_bytes(_EDGE_AUDIO, 24000))

    fake = _KnownAudio()
    monkeypatch.setattr(pipeline.CosyVoice3, "from_pretrained", classmethod(lambda cls, *a, **k: fake))
    prompt_wav, out = tmp_path / "prompt.wav", tmp_path / "out.wav"
    prompt_wav.write_bytes(voice_wav_bytes())
    assert main(["tts", "--model-dir", RELEASE, "--text", "Hello.", "--prompt-wav", str(prompt_wav),
                 "--prompt-text", "A prompt.", "-o", str(out)]) == 0
    cli = wav_samples(out.read_bytes())
    assert sorted(os.listdir(tmp_path)) == ["out.wav", "prompt.wav"]  # the temp file was renamed

    with TestClient(create_app(fake)) as c:
        r = c.post("/inference_cross_lingual", data={"tts_text": "Hi.", "spk_id": "v"})
        assert r.status_code == 200, r.text
        wire = np.frombuffer(r.content, "<i2")
        r = c.post("/synthesize", json={"text": "Hi.", "prompt_audio": "v"})
        assert r.status_code == 200, r.text
        synthesize = wav_samples(r.content)
        speech = {}
        for fmt in ("wav", "flac", "pcm"):
            r = c.post("/v1/audio/speech", json={"input": "Hi.", "voice": "v", "response_format": fmt})
            assert r.status_code == 200, r.text
            speech[fmt] = (np.frombuffer(r.content, "<i2") if fmt == "pcm" else wav_samples(r.content) if fmt == "wav"
                           else soundfile.read(io.BytesIO(r.content), dtype="int16")[0])
    for name, got in {"webui": webui, "cli": cli, "wire": wire, "synthesize": synthesize,
                      **{f"openai {k}": v for k, v in speech.items()}}.items():
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_errors_before_the_first_chunk_become_status_codes():
    from cosyjax.serving import QueueFull

    class Failing(_FakeModel):
        def inference_cross_lingual(self, tts_text, prompt_wav=None, **kwargs):
            def gen():
                if tts_text == "bad":
                    raise ValueError("tts_text 'bad' is bad")
                if tts_text == "full":
                    raise QueueFull("64 requests are waiting", retry_after=4.2)
                raise RuntimeError("device lost")
                yield
            return gen()

    with TestClient(create_app(Failing()), raise_server_exceptions=False) as c:
        r = c.post("/inference_cross_lingual", data={**_FAKE_FORM, "tts_text": "bad"})
        assert r.status_code == 400 and r.json()["detail"] == "tts_text 'bad' is bad"
        r = c.post("/inference_cross_lingual", data={**_FAKE_FORM, "tts_text": "full"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5" and "64 requests" in r.json()["detail"]
        r = c.post("/inference_cross_lingual", data=_FAKE_FORM)
        assert r.status_code == 500 and "RuntimeError: device lost" in r.json()["detail"]
        assert c.get("/health").json()["pending"] == 0


def test_shutdown_refuses_new_requests_and_drains_those_in_flight():
    fake = _FakeModel()
    fake.resume.set()
    app = create_app(fake, drain_seconds=20)
    client = TestClient(app)
    client.__enter__()
    results = []
    request = threading.Thread(target=lambda: results.append(client.post("/inference_cross_lingual",
                                                                          data=_FAKE_FORM)))
    request.start()
    _until(lambda: fake.active == 1)
    closing = threading.Thread(target=client.__exit__, args=(None, None, None))
    closing.start()
    try:
        _until(lambda: not app.state.server.accepting)
        refused = client.post("/inference_cross_lingual", data=_FAKE_FORM)
        assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]
        assert "retry-after" in refused.headers
        assert closing.is_alive()  # still draining: the first request has not finished
    finally:
        fake.gate.set()
        request.join(20)
        closing.join(30)
    assert results[0].status_code == 200 and results[0].content == _FAKE_PCM  # finished, not cut off
    assert not closing.is_alive() and fake.closed == 1


def test_api_key_and_cors():
    fake = _FakeModel()
    fake.gate.set()
    fake.resume.set()
    auth = {"Authorization": "Bearer s3cret"}
    with TestClient(create_app(fake, api_key="s3cret")) as c:
        assert c.get("/health").status_code == 200  # open: load balancers probe it
        for path in ("/speakers", "/metrics", "/openapi.json"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = c.get(path, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
            assert c.get(path, headers=auth).status_code == 200, path
        assert c.post("/inference_cross_lingual", data=_FAKE_FORM).status_code == 401
        r = c.post("/inference_cross_lingual", data=_FAKE_FORM, headers=auth)
        assert r.status_code == 200 and r.content == _FAKE_PCM
        assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": "https://a.example"}).headers
    origin = {"Origin": "https://app.example"}
    with TestClient(create_app(fake, api_key="s3cret", cors_origins=("https://app.example",))) as c:
        r = c.get("/speakers", headers={**origin, **auth})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-credentials" not in r.headers
        preflight = c.options("/v1/audio/speech", headers={**origin, "Access-Control-Request-Method": "POST",
                                                           "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200  # answered by CORS before the key is asked for
        assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": "https://evil.example"}).headers


def _asgi(app, request: httpx.Request, disconnect_after: int | None = None):
    """Run one request through the ASGI app directly; returns (status, headers, body chunks).

    ASGI spec 2.3, as uvicorn sends it: starlette listens for ``http.disconnect`` while streaming.
    ``disconnect_after``: ``receive`` reports the disconnect after that many body chunks.
    """
    body = request.read()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": request.method, "scheme": "http", "path": request.url.path,
             "raw_path": request.url.raw_path, "query_string": b"", "root_path": "",
             "headers": [(k.lower(), v) for k, v in request.headers.raw], "client": ("test", 1),
             "server": ("test", 80)}
    out = {"status": None, "headers": [], "bodies": []}

    async def run():
        gone = asyncio.Event()
        if disconnect_after == 0:
            gone.set()
        received = False

        async def receive():
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                out["status"], out["headers"] = message["status"], message["headers"]
            elif message["type"] == "http.response.body":
                if message["body"] or message.get("more_body"):
                    out["bodies"].append(message["body"])
                if disconnect_after is not None and len(out["bodies"]) >= disconnect_after:
                    gone.set()

        await app(scope, receive, send)

    asyncio.run(run())
    return out["status"], out["headers"], out["bodies"]


# ---------------------------------------------------------------------------------------- CLI
def test_cli_serve_safe_defaults_and_options(monkeypatch, capsys, tmp_path):
    from cosyjax import cli

    parser = cli.build_parser()
    args = parser.parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.cors_origin is None and args.api_key is None and not args.no_warmup
    assert args.grpc_port == 50001 and not args.no_grpc  # upstream's gRPC service is on by default
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: 127.0.0.1" in text and "--cors-origin ORIGIN" in text and "COSYJAX_API_KEY" in text

    seen = {}

    class Loaded:  # what CosyVoice3.from_pretrained returns, as far as serve uses it
        sample_rate = 24000
        model = type("M", (), {"policy": type("P", (), {"name": "float32"})})()
        device = type("D", (), {"platform": "cpu"})()

    import uvicorn

    import cosyjax.pipeline
    import cosyjax.server

    monkeypatch.setattr(cosyjax.pipeline.CosyVoice3, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: seen.setdefault("load", kw) and Loaded()))
    monkeypatch.setattr(cosyjax.server, "create_app", lambda model, **kw: seen.setdefault("app", kw) and "APP")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.setdefault("run", (app, kw)))
    import cosyjax.serving.grpc_service as grpc_service

    class GrpcServer:  # what serve_grpc returns, as far as serve uses it: stop(grace).wait()
        def stop(self, grace):
            seen["grpc_stop"] = grace
            done = threading.Event()
            done.set()
            return done

    monkeypatch.setattr(grpc_service, "serve_grpc",
                        lambda model, host, port, **kw: seen.setdefault("grpc", (host, port, kw)) and GrpcServer())
    monkeypatch.setenv("COSYJAX_API_KEY", "from-env")
    assert cli.main(["serve", "--model-dir", RELEASE, "--cors-origin", "https://a.example", "--cors-origin",
                     "https://b.example", "--slots", "4", "--no-warmup", "--prompt-dir", str(tmp_path)]) == 0
    app = seen["app"]
    assert app["api_key"] == "from-env" and app["cors_origins"] == ("https://a.example", "https://b.example")
    assert app["engine_config"].slots == 4 and app["warmup"] is False and app["prompt_dir"] == str(tmp_path)
    assert seen["load"]["progress"] is False
    assert seen["run"][0] == "APP" and seen["run"][1]["host"] == "127.0.0.1"
    host, port, kw = seen["grpc"]  # the gRPC service: same host, same key, same engine settings
    assert (host, port, kw["api_key"], kw["engine_config"].slots) == ("127.0.0.1", 50001, "from-env", 4)
    assert seen["grpc_stop"] == 30.0  # stopped after uvicorn returns, with the HTTP drain time
    out = capsys.readouterr().out
    assert "auth on" in out and "grpc://127.0.0.1:50001" in out

    seen.clear()
    assert cli.main(["serve", "--model-dir", RELEASE, "--no-grpc"]) == 0
    assert "grpc" not in seen and "grpc://" not in capsys.readouterr().out


def test_cli_serve_without_the_extra_says_what_to_install(monkeypatch, capsys):
    from cosyjax import cli

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    assert cli.main(["serve", "--model-dir", RELEASE]) == 2
    err = capsys.readouterr().err
    assert 'pip install "cosyjax[server]"' in err and "uvicorn" in err


@pytest.mark.slow
def test_cli_serve_over_a_socket(tiny_converted, prompt):
    """`cosyjax serve` under uvicorn: warm-up at start, a real HTTP/1.1 chunked response, upstream's gRPC
    request on the gRPC port beside it, graceful stop."""
    from test_grpc import free_port, load_wav_16k, receive, upstream_request

    from cosyjax.serving import cosyvoice_pb2_grpc

    _, data = prompt
    grpc_port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cosyjax.cli", "serve", "--model-dir", RELEASE, "--converted-dir",
                             tiny_converted, "--port", "0", "--grpc-port", str(grpc_port), "--slots", "2"],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        port, lines, end = None, [], time.monotonic() + 600
        while port is None and time.monotonic() < end:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port, "".join(lines)
        assert any("warm-up:" in line for line in lines), "".join(lines)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            assert c.get("/health").json()["sample_rate"] == 24000
            r = c.post("/inference_cross_lingual", data={"tts_text": CROSS_TEXT, "stream": "true"},
                       files={"prompt_wav": ("p.wav", data)})
            assert r.status_code == 200 and r.headers.get("transfer-encoding") == "chunked"
            assert len(r.content) > 0 and len(r.content) % 2 == 0
        import grpc

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = cosyvoice_pb2_grpc.CosyVoiceStub(channel)
            audio = receive(stub, upstream_request("cross_lingual", CROSS_TEXT, prompt_speech=load_wav_16k()))
            assert audio.size > 0 and audio.dtype == np.int16
    finally:
        proc.terminate()
        proc.wait(60)
