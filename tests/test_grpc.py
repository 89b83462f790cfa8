"""gRPC service (cosyjax/serving/grpc_service.py): upstream CosyVoice's contract, on 127.0.0.1 only.

Requests are built as upstream's ``runtime/python/grpc/client.py`` builds them: the same message
classes, the same field assignments and ``CopyFrom`` into ``Request``, and its prompt encoding
``(load_wav(prompt_wav, 16000).numpy() * 2**15).astype(np.int16).tobytes()``.  That client imports
torchaudio and upstream's package, so its ``main()`` is not run here; :func:`upstream_request`
re-states its field assignments, with ``load_wav`` replaced by a soundfile read of a 16 kHz WAV
(what torchaudio returns for it: int16 / 2**15, no resampling).  The response is read as that
client reads it: the ``tts_audio`` bytes of every message joined, ``np.frombuffer(..., np.int16)``.
With ``COSYJAX_REFERENCE_REPO`` set, the same assignments also run on modules generated from
upstream's own ``cosyvoice.proto`` (a subprocess), against this service.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile

grpc = pytest.importorskip("grpc")

from cosyjax.pipeline import CosyVoice3  # noqa: E402
from cosyjax.serving import cosyvoice_pb2, cosyvoice_pb2_grpc  # noqa: E402
from cosyjax.serving.engine import Engine, EngineConfig, QueueFull  # noqa: E402
from cosyjax.serving.grpc_service import INSTRUCT_MESSAGE, SFT_MESSAGE, serve_grpc  # noqa: E402

from conftest import TINY_PROMPT_TEXT as PROMPT_TEXT, TINY_RELEASE as RELEASE, voice_wav_bytes  # noqa: E402

# The texts of test_server.py / test_pipeline.py: same shapes, so the persistent compilation cache is shared.
TTS_TEXT = "Hello."
CROSS_TEXT = "You are a helpful assistant.<|endofprompt|>Hello."
API_KEY = "test-key"
RPC_TIMEOUT = 120  # seconds: every call is bounded
REFERENCE_REPO = os.environ.get("COSYJAX_REFERENCE_REPO")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_wav_16k() -> np.ndarray:
    """Stand-in for upstream's ``load_wav(prompt_wav, 16000)``: [1, T] float32 of a 16 kHz 16-bit WAV."""
    wav, sr = soundfile.read(io.BytesIO(voice_wav_bytes()), dtype="float32")
    assert sr == 16000
    return wav[None, :]


def upstream_request(mode: str, tts_text: str, *, spk_id: str = "中文女", prompt_text: str = "",
                     prompt_speech: np.ndarray | None = None, instruct_text: str = "") -> cosyvoice_pb2.Request:
    """The ``Request`` upstream's client.py ``main()`` builds for ``--mode`` (its field assignments, restated)."""
    request = cosyvoice_pb2.Request()
    if mode == "sft":
        sft_request = cosyvoice_pb2.sftRequest()
        sft_request.spk_id = spk_id
        sft_request.tts_text = tts_text
        request.sft_request.CopyFrom(sft_request)
    elif mode == "zero_shot":
        zero_shot_request = cosyvoice_pb2.zeroshotRequest()
        zero_shot_request.tts_text = tts_text
        zero_shot_request.prompt_text = prompt_text
        zero_shot_request.prompt_audio = (prompt_speech * (2 ** 15)).astype(np.int16).tobytes()
        request.zero_shot_request.CopyFrom(zero_shot_request)
    elif mode == "cross_lingual":
        cross_lingual_request = cosyvoice_pb2.crosslingualRequest()
        cross_lingual_request.tts_text = tts_text
        cross_lingual_request.prompt_audio = (prompt_speech * (2 ** 15)).astype(np.int16).tobytes()
        request.cross_lingual_request.CopyFrom(cross_lingual_request)
    else:
        instruct_request = cosyvoice_pb2.instructRequest()
        instruct_request.tts_text = tts_text
        instruct_request.spk_id = spk_id
        instruct_request.instruct_text = instruct_text
        request.instruct_request.CopyFrom(instruct_request)
    return request


def receive(stub, request, **kwargs) -> np.ndarray:
    """Upstream's client: join every response's tts_audio, read as int16."""
    tts_audio = b""
    for r in stub.Inference(request, timeout=RPC_TIMEOUT, **kwargs):
        tts_audio += r.tts_audio
    return np.frombuffer(tts_audio, dtype=np.int16)


