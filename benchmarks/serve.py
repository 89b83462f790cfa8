"""Extra stage ``serve`` (not in --all): ``cosyjax serve`` throughput and first-chunk latency under load.

The real app (``cosyjax.server.create_app``: every request on the batching engine, ``EngineConfig(slots=S)``
with S = the highest concurrency, 16) is started under uvicorn in a thread of this process, on 127.0.0.1 and
a free port (the server's start-up warm-up compiles the engine's programs).  A fixed, seeded mix of
``REQUESTS`` requests (16; ``--quick`` 2) is sent with httpx from a thread pool at each concurrency of
``CONCURRENCY`` (1, 4, 16; ``--quick`` 1, 2): 3 of 4 ``/inference_zero_shot``, the rest
``/inference_cross_lingual``, texts of 1 to 4 words (``--quick`` 1 to 2), ``stream=true``, seed = the
request's index, one synthetic 3 s prompt wav (``benchmarks.batch.prompt_voice``: harmonics + noise, no
recorded audio).  Every request has a timeout (``REQUEST_TIMEOUT_S``); a failed or timed-out request fails
the stage.

Per concurrency: requests/s and audio-seconds/s (N requests, and their audio, over the wall time from the
first send to the last body byte), and the first-chunk latency p50 / p99 (``numpy.percentile``, linear;
with 16 requests p99 is nearly the maximum) from a request's send (its prompt upload included) to its
first body bytes (the server sends the status with the first chunk, so that is the first audio).

Baseline "one at a time": what the server did before the engine (one request at a time on the plain model,
``CosyVoice3Model.tts``): the same requests as direct, sequential pipeline calls
(``inference_zero_shot`` / ``inference_cross_lingual``, stream=True, same seeds, same prompt bytes), on the
same pipeline before the app attaches its engine.  This is the fair -- if anything generous -- baseline:
it is the old server's work minus its HTTP, multipart and thread hand-off costs (a server variant with
``slots=1`` would still run the engine's scheduler, not the old code path).  Its first-chunk latency is a
lone request's (a serialized server would add the queueing behind the requests before it).

The baseline is timed twice, before and after the server runs (the machine is shared: load drifts), and
the faster pass is its row (``extra.pass_requests_per_s`` has both), so the engine's ratios are, if
anything, understated.

Warm-up (untimed, its compile count recorded): the whole mix once through the plain pipeline and once
through the server at the highest concurrency, so every padded shape the timed runs need is compiled; the
timed runs record their compile count (0 expected).  The engine's output equals the plain model's for the
same seed (tests/test_server.py): each row's ``agreement`` compares every request's PCM with the baseline's.

Model: the committed tiny release (``tests/data/tiny-release``: LLM 2 layers x 64, DiT 2 x 64, HiFT 32
channels, 24 kHz, stream hop 5 tokens), random weights, whose LLM never draws a stop id, so every request
decodes max_len = 20 x its text tokens (~12 s of audio for 1 to 3 words; the cross-lingual prefix counts).
Release dims do not fit the CPU budget (the e2e row's RTF is ~10: hours for 7 passes of 16 requests on 2
cores); 16 requests, not more, because the 7 passes over the mix (3 baseline, 4 server) take ~12 minutes
even at the tiny dims on the shared 2-core machine.  ``--batch-release DIR`` runs another release.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import socket
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np

from benchmarks.batch import PROMPT_TEXT, WORDS, prompt_voice
from benchmarks.common import REPO, compile_record, log, new_row
from benchmarks.models import Bundle

REQUESTS = {False: 16, True: 2}  # by --quick
CONCURRENCY = {False: (1, 4, 16), True: (1, 2)}
MAX_WORDS = {False: 4, True: 2}
CROSS_PREFIX = "You are a helpful assistant.<|endofprompt|>"
REQUEST_TIMEOUT_S = 300.0  # one request, connect to last byte
START_TIMEOUT_S = 600.0  # the server's start-up warm-up
RUN_TIMEOUT_S = 1800.0  # one concurrency level, all requests
SAMPLE_BYTES = 2  # s16le mono


def request_mix(n: int, max_words: int, seed: int) -> list[dict[str, Any]]:
    """``n`` seeded requests: route, form fields (without the prompt file)."""
    rng = np.random.default_rng([seed, 14])
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, int(rng.integers(1, max_words + 1)))).capitalize() + "."
        if i % 4 == 3:
            out.append({"route": "/inference_cross_lingual",
                        "form": {"tts_text": CROSS_PREFIX + text, "stream": "true", "seed": str(i)}})
        else:
            out.append({"route": "/inference_zero_shot",
                        "form": {"tts_text": text, "prompt_text": PROMPT_TEXT, "stream": "true", "seed": str(i)}})
    return out


def _pcm16(audio: np.ndarray) -> bytes:
    """The server's wire conversion (``cosyjax.serving.pcm.to_pcm16``)."""
    from cosyjax.serving.pcm import to_pcm16

    return to_pcm16(audio)


