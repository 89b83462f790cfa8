"""Extra stage ``batch`` (not in --all): offline batch synthesis throughput in audio-seconds per second.

``cosyjax.batch.run_batch`` (what ``cosyjax batch`` runs) on a manifest of ``LINES`` lines (64; ``--quick`` 8):
zero-shot and cross-lingual, two synthetic prompt voices, texts of 1 to 5 words, once per batch size.  The
whole job is timed: manifest check, text frontend, prompt features (two extractions), LLM, flow and HiFT
batched, wav writing.  Warm-up: the same manifest once into a scratch directory (every padded shape it
needs compiled), then the timed run into a fresh one (its compile count is recorded; 0 expected).

Model: the committed tiny release (``tests/data/tiny-release``, converted into a temp dir; ``--batch-release DIR``
takes another release).  Release dims do not fit the CPU budget: at the e2e row's RTF of ~10, 64 lines of a
few seconds each take about an hour per batch size.  The tiny release's random LLM never draws a stop id,
so every line decodes exactly max_len = 20 x its text tokens, at every batch size; rows are compared by
their speech tokens and lengths across batch sizes.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any

import numpy as np

from benchmarks.common import REPO, compile_record, log, new_row, wall
from benchmarks.models import Bundle

LINES = {False: 64, True: 8}  # by --quick
WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing softly near old river "
         "stones under bright morning light and children laugh").split()
PROMPT_TEXT = "You are a helpful assistant.<|endofprompt|>A short prompt for the voice."


def prompt_voice(seconds: float, f0: float, seed: int, sample_rate: int = 16000) -> bytes:
    """A voiced stand-in prompt: three harmonics of a gliding f0 with some breath noise, 16-bit WAV bytes."""
    import soundfile

    t = np.arange(int(seconds * sample_rate)) / sample_rate
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t))) / sample_rate
    x = sum(0.2 / k * np.sin(k * phase) for k in (1, 2, 3)) + 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    buf = io.BytesIO()
    soundfile.write(buf, x.astype(np.float32), sample_rate, format="WAV")
    return buf.getvalue()


def write_manifest(directory: str, lines: int, seed: int) -> str:
    """``lines`` manifest lines over two prompts: 3 of 4 zero-shot, the rest cross-lingual."""
    rng = np.random.default_rng([seed, 15])
    for name, (seconds, f0) in {"a.wav": (3.0, 170.0), "b.wav": (2.0, 120.0)}.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(prompt_voice(seconds, f0, seed))
    path = os.path.join(directory, "manifest.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            text = " ".join(rng.choice(WORDS, int(rng.integers(1, 6)))).capitalize() + "."
            line = {"id": f"line{i:03d}", "text": text, "prompt_wav": "a.wav" if i % 2 else "b.wav", "seed": i}
            if i % 4 == 3:
                line.update(mode="cross_lingual")
            else:
                line.update(mode="zero_shot", prompt_text=PROMPT_TEXT)
            f.write(json.dumps(line) + "\n")
    return path


def _tokens(out_dir: str) -> dict[str, tuple[int, float]]:
    with open(os.path.join(out_dir, "results.jsonl"), encoding="utf-8") as f:
        return {r["id"]: (r["tokens"], r["seconds"]) for r in map(json.loads, f)}


def run(bundle: Bundle, release: str | None = None) -> list[dict[str, Any]]:
    from cosyjax.batch import run_batch
    from cosyjax.convert import convert_to_dir
    from cosyjax.pipeline import CosyVoice3

    wl = bundle.wl
    release = release or os.path.join(REPO, "tests", "data", "tiny-release")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cosyjax-bench-batch-") as tmp:
        converted = convert_to_dir(release, os.path.join(tmp, "converted"), progress=False)
        tts = CosyVoice3(release, converted_dir=converted, progress=False)
        dims = tts.config
        manifest = write_manifest(tmp, LINES[wl.quick], wl.seed)
        log(f"[batch] {LINES[wl.quick]} lines on {release} (LLM {dims.llm.num_layers} layers x {dims.llm.hidden_size}, "
            f"DiT {dims.flow.depth} x {dims.flow.dim}); batch sizes {wl.batch_sizes}")
        reference = None
        for b in wl.batch_sizes:
            with compile_record() as warm_rec:
                _, warm_s = wall(lambda: run_batch(manifest, os.path.join(tmp, f"warm{b}"), tts=tts, batch_size=b,
                                                   progress=False))
            out_dir = os.path.join(tmp, f"timed{b}")
            with compile_record() as timed_rec:
                summary, seconds = wall(lambda: run_batch(manifest, out_dir, tts=tts, batch_size=b, progress=False))
            tokens = _tokens(out_dir)
            reference = reference or tokens
            same = tokens == reference
            row = new_row("batch", f"Batch synthesis, bs {b}",
                          f"cosyjax batch: {summary.items} lines (zero-shot + cross-lingual, 2 prompts) → "
                          f"{summary.audio_seconds:.0f} s of audio, tiny release dims", "audio-s/s", batch=b)
            row.update(cosyjax=summary.audio_seconds / seconds, cosyjax_warmup_s=warm_s,
                       cosyjax_compile_s=warm_rec.seconds, cosyjax_timed_compiles=timed_rec.compiles,
                       cosyjax_timed_compile_s=timed_rec.seconds,
                       agreement=(f"tokens and seconds of every line equal to bs {wl.batch_sizes[0]}'s" if same
                                  else f"⚠ tokens or seconds differ from bs {wl.batch_sizes[0]}"))
            if timed_rec.seconds > 0.01 * seconds:
                row["warnings"].append(f"{timed_rec.compiles} compilation(s), {timed_rec.seconds:.2f} s, "
                                       "inside the timed run")
            row["extra"].update(wall_s=seconds, audio_s=summary.audio_seconds, lines=summary.items,
                                failed=summary.failed, release=os.path.relpath(release, REPO),
                                llm_layers=dims.llm.num_layers, llm_hidden=dims.llm.hidden_size,
                                dit_depth=dims.flow.depth, dit_dim=dims.flow.dim)
            log(f"[batch] bs {b}: {summary.audio_seconds:.0f} s of audio in {seconds:.1f} s = "
                f"{row['cosyjax']:.2f} audio-s/s (warm-up {warm_s:.1f} s)")
            rows.append(row)
    return rows