def upstream_pcm(gen) -> np.ndarray:
    """Upstream's server conversion of each yield, written out independently of the service's code."""
    return np.concatenate([(np.asarray(out["tts_speech"]).reshape(-1) * (2 ** 15)).astype(np.int16) for out in gen])


def rpc_error(stub, request, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        receive(stub, request, **kwargs)
    return info.value


@pytest.fixture(scope="module")
def prompt_speech() -> np.ndarray:
    return load_wav_16k()


@pytest.fixture(scope="module")
def service(tiny_converted, prompt_speech):
    """(pipeline, stub, reference audio, port): references from direct pipeline calls, made before
    the service starts the engine; then the service on a free 127.0.0.1 port."""
    from cosyjax.pipeline import CosyVoice3

    tts = CosyVoice3(RELEASE, converted_dir=tiny_converted, progress=False)
    # What the service passes the pipeline: the wire's int16 / 2**15 at 16 kHz (= the WAV's samples).
    wav = (np.frombuffer((prompt_speech * 2 ** 15).astype(np.int16).tobytes(), np.int16) / 2 ** 15).astype(np.float32)
    np.testing.assert_array_equal(wav, prompt_speech[0])  # a 16-bit WAV survives the wire exactly
    refs = {"zero_shot": upstream_pcm(tts.inference_zero_shot(TTS_TEXT, PROMPT_TEXT, (wav, 16000))),
            "cross_lingual": upstream_pcm(tts.inference_cross_lingual(CROSS_TEXT, (wav, 16000)))}
    assert tts.engine is None  # the references ran on the model directly
    server = serve_grpc(tts, "127.0.0.1", (port := free_port()), max_workers=4,
                        engine_config=EngineConfig(slots=2))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield tts, cosyvoice_pb2_grpc.CosyVoiceStub(channel), refs, port
    finally:
        channel.close()
        server.stop(None).wait(10)
        tts.engine.shutdown(drain_seconds=0)


def test_zero_shot_and_cross_lingual_equal_the_pipeline(service, prompt_speech):
    tts, stub, refs, _ = service
    requests = {"zero_shot": upstream_request("zero_shot", TTS_TEXT, prompt_text=PROMPT_TEXT,
                                              prompt_speech=prompt_speech),
                "cross_lingual": upstream_request("cross_lingual", CROSS_TEXT, prompt_speech=prompt_speech)}
    for mode, request in requests.items():
        got = receive(stub, request)
        assert got.size > 0, mode
        np.testing.assert_array_equal(got, refs[mode], err_msg=mode)
    assert tts.engine is not None and tts.engine.stats()["completed"] >= 2  # they ran on the engine
    call = stub.Inference(requests["zero_shot"], timeout=RPC_TIMEOUT)
    assert dict(call.initial_metadata())["x-sample-rate"] == "24000"
    assert len(b"".join(r.tts_audio for r in call)) == 2 * refs["zero_shot"].size


def test_sft_and_v1_instruct_are_unimplemented(service):
    _, stub, _, _ = service
    for mode, message in (("sft", SFT_MESSAGE), ("instruct", INSTRUCT_MESSAGE)):
        e = rpc_error(stub, upstream_request(mode, TTS_TEXT, instruct_text="Speak slowly."))
        assert e.code() == grpc.StatusCode.UNIMPLEMENTED, mode
        assert e.details() == message
    assert "no SFT speakers" in SFT_MESSAGE and "instruct2_request" in INSTRUCT_MESSAGE


def test_bad_input_is_invalid_argument_naming_the_field(service, prompt_speech):
    tts, stub, _, _ = service
    cases = [
        (upstream_request("zero_shot", "", prompt_text=PROMPT_TEXT, prompt_speech=prompt_speech),
         "zero_shot_request.tts_text is empty"),
        (upstream_request("zero_shot", TTS_TEXT, prompt_text="  ", prompt_speech=prompt_speech),
         "zero_shot_request.prompt_text is empty"),
        (upstream_request("cross_lingual", CROSS_TEXT, prompt_speech=np.zeros((1, 0), np.float32)),
         "cross_lingual_request.prompt_audio is empty"),
        (cosyvoice_pb2.Request(cross_lingual_request=cosyvoice_pb2.crosslingualRequest(
            tts_text=CROSS_TEXT, prompt_audio=b"\x01\x02\x03")),
         "cross_lingual_request.prompt_audio: 3 bytes is not a whole number of int16 samples"),
        (upstream_request("cross_lingual", CROSS_TEXT, prompt_speech=np.zeros((1, 16000), np.float32)),
         "cross_lingual_request.prompt_audio: the audio is silent"),
        (cosyvoice_pb2.Request(), "Request.RequestPayload: no request is set"),
        (cosyvoice_pb2.Request(vc_request=cosyvoice_pb2.vcRequest(), seed=1), "seed"),
        # the pipeline's own check, found before the first response: nothing left to speak
        (upstream_request("zero_shot", "...!?", prompt_text=PROMPT_TEXT, prompt_speech=prompt_speech),
         "zero_shot_request: "),
    ]
    for request, expected in cases:
        e = rpc_error(stub, request)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (expected, e.details())
        assert e.details().startswith(expected), (expected, e.details())
    assert tts.engine.stats()["pending"] == 0 and tts.engine.stats()["active"] == 0


def test_two_concurrent_rpcs_both_complete(service, prompt_speech):
    _, stub, refs, _ = service
    # two zero-shot calls (the tiny model's cross-lingual output is 20 s long); the second sets
    # cosyjax's optional fields to their defaults, so both must give the reference
    plain = upstream_request("zero_shot", TTS_TEXT, prompt_text=PROMPT_TEXT, prompt_speech=prompt_speech)
    explicit = cosyvoice_pb2.Request()
    explicit.CopyFrom(plain)
    explicit.seed, explicit.speed, explicit.stream = 0, 1.0, False
    requests = {"plain": plain, "explicit": explicit}
    results: dict[str, object] = {}
    start = threading.Barrier(len(requests))

    def call(mode):
        start.wait(10)
        try:
            results[mode] = receive(stub, requests[mode])
        except Exception as e:  # reported by the assertion below
            results[mode] = e

    threads = [threading.Thread(target=call, args=(mode,)) for mode in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RPC_TIMEOUT)
    for mode in requests:
        assert isinstance(results.get(mode), np.ndarray), (mode, results.get(mode))
        np.testing.assert_array_equal(results[mode], refs["zero_shot"], err_msg=mode)  # batched = solo


def test_voice_conversion_request(service, prompt_speech):
    tts, stub, _, _ = service
    pcm = (prompt_speech * (2 ** 15)).astype(np.int16).tobytes()
    got = receive(stub, cosyvoice_pb2.Request(vc_request=cosyvoice_pb2.vcRequest(source_audio=pcm, prompt_audio=pcm)))
    wav = prompt_speech[0]
    source = io.BytesIO()
    soundfile.write(source, wav, 16000, format="WAV", subtype="FLOAT")
    want = upstream_pcm(tts.inference_vc(source.getvalue(), (wav, 16000)))
    assert got.size > 0
    np.testing.assert_array_equal(got, want)


def test_client_cancel_cancels_the_engine_request(service, prompt_speech):
    tts, stub, _, _ = service
    engine = tts.engine
    before = engine.stats()
    # a long text: its LLM decode runs for many chunks, so the request is still running when cancelled
    call = stub.Inference(upstream_request("zero_shot", "Hello there, this is a much longer sentence to speak. " * 3,
                                           prompt_text=PROMPT_TEXT, prompt_speech=prompt_speech),
                          timeout=RPC_TIMEOUT)
    deadline = time.monotonic() + 60
    while engine.stats()["submitted"] == before["submitted"]:  # the frontend ran, the request is in the engine
        assert time.monotonic() < deadline, "the request never reached the engine"
        time.sleep(0.05)
    call.cancel()
    while engine.stats()["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, f"the engine request was not cancelled: {engine.stats()}"
        time.sleep(0.05)
    stats = engine.stats()
    assert stats["completed"] == before["completed"] and stats["active"] == 0 and stats["pending"] == 0
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED


def test_api_key_required(service):
    tts, _, _, _ = service
    port = free_port()
    server = serve_grpc(tts, "127.0.0.1", port, max_workers=1, api_key=API_KEY)
    request = upstream_request("sft", TTS_TEXT)  # answered without synthesis once through the gate
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = cosyvoice_pb2_grpc.CosyVoiceStub(channel)
            e = rpc_error(stub, request)  # upstream's client sends no metadata
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in e.details()
            e = rpc_error(stub, request, metadata=(("authorization", "Bearer wrong"),))
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED and e.details() == "invalid API key"
            e = rpc_error(stub, request, metadata=(("authorization", f"Bearer {API_KEY}"),))
            assert e.code() == grpc.StatusCode.UNIMPLEMENTED  # authenticated: the service's own answer
        with pytest.raises(RuntimeError, match="cannot listen"):  # the port is taken: no silent sharing
            serve_grpc(tts, "127.0.0.1", port, max_workers=1)
    finally:
        server.stop(None).wait(10)


UPSTREAM_CLIENT = """
import sys
import grpc
import numpy as np
import cosyvoice_pb2, cosyvoice_pb2_grpc  # generated from upstream's own cosyvoice.proto

port, prompt_file, out_file = sys.argv[1:4]
prompt_speech = np.load(prompt_file)
with grpc.insecure_channel("127.0.0.1:{}".format(port)) as channel:
    stub = cosyvoice_pb2_grpc.CosyVoiceStub(channel)
    request = cosyvoice_pb2.Request()
    sft_request = cosyvoice_pb2.sftRequest()
    sft_request.spk_id = "x"
    sft_request.tts_text = "Hello."
    request.sft_request.CopyFrom(sft_request)
    try:
        list(stub.Inference(request, timeout=60))
        print("sft: OK")
    except grpc.RpcError as e:
        print("sft:", e.code().name)
    request = cosyvoice_pb2.Request()
    zero_shot_request = cosyvoice_pb2.zeroshotRequest()
    zero_shot_request.tts_text = sys.argv[4]
    zero_shot_request.prompt_text = sys.argv[5]
    zero_shot_request.prompt_audio = (prompt_speech * (2**15)).astype(np.int16).tobytes()
    request.zero_shot_request.CopyFrom(zero_shot_request)
    tts_audio = b""
    for r in stub.Inference(request, timeout=120):
        tts_audio += r.tts_audio
    np.save(out_file, np.frombuffer(tts_audio, dtype=np.int16))
"""


@pytest.mark.upstream
@pytest.mark.skipif(not REFERENCE_REPO, reason="set COSYJAX_REFERENCE_REPO to an upstream CosyVoice checkout")
def test_upstream_generated_stub_talks_to_the_service(service, prompt_speech, tmp_path):
    """Upstream's own proto, compiled into upstream's generated modules (in a temporary directory, run
    in a separate process: both register the ``cosyvoice`` package), drives this service: its sft
    request is UNIMPLEMENTED, its zero-shot request (client.py's field assignments) gets the reference."""
    protoc = pytest.importorskip("grpc_tools.protoc")
    proto_dir = os.path.join(REFERENCE_REPO, "runtime", "python", "grpc")
    assert protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                        os.path.join(proto_dir, "cosyvoice.proto")]) == 0
    _, _, refs, port = service
    np.save(tmp_path / "prompt.npy", prompt_speech)
    (tmp_path / "client.py").write_text(UPSTREAM_CLIENT)
    done = subprocess.run([sys.executable, "client.py", str(port), "prompt.npy", "out.npy", TTS_TEXT, PROMPT_TEXT],
                          cwd=tmp_path, capture_output=True, text=True, timeout=RPC_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "sft: UNIMPLEMENTED"
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), refs["zero_shot"])


# ------------------------------------------------------------------------------ without a model
class _QueueFullPipeline:
    """Stands in for CosyVoice3: its engine's queue is always full."""

    sample_rate = 24000

    def __init__(self):
        self.engine = Engine(None)  # never started: only collect_handles is used

    def use_engine(self, config=None):
        return self.engine

    def inference_cross_lingual(self, tts_text, prompt_wav, **options):
        raise QueueFull("64 requests are waiting (max_pending=64)", 2.0)
        yield  # a generator, as the pipeline's calls are through the engine

    inference = CosyVoice3.inference  # the real mode dispatch, onto the stand-in's inference_cross_lingual


def test_full_queue_is_resource_exhausted_with_retry_after():
    port = free_port()
    server = serve_grpc(_QueueFullPipeline(), "127.0.0.1", port, max_workers=1)
    request = upstream_request("cross_lingual", CROSS_TEXT, prompt_speech=load_wav_16k())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            e = rpc_error(cosyvoice_pb2_grpc.CosyVoiceStub(channel), request)
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_pending=64" in e.details()
        assert ("retry-after", "2") in tuple(e.trailing_metadata())
    finally:
        server.stop(None).wait(10)