# --------------------------------------------------------------------------------------------
# Baseline: sequential pipeline calls, no engine
# --------------------------------------------------------------------------------------------
def _pipeline_call(tts: Any, req: dict[str, Any], wav: bytes):
    f = req["form"]
    if req["route"] == "/inference_zero_shot":
        return tts.inference_zero_shot(f["tts_text"], f["prompt_text"], wav, stream=True, seed=int(f["seed"]))
    return tts.inference_cross_lingual(f["tts_text"], wav, stream=True, seed=int(f["seed"]))


def run_sequential(tts: Any, mix: list[dict[str, Any]], wav: bytes) -> dict[str, Any]:
    """Every request after the other through the plain pipeline: wall, first-chunk latencies, PCM digests."""
    firsts, digests, samples = [], [], 0
    start = time.perf_counter()
    for req in mix:
        t0 = time.perf_counter()
        first, pcm = None, []
        for out in _pipeline_call(tts, req, wav):
            data = _pcm16(np.asarray(out["tts_speech"]))
            if data and first is None:
                first = time.perf_counter() - t0
            pcm.append(data)
        body = b"".join(pcm)
        firsts.append(first)
        digests.append(hashlib.sha256(body).hexdigest())
        samples += len(body) // SAMPLE_BYTES
    return {"wall_s": time.perf_counter() - start, "first_s": firsts, "digests": digests, "samples": samples}


# --------------------------------------------------------------------------------------------
# The server: uvicorn in a thread, httpx clients in a thread pool
# --------------------------------------------------------------------------------------------
class ServerThread:
    """``app`` under uvicorn on 127.0.0.1, a free port, in a daemon thread (a context manager)."""

    def __init__(self, app: Any):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="bench-uvicorn", daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        end = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread ended during start-up (see the log above)")
            if time.monotonic() > end:
                raise TimeoutError(f"the server did not start within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=90)
        self.sock.close()
        if self.thread.is_alive():
            log("[serve] ⚠ the server thread did not stop within 90 s")


def _send(client: Any, url: str, req: dict[str, Any], wav: bytes) -> dict[str, Any]:
    """One streamed request: seconds to the first body bytes, total seconds, body digest and size."""
    t0 = time.perf_counter()
    first, body = None, []
    with client.stream("POST", url + req["route"], data=req["form"],
                       files={"prompt_wav": ("prompt.wav", wav, "audio/wav")}) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"{req['route']}: HTTP {resp.status_code}: {resp.text[:300]}")
        for data in resp.iter_bytes():
            if data and first is None:
                first = time.perf_counter() - t0
            body.append(data)
    blob = b"".join(body)
    return {"first_s": first, "total_s": time.perf_counter() - t0, "bytes": len(blob),
            "digest": hashlib.sha256(blob).hexdigest()}


