"""HTTP server (cosyjax/server.py): upstream's routes and int16 PCM wire format on the committed tiny release."""

from __future__ import annotations

import asyncio
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
if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
    pytest.skip("python-multipart is not installed", allow_module_level=True)

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from cosyjax.server import INSTRUCT_MESSAGE, SFT_MESSAGE, create_app  # noqa: E402

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
def client(tts):
    with TestClient(create_app(tts, max_text_chars=200)) as c:
        yield c


def _upstream_pcm(gen) -> np.ndarray:
    """Upstream's conversion of each yield, written out independently of the server's code."""
    return np.concatenate([(np.asarray(out["tts_speech"]).reshape(-1) * (2 ** 15)).astype(np.int16) for out in gen])


def _pcm(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert len(response.content) % 2 == 0
    assert response.headers["x-sample-rate"] == "24000" and response.headers["x-channels"] == "1"
    return np.frombuffer(response.content, dtype="<i2")


def test_health(client, tts):
    r = client.get("/health")
    assert r.status_code == 200
    info = r.json()
    assert info["sample_rate"] == tts.sample_rate == 24000
    assert info["channels"] == 1 and info["sample_format"] == "s16le"
    assert info["dtype"] == "float32" and info["backend"] == "cpu"


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


def test_cached_speaker_by_spk_id(client, tts, prompt):
    path, data = prompt
    tts.add_zero_shot_spk(PROMPT_TEXT, path, "alice")
    try:
        assert "alice" in client.get("/health").json()["speakers"]
        got = _pcm(client.post("/inference_zero_shot", data={"tts_text": "Hello.", "spk_id": "alice"}))
        np.testing.assert_array_equal(got, _upstream_pcm(tts.inference_zero_shot("Hello.", PROMPT_TEXT, path)))
        r = client.post("/inference_zero_shot", data={"tts_text": "Hello.", "spk_id": "bob"})
        assert r.status_code == 400 and "bob" in r.json()["detail"]
    finally:
        tts.spk2info.pop("alice", None)


def test_sft_and_v1_instruct_explain_why_not(client):
    for route, message in (("/inference_sft", SFT_MESSAGE), ("/inference_instruct", INSTRUCT_MESSAGE)):
        for method in ("GET", "POST"):
            r = client.request(method, route, data={"tts_text": "Hello.", "spk_id": "中文女"})
            assert r.status_code == 501 and r.json()["detail"] == message
    assert "no SFT speakers" in SFT_MESSAGE and "instruct2" in INSTRUCT_MESSAGE


def test_bad_inputs_get_4xx_with_the_reason(client, prompt):
    _, data = prompt
    wav = {"prompt_wav": ("p.wav", data)}
    silent = io.BytesIO()
    soundfile.write(silent, np.zeros(32000, np.float32), 16000, format="WAV")

    def detail(route, fields, files=None, status=400):
        r = client.post(route, data=fields, files=files)
        assert r.status_code == status, (route, fields, r.text)
        return str(r.json()["detail"])

    assert "tts_text" in detail("/inference_cross_lingual", {"tts_text": "   "}, wav)
    assert "tts_text" in detail("/inference_cross_lingual", {}, wav, status=422)  # FastAPI: field required
    assert "nothing to speak" in detail("/inference_zero_shot", {"tts_text": "...!?", "prompt_text": PROMPT_TEXT},
                                        wav)
    assert "prompt_text" in detail("/inference_zero_shot", {"tts_text": "Hello."}, wav)
    assert "instruct_text" in detail("/inference_instruct2", {"tts_text": "Hello."}, wav)
    assert "at most 200" in detail("/inference_cross_lingual", {"tts_text": "a" * 201}, wav)
    # the file under the wrong field name, or not at all
    assert "prompt_wav" in detail("/inference_cross_lingual", {"tts_text": CROSS_TEXT},
                                  {"prompt_speech": ("p.wav", data)})
    assert "source_wav" in detail("/inference_vc", {}, wav)
    assert "not both" in detail("/inference_cross_lingual", {"tts_text": CROSS_TEXT, "spk_id": "x"}, wav)
    # audio the §2.1 loader refuses, named by field and file name
    msg = detail("/inference_cross_lingual", {"tts_text": CROSS_TEXT},
                 {"prompt_wav": ("bad.wav", b"RIFF\x00\x00\x00\x00WAVEfmt garbage")})
    assert msg.startswith("prompt_wav: bad.wav: cannot decode audio"), msg
    assert "silent" in detail("/inference_vc", {}, {"source_wav": ("s.wav", silent.getvalue()), **wav})
    assert "empty" in detail("/inference_cross_lingual", {"tts_text": CROSS_TEXT}, {"prompt_wav": ("p.wav", b"")})
    # options
    assert "speed" in detail("/inference_cross_lingual", {"tts_text": CROSS_TEXT, "stream": "true", "speed": "1.5"},
                             wav)
    assert "seed" in detail("/inference_cross_lingual", {"tts_text": CROSS_TEXT, "seed": "one"}, wav, status=422)
    assert "seed" in detail("/inference_cross_lingual", {"tts_text": CROSS_TEXT, "seed": str(2 ** 64)}, wav)
    assert client.get("/health").json()["pending"] == 0  # failed requests left nothing queued


# ---------------------------------------------------------------------------------------- concurrency
class _FakeModel:
    """Stands in for CosyVoice3: yields known chunks, can block, records overlap and closing."""

    sample_rate = 24000

    def __init__(self):
        self.spk2info: dict = {}
        self.gate = threading.Event()  # the first chunk waits for it
        self.resume = threading.Event()  # chunks after the first wait for it
        self.active = self.max_active = 0
        self.started = self.closed = self.chunks_made = 0

    def inference_cross_lingual(self, tts_text, prompt_wav=None, zero_shot_spk_id="", stream=False, speed=1.0,
                                seed=0):
        def gen():
            self.started += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                for i in range(3):
                    (self.gate if i == 0 else self.resume).wait(10)
                    self.chunks_made += 1
                    yield {"tts_speech": np.full((1, 4), (i + 1) / 4, np.float32)}
            finally:
                self.active -= 1
                self.closed += 1
        return gen()


_FAKE_PCM = b"".join(np.full(4, (i + 1) * 8192, "<i2").tobytes() for i in range(3))
_FAKE_FORM = {"tts_text": "Hi.", "spk_id": "x"}


def _until(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_requests_run_one_at_a_time_and_the_queue_is_bounded():
    fake = _FakeModel()
    fake.resume.set()
    with TestClient(create_app(fake, max_pending=3)) as c:
        results = []
        threads = [threading.Thread(target=lambda: results.append(c.post("/inference_cross_lingual",
                                                                           data=_FAKE_FORM)))
                   for _ in range(3)]
        for t in threads:
            t.start()
        _until(lambda: c.get("/health").json()["pending"] == 3 and fake.active == 1)
        busy = c.post("/inference_cross_lingual", data=_FAKE_FORM)
        assert busy.status_code == 503 and "busy" in busy.json()["detail"]
        fake.gate.set()
        for t in threads:
            t.join(20)
        assert [r.status_code for r in results] == [200] * 3
        assert all(r.content == _FAKE_PCM for r in results)
        assert fake.max_active == 1 and fake.closed == 3
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


def test_a_queued_request_whose_client_left_never_runs():
    fake = _FakeModel()
    fake.resume.set()
    with TestClient(create_app(fake)) as c:
        first = []
        holder = threading.Thread(target=lambda: first.append(c.post("/inference_cross_lingual", data=_FAKE_FORM)))
        holder.start()
        _until(lambda: fake.active == 1)  # the model is busy with the first request
        request = httpx.Request("POST", "http://test/inference_cross_lingual", data=_FAKE_FORM)
        status, _, bodies = _asgi(c.app, request, disconnect_after=0)  # queued, then gone
        assert status == 499 and bodies == []
        fake.gate.set()
        holder.join(20)
        assert first[0].status_code == 200 and first[0].content == _FAKE_PCM
        _until(lambda: c.get("/health").json()["pending"] == 0)
        assert fake.started == 1


def test_errors_before_the_first_chunk_become_status_codes():
    class Failing(_FakeModel):
        def inference_cross_lingual(self, tts_text, prompt_wav=None, **kwargs):
            def gen():
                if tts_text == "bad":
                    raise ValueError("tts_text 'bad' is bad")
                raise RuntimeError("device lost")
                yield
            return gen()

    with TestClient(create_app(Failing()), raise_server_exceptions=False) as c:
        r = c.post("/inference_cross_lingual", data={**_FAKE_FORM, "tts_text": "bad"})
        assert r.status_code == 400 and r.json()["detail"] == "tts_text 'bad' is bad"
        r = c.post("/inference_cross_lingual", data=_FAKE_FORM)
        assert r.status_code == 500 and "RuntimeError: device lost" in r.json()["detail"]
        assert c.get("/health").json()["pending"] == 0


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
def test_cli_serve_without_the_extra_says_what_to_install(monkeypatch, capsys):
    from cosyjax import cli

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    assert cli.main(["serve", "--model-dir", RELEASE]) == 2
    err = capsys.readouterr().err
    assert 'pip install "cosyjax[server]"' in err and "uvicorn" in err


@pytest.mark.slow
def test_cli_serve_over_a_socket(tiny_converted, prompt):
    """`cosyjax serve` under uvicorn: a real HTTP/1.1 chunked response."""
    _, data = prompt
    proc = subprocess.Popen([sys.executable, "-m", "cosyjax.cli", "serve", "--model-dir", RELEASE, "--converted-dir",
                             tiny_converted, "--host", "127.0.0.1", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        port, lines, end = None, [], time.monotonic() + 240
        while port is None and time.monotonic() < end:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port, "".join(lines)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            assert c.get("/health").json()["sample_rate"] == 24000
            r = c.post("/inference_cross_lingual", data={"tts_text": CROSS_TEXT, "stream": "true"},
                       files={"prompt_wav": ("p.wav", data)})
            assert r.status_code == 200 and r.headers.get("transfer-encoding") == "chunked"
            assert len(r.content) > 0 and len(r.content) % 2 == 0
    finally:
        proc.terminate()
        proc.wait(30)
