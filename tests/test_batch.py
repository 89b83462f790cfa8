"""``cosyjax batch`` (cosyjax/batch) on the tiny release: the manifest contract, rows equal to single requests,
resume, per-line failures, and the same files from 2 processes and from 8 simulated devices.

Equality with the single request (``cosyjax tts``'s call, ``cosyjax.batch.single_request``):

- tokens: each batch row's speech tokens equal the single request's exactly, and the batch row's request
  (text ids, prompt features, key, ...) is the single request's, byte for byte (rows are matched by it);
- audio: same length, and ``max |batch - single| <= 2 ulp(PHI)`` per segment, PHI = the NSF phase of the
  highest harmonic at the segment's last sample, ``2 pi H S sum(f0) / sr`` from the single request's own f0.
  Why: the rows differ only in padded widths, so XLA sums some reductions in another order and the mel moves
  by a few float32 ulps (the vocoder itself is row-for-row identical under padding).  The f0 net turns that
  into an f0 change that the phase integrates over the whole segment; the phase is a float32 number of
  magnitude up to PHI, so two evaluations carry it to within its resolution ulp(PHI) each (rounding of a
  float64 cumsum), and the audio (a sum of sines of it, through a vocoder of gain about 1) moves by at most
  that: 2 ulp(PHI).  A wrong key, prompt or row mix-up moves the audio by O(0.1), far above it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile

from cosyjax.batch import ManifestError, read_manifest, run_batch, single_request
from cosyjax.model import Trace

from conftest import TINY_PROMPT_TEXT as PROMPT_TEXT, TINY_RELEASE as RELEASE, voice_wav_bytes

BATCH = 4
INSTRUCT = "You are a helpful assistant. Speak fast.<|endofprompt|>"
MIXED = [  # 12 lines: four modes, two prompt wavs (p1, p2) and a cached voice of p2, texts of 1..6 words
    dict(id="z1", mode="zero_shot", text="Hello.", prompt_wav="p1.wav", prompt_text=PROMPT_TEXT),
    dict(id="z2", mode="zero_shot", text="How are you today?", prompt_wav="p2.wav", prompt_text=PROMPT_TEXT,
         seed=1),
    dict(id="z3", mode="zero_shot", text="Yes.", prompt_wav="p1.wav", prompt_text=PROMPT_TEXT, seed=2, speed=1.25),
    dict(id="z4", mode="zero_shot", text="Good morning, all.", spk_id="voice2", seed=3),
    dict(id="z5", mode="zero_shot", text="A longer one, so that batches pad.", prompt_wav="audio/p2.wav",
         prompt_text=PROMPT_TEXT, seed=7),
    dict(id="x1", mode="cross_lingual", text="You are a helpful assistant.<|endofprompt|>Bonjour.",
         prompt_wav="p2.wav"),
    dict(id="x2", mode="cross_lingual", text="No marker.", prompt_wav="p1.wav", seed=4),
    dict(id="x3", mode="cross_lingual", text="Short.", spk_id="voice2", seed=8),
    dict(id="i1", mode="instruct2", text="Slowly.", instruct_text=INSTRUCT, prompt_wav="p1.wav"),
    dict(id="i2", mode="instruct2", text="Another one.", instruct_text=INSTRUCT, spk_id="voice2", seed=5),
    dict(id="v1", mode="vc", source_wav="src.wav", prompt_wav="p2.wav"),
    dict(id="v2", mode="vc", source_wav="p1.wav", prompt_wav="p2.wav", speed=1.1),
]

# The default suite's manifest: every mode, both prompts and the cached voice, short texts (the tiny LLM
# never stops early, so a row is 20 speech tokens per text token; the 12-line one is in the slow tests).
SMALL = [MIXED[0], dict(MIXED[2], id="z3s", text="Hello."),
         dict(id="x1s", mode="cross_lingual", text="<|endofprompt|>Bonjour.", prompt_wav="p2.wav", seed=6),
         dict(id="i2s", mode="instruct2", text="Hi.", instruct_text=INSTRUCT, spk_id="voice2", seed=5),
         dict(MIXED[3], id="z4s", text="Hi."),  # zero-shot with a cached voice (its LLM prefix)
         MIXED[10]]


def write_manifest(path, lines) -> str:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_wav(path) -> np.ndarray:
    audio, sr = soundfile.read(path, dtype="float32")
    assert sr == 24000
    return audio


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The voices (p1, p2 also under audio/, src, a corrupt wav) and the 12-line manifest next to them."""
    d = tmp_path_factory.mktemp("batch-data")
    (d / "audio").mkdir()
    (d / "p1.wav").write_bytes(voice_wav_bytes())
    (d / "p2.wav").write_bytes(voice_wav_bytes(seconds=2.0, f0=120.0, seed=1))
    (d / "audio" / "p2.wav").write_bytes((d / "p2.wav").read_bytes())
    (d / "src.wav").write_bytes(voice_wav_bytes(seconds=1.2, f0=150.0, seed=2))
    (d / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    write_manifest(d / "mixed.jsonl", MIXED)
    write_manifest(d / "small.jsonl", SMALL)
    return d


@pytest.fixture(scope="module")
def batch_tts(tiny_converted, data):
    """A CosyVoice3 of its own (this module adds a cached voice) with the voice ``voice2`` = p2.wav."""
    from cosyjax.pipeline import CosyVoice3

    tts = CosyVoice3(RELEASE, converted_dir=tiny_converted, progress=False)
    tts.add_zero_shot_spk(PROMPT_TEXT, str(data / "p2.wav"), "voice2")
    tts.save_spkinfo(str(data / "voices"))
    return tts


def signature(kwargs: dict) -> str:
    """The bytes of one CosyVoice3Model request (what decides its output).

    Left out: ``stream``; ``trace`` (where the call reports, not an input); ``voice_prefix`` (a cached
    voice's prefilled prompt text: it saves prefill work and gives the same tokens, and the prompt text
    it holds is ``prompt_text_ids``, which is hashed)."""
    import jax

    h = hashlib.sha256()
    for name in sorted(k for k in kwargs if k not in ("stream", "trace", "voice_prefix")):
        value = kwargs[name]
        if name == "key":
            value = jax.random.key_data(value)
        arr = np.ascontiguousarray(np.asarray(value if value is not None else ()))
        h.update(f"{name}:{arr.dtype}:{arr.shape}:".encode() + arr.tobytes())
    return h.hexdigest()


def phase_bound(model, kwargs: dict, tokens: np.ndarray) -> float:
    """2 ulp(PHI) of one single request (see the module docstring)."""
    from cosyjax.flow.flow import flow_inference
    from cosyjax.hift.generator import HiFTGenerator
    from cosyjax.model import interpolate_linear

    cfg = model.config
    mel = np.asarray(flow_inference(
        model.params["flow"], tokens[None], np.asarray(kwargs.get("flow_prompt_speech_tokens", ()), np.int64)[None],
        np.asarray(kwargs["prompt_feat"])[None], np.asarray(kwargs["embedding"])[None], cfg=cfg.flow,
        noise=model.flow_noise, streaming=False, finalize=True))  # the single request's shapes: compiled already
    if kwargs.get("speed", 1.0) != 1.0:
        mel = interpolate_linear(mel, int(mel.shape[1] / kwargs["speed"]))
    # f0 only sets the scale here: the float32 f0 net, run eagerly (no compile of its own)
    f0 = HiFTGenerator(cfg.hift).apply({"params": model.params["hift"]}, mel, method=HiFTGenerator.predict_f0)
    hift = cfg.hift
    phase = 2 * np.pi * hift.num_harmonic_channels * hift.upsample_scale * np.asarray(f0, np.float64).sum() \
        / hift.sampling_rate
    return float(2 * np.spacing(np.float32(phase)))


class Singles:
    """Each line's single request (``single_request``, what ``cosyjax tts`` runs), computed when first asked:
    ``singles[id]`` = [(request signature, flow tokens, audio [S], 2 ulp(PHI)) per segment]."""

    def __init__(self, tts, entries):
        self.tts, self.entries, self.done = tts, {e.id: e for e in entries}, {}

    def __getitem__(self, ident):
        if ident not in self.done:
            model = self.tts.model
            original = model.tts
            segments = []

            def spy(**kwargs):
                trace = kwargs.pop("trace", None) or Trace()
                chunks = list(original(**kwargs, trace=trace))
                assert len(chunks) == 1  # non-stream: one yield per segment
                tokens = trace.flow_tokens.copy()
                segments.append((signature(kwargs), tokens, chunks[0]["tts_speech"][0],
                                 phase_bound(model, kwargs, tokens)))
                return iter(chunks)

            model.tts = spy
            try:
                for _ in single_request(self.tts, self.entries[ident]):
                    pass
            finally:
                del model.tts
            self.done[ident] = segments
        return self.done[ident]


@pytest.fixture(scope="module")
def singles(batch_tts, data):
    entries = {e.id: e for name in ("mixed", "small") for e in read_manifest(str(data / f"{name}.jsonl"), spkinfo=True)}
    return Singles(batch_tts, entries.values())


class BatchSpy:
    """Records every tts_batch row of a model: signature -> flow tokens."""

    def __init__(self, model):
        self.model, self.rows = model, {}

    def __enter__(self):
        original = self.model.tts_batch

        def tts_batch(requests, keys=None, traces=None):
            traces = traces if traces is not None else [Trace() for _ in requests]
            audio = original(requests, keys, traces)
            for r, t in zip(requests, traces):
                self.rows[signature(r)] = t.flow_tokens.copy()
            return audio

        self.model.tts_batch = tts_batch
        return self

    def __exit__(self, *exc):
        del self.model.tts_batch


def check_against_singles(out_dir, ids, singles, batch_rows=None) -> list[dict]:
    """Assert each id's wav equals its single request (tokens exact, audio within 2 ulp(PHI)); the numbers."""
    measured = []
    results = {r["id"]: r for r in read_jsonl(os.path.join(out_dir, "results.jsonl"))}
    for ident in ids:
        audio = read_wav(os.path.join(out_dir, f"{ident}.wav"))
        segments = singles[ident]
        assert audio.size == sum(s[2].size for s in segments), ident
        assert results[ident]["tokens"] == sum(s[1].size for s in segments), ident
        assert results[ident]["seconds"] == pytest.approx(audio.size / 24000, abs=1e-6)
        start = 0
        for k, (sig, tokens, single, bound) in enumerate(segments):
            if batch_rows is not None:
                assert sig in batch_rows, f"{ident} segment {k}: no batch row had the single request's inputs"
                np.testing.assert_array_equal(batch_rows[sig], tokens, err_msg=f"{ident} segment {k} tokens")
            part = audio[start:start + single.size]
            start += single.size
            err = float(np.abs(part.astype(np.float64) - single).max())
            i = int(np.abs(part.astype(np.float64) - single).argmax())
            assert err <= bound, f"{ident} segment {k}: max |batch - single| {err:.3g} at sample {i} " \
                                 f"({part[i]} vs {single[i]}) > 2 ulp(phase) {bound:.3g}"
            measured.append({"id": ident, "segment": k, "samples": single.size, "max_abs": err, "bound": bound})
    return measured


def spied_run(tts, manifest, out, **kwargs):
    """run_batch with float32 wavs, recording the tts_batch rows and the prompt wavs whose features were
    extracted (``CosyVoice3._prompt`` calls, paths relative to the data folder)."""
    extracted = []
    original = tts._prompt

    def counting(wav, **kw):
        extracted.append(os.path.relpath(wav, os.path.dirname(manifest)))
        return original(wav, **kw)

    tts._prompt = counting
    try:
        with BatchSpy(tts.model) as spy:
            summary = run_batch(manifest, out, tts=tts, batch_size=BATCH, subtype="FLOAT",
                                spkinfo=os.path.join(os.path.dirname(manifest), "voices"), progress=False, **kwargs)
    finally:
        del tts._prompt
    return out, summary, spy.rows, extracted


@pytest.fixture(scope="module")
def small_run(batch_tts, data, tmp_path_factory):
    return spied_run(batch_tts, str(data / "small.jsonl"), str(tmp_path_factory.mktemp("batch-out") / "small"))


@pytest.fixture(scope="module")
def mixed_run(batch_tts, data, tmp_path_factory):
    return spied_run(batch_tts, str(data / "mixed.jsonl"), str(tmp_path_factory.mktemp("batch-out") / "mixed"))


# --------------------------------------------------------------------------------------------
# The manifest contract
# --------------------------------------------------------------------------------------------
def test_bad_lines_are_all_reported_before_any_work(data, tmp_path):
    good = dict(id="ok", mode="zero_shot", text="Hi.", prompt_wav=str(data / "p1.wav"), prompt_text=PROMPT_TEXT)
    lines = [
        good,
        "{not json",
        dict(good, id="u", promt_text="typo"),
        dict(good, id="m", mode="zeroshot"),
        dict(good, id="n", prompt_text=None),
        dict(good, id="w", prompt_wav="missing.wav"),
        dict(good, id="s", seed=-1),
        dict(good, id="../x"),
        dict(good),
        dict(id="v", mode="vc", source_wav=str(data / "src.wav"), prompt_wav=str(data / "p1.wav"), text="no"),
        dict(id="c", mode="cross_lingual", text="x", spk_id="voice2"),
        "",
        dict(id="e", mode="instruct2", text="x", prompt_wav=str(data / "p1.wav")),
        "[1, 2]",
    ]
    manifest = write_manifest(tmp_path / "bad.jsonl", lines)
    out = tmp_path / "out"
    with pytest.raises(ManifestError) as info:  # the model dir does not exist: nothing got that far
        run_batch(manifest, str(out), model_dir=str(tmp_path / "no-model"), progress=False)
    problems = dict(info.value.problems)
    expected = {2: "not JSON", 3: "unknown field(s) ['promt_text']", 4: "mode: expected one of",
                5: "needs prompt_text", 6: "missing.wav not found", 7: "seed: expected an integer",
                8: "id '../x'", 9: "id 'ok' repeats line 1", 10: "mode vc takes no text",
                11: "spk_id needs a speaker cache", 13: "mode instruct2 needs instruct_text",
                14: "expected a JSON object"}
    assert sorted(problems) == sorted(expected)
    for number, fragment in expected.items():
        assert fragment in problems[number], (number, problems[number])
    assert "12 bad line(s), nothing was run" in str(info.value)
    assert not out.exists()


def test_cli_refuses_a_malformed_line_before_loading_the_model(data, tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [dict(id="a", mode="vc", prompt_wav=str(data / "p1.wav"))])
    proc = subprocess.run([sys.executable, "-m", "cosyjax.cli", "batch", "--manifest", manifest, "--out",
                           str(tmp_path / "out"), "--model-dir", str(tmp_path / "no-model")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "line 1: mode vc needs source_wav" in proc.stderr and "no-model" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_speaker_is_refused_before_synthesis(batch_tts, data, tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [dict(id="a", mode="cross_lingual", text="x", spk_id="nobody")])
    with pytest.raises(ManifestError, match="line 1: spk_id 'nobody' is not in the speaker cache"):
        run_batch(manifest, str(tmp_path / "out"), tts=batch_tts, spkinfo=str(data / "voices"), progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Rows equal single requests; outputs; resume
# --------------------------------------------------------------------------------------------
def check_run(run, lines, singles, expected_extractions):
    out, summary, rows, extracted = run
    n = len(lines)
    assert (summary.items, summary.synthesized, summary.failed, summary.pending) == (n, n, 0, 0)
    ids = [m["id"] for m in lines]
    measured = check_against_singles(out, ids, singles, rows)
    assert len(rows) == len(measured) == n  # one tts_batch row per segment, none run twice
    assert summary.audio_seconds == pytest.approx(sum(s[2].size for i in ids for s in singles[i]) / 24000, abs=1e-3)
    results = read_jsonl(os.path.join(out, "results.jsonl"))
    assert [r["id"] for r in results] == ids  # manifest order after the merge
    assert max(r["batch_rows"] for r in results) == BATCH
    assert read_jsonl(os.path.join(out, "errors.jsonl")) == []
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["synthesized"] == n
    assert sorted(os.listdir(out)) == sorted([f"{i}.wav" for i in ids] + ["results.jsonl", "errors.jsonl",
                                                                          "summary.json"])
    assert sorted(extracted) == expected_extractions  # once per distinct prompt wav; cached voices never
    return measured


def test_rows_equal_single_requests(small_run, singles):
    check_run(small_run, SMALL, singles, ["p1.wav", "p2.wav"])


@pytest.mark.slow
def test_twelve_line_manifest_rows_equal_single_requests(mixed_run, singles):
    """The acceptance manifest: 12 lines, four modes, two prompt wavs (one also under another path), a cached
    voice, speed, the cross-lingual default prefix."""
    check_run(mixed_run, MIXED, singles, ["audio/p2.wav", "p1.wav", "p2.wav"])


@pytest.mark.slow
def test_cosyjax_tts_cli_writes_what_batch_writes(mixed_run, singles, data, tiny_converted, tmp_path):
    """``cosyjax tts`` itself (16-bit PCM) for two lines: the cross-lingual default prefix, speed."""
    for ident, args in (("x2", ["--mode", "cross_lingual", "--text", "No marker.", "--seed", "4"]),
                        ("z3", ["--text", "Yes.", "--prompt-text", PROMPT_TEXT, "--seed", "2", "--speed", "1.25"])):
        wav = str(tmp_path / f"{ident}.wav")
        proc = subprocess.run([sys.executable, "-m", "cosyjax.cli", "tts", "--model-dir", RELEASE, "--converted-dir",
                               tiny_converted, "--prompt-wav", str(data / "p1.wav"), *args, "-o", wav],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        cli, batch = read_wav(wav), read_wav(os.path.join(mixed_run[0], f"{ident}.wav"))
        assert cli.shape == batch.shape
        # both write trunc(32768 x) (cosyjax.serving.pcm.pcm16): two values within the row bound truncate to
        # int16 samples at most 1 LSB further apart
        bound = sum(s[3] for s in singles[ident]) + 1 / 32768
        assert np.abs(cli.astype(np.float64) - batch).max() <= bound, ident


def test_rerun_skips_done_lines_and_redoes_changed_ones(small_run, batch_tts, data, tmp_path):
    out = small_run[0]
    stamps = {m["id"]: os.stat(os.path.join(out, f"{m['id']}.wav")).st_mtime_ns for m in SMALL}
    again = run_batch(str(data / "small.jsonl"), out, tts=batch_tts, batch_size=BATCH, subtype="FLOAT",
                      spkinfo=str(data / "voices"), progress=False)
    n = len(SMALL)
    assert (again.skipped, again.synthesized, again.done) == (n, 0, n)
    assert {i: os.stat(os.path.join(out, f"{i}.wav")).st_mtime_ns for i in stamps} == stamps
    # a changed line (another seed) is not "done": it runs again, and only it
    changed = [dict(m, seed=9) if m["id"] == "z1" else m for m in SMALL]
    copy_dir = tmp_path / "out"
    shutil.copytree(out, copy_dir)
    summary = run_batch(write_manifest(data / "changed.jsonl", changed), str(copy_dir), tts=batch_tts,
                        batch_size=BATCH, subtype="FLOAT", spkinfo=str(data / "voices"), progress=False)
    assert (summary.skipped, summary.synthesized) == (n - 1, 1)
    assert [r["id"] for r in read_jsonl(copy_dir / "results.jsonl")] == [m["id"] for m in SMALL]


def test_limit_then_resume_finishes_the_rest_without_redoing(batch_tts, data, singles, tmp_path):
    ids = [m["id"] for m in SMALL]
    out = str(tmp_path / "out")
    first = run_batch(str(data / "small.jsonl"), out, tts=batch_tts, batch_size=BATCH, subtype="FLOAT", limit=3,
                      spkinfo=str(data / "voices"), progress=False)
    assert (first.synthesized, first.pending) == (3, len(ids) - 3)
    done_first = [r["id"] for r in read_jsonl(os.path.join(out, "results.jsonl"))]
    assert done_first == ids[:3]  # limit takes pending lines in manifest order
    stamps = {i: os.stat(os.path.join(out, f"{i}.wav")).st_mtime_ns for i in done_first}
    second = run_batch(str(data / "small.jsonl"), out, tts=batch_tts, batch_size=BATCH, subtype="FLOAT",
                       spkinfo=str(data / "voices"), progress=False)
    assert (second.skipped, second.synthesized, second.done, second.pending) == (3, len(ids) - 3, len(ids), 0)
    assert {i: os.stat(os.path.join(out, f"{i}.wav")).st_mtime_ns for i in done_first} == stamps
    assert [r["id"] for r in read_jsonl(os.path.join(out, "results.jsonl"))] == ids  # each once
    check_against_singles(out, ids, singles)


def test_corrupt_prompt_goes_to_errors_and_the_others_complete(batch_tts, data, tmp_path):
    broken = dict(MIXED[1], id="broken", prompt_wav="bad.wav")
    also = dict(MIXED[8], id="also-broken", prompt_wav="bad.wav")
    manifest = write_manifest(data / "corrupt.jsonl", [SMALL[0], broken, SMALL[2], also, SMALL[1]])
    out = str(tmp_path / "out")
    summary = run_batch(manifest, out, tts=batch_tts, batch_size=BATCH, progress=False)
    assert (summary.synthesized, summary.failed, summary.done) == (3, 2, 3)
    errors = read_jsonl(os.path.join(out, "errors.jsonl"))
    assert [(e["id"], e["line"], e["stage"]) for e in errors] == [("broken", 2, "frontend"),
                                                                 ("also-broken", 4, "frontend")]
    assert all("bad.wav" in e["error"] and "AudioError" in e["error"] for e in errors)
    assert sorted(f for f in os.listdir(out) if f.endswith(".wav")) == ["x1s.wav", "z1.wav", "z3s.wav"]
    assert soundfile.info(os.path.join(out, "z1.wav")).subtype == "PCM_16"  # cosyjax tts's format by default


# --------------------------------------------------------------------------------------------
# Interrupt, processes, devices (subprocesses: slow)
# --------------------------------------------------------------------------------------------
def _cli_batch(manifest, out, converted, *extra, env=None, **popen):
    cmd = [sys.executable, "-m", "cosyjax.cli", "batch", "--manifest", manifest, "--out", out, "--model-dir", RELEASE,
           "--converted-dir", converted, "--batch-size", str(BATCH), "--subtype", "FLOAT", *extra]
    return subprocess.Popen(cmd, env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _same_audio(a_dir, b_dir, ids) -> None:
    for ident in ids:
        a, b = read_wav(os.path.join(a_dir, f"{ident}.wav")), read_wav(os.path.join(b_dir, f"{ident}.wav"))
        np.testing.assert_array_equal(a, b, err_msg=ident)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_localhost_processes_write_the_same_files(mixed_run, data, tiny_converted, tmp_path):
    out = str(tmp_path / "out")
    address = f"localhost:{_free_port()}"
    procs = [_cli_batch(str(data / "mixed.jsonl"), out, tiny_converted, "--spkinfo", str(data / "voices"),
                        "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i))
             for i in (1, 0)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "12 lines: 12 synthesized" in logs[1] and "lines:" not in logs[0]  # process 1 stays quiet
    results = read_jsonl(os.path.join(out, "results.jsonl"))
    assert {r["process"] for r in results} == {0, 1}
    assert sorted(os.listdir(out)) == sorted(os.listdir(mixed_run[0]))  # parts merged and removed
    _same_audio(mixed_run[0], out, [m["id"] for m in MIXED])  # same batches as one process: bit for bit


@pytest.mark.slow
def test_eight_simulated_devices_write_the_same_files(mixed_run, data, tiny_converted, tmp_path, singles):
    """--xla_force_host_platform_device_count changes XLA:CPU's numerics for every device, so 8 devices are
    compared bit for bit with 1 device under the same flag, and with the one-device run of ``mixed_run``
    (no flag) within 2 ulp(phase) like any other batch row."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
    for out, extra in ((one, ["--devices", "1"]), (eight, [])):
        p = _cli_batch(str(data / "mixed.jsonl"), out, tiny_converted, "--spkinfo", str(data / "voices"), "--quiet",
                       *extra, env=env)
        log = p.communicate(timeout=900)[0]
        assert p.returncode == 0, log
    with open(os.path.join(eight, "summary.json")) as f:
        assert json.load(f)["devices"] == 8
    used = {r["device"] for r in read_jsonl(os.path.join(eight, "results.jsonl"))}
    assert len(used) >= 2  # 4 batches (4, 4, 2 text lines; 2 vc lines) over 8 device threads
    ids = [m["id"] for m in MIXED]
    _same_audio(one, eight, ids)
    check_against_singles(eight, ids, singles)


@pytest.mark.slow
def test_interrupt_then_rerun_finishes_without_redoing(data, tiny_converted, tmp_path):
    out = str(tmp_path / "out")
    manifest = str(data / "mixed.jsonl")
    p = _cli_batch(manifest, out, tiny_converted, "--spkinfo", str(data / "voices"))
    results = os.path.join(out, "results.jsonl")
    deadline = time.monotonic() + 600
    while not (os.path.exists(results) and os.path.getsize(results)) and time.monotonic() < deadline:
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 130, log
    assert "interrupted: rerun the same command" in log
    first = [r["id"] for r in read_jsonl(results)]
    assert 0 < len(first) < 12
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    stamps = {i: os.stat(os.path.join(out, f"{i}.wav")).st_mtime_ns for i in first}
    p = _cli_batch(manifest, out, tiny_converted, "--spkinfo", str(data / "voices"), "--quiet")
    log = p.communicate(timeout=900)[0]
    assert p.returncode == 0, log
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert (summary["skipped"], summary["synthesized"], summary["done"]) == (len(first), 12 - len(first), 12)
    assert {i: os.stat(os.path.join(out, f"{i}.wav")).st_mtime_ns for i in first} == stamps
    assert sorted(r["id"] for r in read_jsonl(results)) == sorted(m["id"] for m in MIXED)