def run_concurrent(url: str, mix: list[dict[str, Any]], wav: bytes, concurrency: int) -> dict[str, Any]:
    """The mix at ``concurrency`` requests in flight (a thread pool), each with a timeout."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0)
    with httpx.Client(limits=limits, timeout=timeout) as client, \
            concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="bench-client") as pool:
        start = time.perf_counter()
        futures = [pool.submit(_send, client, url, req, wav) for req in mix]
        done, not_done = concurrent.futures.wait(futures, timeout=RUN_TIMEOUT_S)
        wall_s = time.perf_counter() - start
        if not_done:
            for f in not_done:
                f.cancel()
            raise TimeoutError(f"{len(not_done)} of {len(mix)} requests unfinished after {RUN_TIMEOUT_S:.0f} s "
                               f"at concurrency {concurrency}")
        results = [f.result() for f in futures]  # raises the first failed request's error
    return {"wall_s": wall_s, "first_s": [r["first_s"] for r in results], "digests": [r["digest"] for r in results],
            "samples": sum(r["bytes"] for r in results) // SAMPLE_BYTES}


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def _summary(res: dict[str, Any], n: int, sample_rate: int) -> dict[str, float]:
    first = np.asarray(res["first_s"], np.float64)
    audio_s = res["samples"] / sample_rate
    return {"requests_per_s": n / res["wall_s"], "audio_s_per_s": audio_s / res["wall_s"], "wall_s": res["wall_s"],
            "audio_s": audio_s, "first_chunk_p50_s": float(np.percentile(first, 50)),
            "first_chunk_p99_s": float(np.percentile(first, 99)), "first_chunk_max_s": float(first.max())}


def _timed(fn: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], Any, Any]:
    with compile_record() as rec:
        res = fn()
    return res, rec.compiles, rec.seconds


def run(bundle: Bundle, release: str | None = None) -> list[dict[str, Any]]:
    from cosyjax.convert import convert_to_dir
    from cosyjax.pipeline import CosyVoice3
    from cosyjax.server import create_app
    from cosyjax.serving.engine import EngineConfig

    wl = bundle.wl
    release = release or os.path.join(REPO, "tests", "data", "tiny-release")
    n, levels = REQUESTS[wl.quick], CONCURRENCY[wl.quick]
    slots = max(levels)
    mix = request_mix(n, MAX_WORDS[wl.quick], wl.seed)
    wav = prompt_voice(3.0, 170.0, wl.seed)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cosyjax-bench-serve-") as tmp:
        converted = convert_to_dir(release, os.path.join(tmp, "converted"), progress=False)
        tts = CosyVoice3(release, converted_dir=converted, progress=False)
        dims = tts.config
        rate = int(tts.sample_rate)
        size = (f"tiny release dims (LLM {dims.llm.num_layers} layers x {dims.llm.hidden_size}, "
                f"DiT {dims.flow.depth} x {dims.flow.dim})")
        dims_extra = {"release": os.path.relpath(release, REPO), "llm_layers": dims.llm.num_layers,
                      "llm_hidden": dims.llm.hidden_size, "dit_depth": dims.flow.depth, "dit_dim": dims.flow.dim,
                      "requests": n, "zero_shot": sum(r["route"] == "/inference_zero_shot" for r in mix),
                      "cross_lingual": sum(r["route"] == "/inference_cross_lingual" for r in mix),
                      "text_words": [len(r["form"]["tts_text"].split("|>")[-1].split()) for r in mix]}
        workload = f"{n} streamed zero-shot + cross-lingual requests, 1-{MAX_WORDS[wl.quick]} words, {size}"
        log(f"[serve] {n} requests on {release} ({size}); concurrency {levels}, engine slots {slots}")

        # ---- baseline, first pass: the plain pipeline, one request at a time
        assert tts.engine is None
        with compile_record() as base_warm_rec:
            t0 = time.perf_counter()
            run_sequential(tts, mix, wav)
            base_warm_s = time.perf_counter() - t0
        passes = [_timed(lambda: run_sequential(tts, mix, wav))]
        reference = passes[0][0]["digests"]
        log(f"[serve] baseline pass 1 (sequential pipeline): {n / passes[0][0]['wall_s']:.3f} req/s "
            f"(warm-up {base_warm_s:.1f} s, {base_warm_rec.compiles} compiles; timed compiles {passes[0][1]})")

        # ---- the server on the engine
        app_config = EngineConfig(slots=slots, max_pending=4 * n)
        with compile_record() as start_rec:
            t0 = time.perf_counter()
            app = create_app(tts, engine_config=app_config, max_pending=4 * n, warmup=True, drain_seconds=30.0)
            server = ServerThread(app).__enter__()
            start_s = time.perf_counter() - t0
        engine_runs = []
        try:
            with compile_record() as warm_rec:
                t0 = time.perf_counter()
                run_concurrent(server.url, mix, wav, slots)
                warm_s = time.perf_counter() - t0
            log(f"[serve] server up on {server.url} in {start_s:.1f} s ({start_rec.compiles} compiles); warm-up mix at "
                f"concurrency {slots}: {warm_s:.1f} s ({warm_rec.compiles} compiles)")
            for c in levels:
                res, compiles, compile_s = _timed(lambda: run_concurrent(server.url, mix, wav, c))
                engine_runs.append((c, res, compiles, compile_s))
                log(f"[serve] concurrency {c}: {n / res['wall_s']:.3f} req/s; timed compiles {compiles}")
        finally:
            server.__exit__(None, None, None)
        if tts.engine is not None:  # the app's lifespan detaches its engine; make sure it is stopped
            with contextlib.suppress(Exception):
                tts.engine.shutdown(0.0)
            tts.engine = None

        # ---- baseline, second pass (brackets the server runs against load drift on a shared machine)
        passes.append(_timed(lambda: run_sequential(tts, mix, wav)))
        base, base_compiles, base_compile_s = min(passes, key=lambda p: p[0]["wall_s"])  # the faster pass
        base_sum = _summary(base, n, rate)
        pass_rps = [n / p[0]["wall_s"] for p in passes]
        log(f"[serve] baseline pass 2: {pass_rps[1]:.3f} req/s; baseline = the faster pass: "
            f"{base_sum['requests_per_s']:.3f} req/s, {base_sum['audio_s_per_s']:.2f} audio-s/s, first chunk p50 "
            f"{base_sum['first_chunk_p50_s']:.3f} s")
        row = new_row("serve", "Serve baseline, one at a time",
                      f"{workload}; sequential pipeline calls, no engine (the pre-engine server's work)", "req/s",
                      batch=1)
        row.update(cosyjax=base_sum["requests_per_s"], cosyjax_warmup_s=base_warm_s,
                   cosyjax_compile_s=base_warm_rec.seconds, cosyjax_timed_compiles=sum(p[1] for p in passes),
                   cosyjax_timed_compile_s=sum(p[2] for p in passes),
                   agreement=(f"{base_sum['audio_s_per_s']:.3g} audio-s/s; first chunk p50 "
                              f"{base_sum['first_chunk_p50_s']:.3f} s, p99 {base_sum['first_chunk_p99_s']:.3f} s; "
                              f"faster of 2 passes ({pass_rps[0]:.3g} before, {pass_rps[1]:.3g} after the server) req/s"))
        row["extra"].update(base_sum, concurrency=1, mode="baseline", pass_requests_per_s=pass_rps,
                            pcm_equal_between_passes=sum(a == b for a, b in zip(passes[1][0]["digests"], reference)),
                            **dims_extra)
        if row["cosyjax_timed_compile_s"] > 0.01 * sum(p[0]["wall_s"] for p in passes):
            row["warnings"].append(f"{row['cosyjax_timed_compiles']} compilation(s), "
                                   f"{row['cosyjax_timed_compile_s']:.2f} s, inside the timed runs")
        rows.append(row)

        for c, res, compiles, compile_s in engine_runs:
            s = _summary(res, n, rate)
            same = sum(a == b for a, b in zip(res["digests"], reference))
            row = new_row("serve", f"Serve engine, concurrency {c}",
                          f"{workload}; cosyjax serve (engine, {slots} slots), HTTP, {c} in flight", "req/s", batch=c)
            row.update(cosyjax=s["requests_per_s"], cosyjax_warmup_s=start_s + warm_s,
                       cosyjax_compile_s=start_rec.seconds + warm_rec.seconds, cosyjax_timed_compiles=compiles,
                       cosyjax_timed_compile_s=compile_s,
                       agreement=(f"{s['audio_s_per_s']:.3g} audio-s/s ({s['requests_per_s'] / base_sum['requests_per_s']:.2f}x "
                                  f"baseline); first chunk p50 {s['first_chunk_p50_s']:.3f} s, p99 "
                                  f"{s['first_chunk_p99_s']:.3f} s; PCM = baseline's for {same}/{n}"))
            row["extra"].update(s, concurrency=c, mode="engine", slots=slots, pcm_equal_to_baseline=same,
                                throughput_ratio_vs_baseline=s["requests_per_s"] / base_sum["requests_per_s"],
                                audio_ratio_vs_baseline=s["audio_s_per_s"] / base_sum["audio_s_per_s"],
                                **dims_extra)
            if compile_s > 0.01 * res["wall_s"]:
                row["warnings"].append(f"{compiles} compilation(s), {compile_s:.2f} s, inside the timed run")
            log(f"[serve] concurrency {c}: {s['requests_per_s']:.3f} req/s, {s['audio_s_per_s']:.2f} audio-s/s "
                f"({row['extra']['throughput_ratio_vs_baseline']:.2f}x baseline), first chunk p50 "
                f"{s['first_chunk_p50_s']:.3f} s p99 {s['first_chunk_p99_s']:.3f} s; PCM equal {same}/{n}")
            rows.append(row)
    return rows
