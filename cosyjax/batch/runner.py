"""Offline batch synthesis: a manifest in, a directory of wavs out, on every local device and host.

``run_batch`` (``cosyjax batch``) does, in order:

1. reads and checks the whole manifest (``cosyjax.batch.manifest``): bad lines stop the run before the model
   is even loaded; joins the multi-process run if one is described (``cosyjax.batch.distributed``);
2. loads the model, the speaker cache, and what earlier runs left in the output directory: a line is done
   when ``results.jsonl`` lists it with the same fingerprint (its fields, the model directory, dtype and
   output subtype) and its wav exists; everything else (failed lines included) is run again;
3. sorts the pending lines by length (speech or text tokens of the longest segment, then prompt seconds;
   voice conversion apart, since it skips the LLM) and cuts them into batches of at most ``batch_size``
   model rows (one row per text segment), longest first.  The batches depend on the manifest, what is
   done and ``batch_size`` only, never on the number of devices or processes: process ``p`` of ``P``
   takes batches ``p, p + P, ...``, its devices take the next one as they come free, and a row's audio
   is the same wherever it ran;
4. per batch: each line's model requests come from ``CosyVoice3``'s own frontend (the very calls
   ``cosyjax tts`` makes, with the model replaced by a recorder, so the normalisation, the segments and
   the per-segment keys ``fold_in(key(seed), i)`` are the pipeline's), with prompt features extracted
   once per distinct prompt wav and kept until this process's last line using it; then one
   ``CosyVoice3Model.tts_batch`` call (LLM, flow and HiFT batched with per-row lengths).  A batch that
   fails is retried line by line, so one bad line costs only itself;
5. writes each line's audio (its segments joined, as ``cosyjax tts`` does) atomically as ``<id>.wav``,
   a ``results.jsonl`` line per success and an ``errors.jsonl`` line per failure (with the reason), and
   finally ``summary.json``.  With several processes each journals to ``results.p<i>.jsonl`` /
   ``errors.p<i>.jsonl`` and process 0 merges them when all are done.

Devices: one model copy per local device, each driven by its own thread (rows are independent, so no
device waits for another's longest row, and nothing in the model code changes).  Ctrl-C stops taking
new batches, lets the running ones finish and be recorded, and raises ``BatchInterrupted``; a second
Ctrl-C stops at once (files already written stay complete: every write is atomic).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import glob
import json
import os
import queue
import signal
import threading
import time
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from cosyjax.atomic import staged_file
from cosyjax.batch.distributed import ProcessInfo, agree_on_run_token, setup
from cosyjax.batch.manifest import Entry, check_speakers, read_manifest
from cosyjax.model import Trace

DEFAULT_BATCH_SIZE = 8
SUBTYPES = ("PCM_16", "PCM_24", "FLOAT")  # soundfile subtypes; PCM_16 is what ``cosyjax tts`` writes
RESULTS, ERRORS, SUMMARY = "results.jsonl", "errors.jsonl", "summary.json"
PART_POLL_S = 0.5


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``run_batch``: finished batches are recorded; ``summary`` says what is left."""

    def __init__(self, summary: "BatchSummary"):
        super().__init__("interrupted")
        self.summary = summary


@dataclasses.dataclass(frozen=True)
class BatchSummary:
    """What a run did (process 0: all processes; another process: its own share).

    Attributes:
      items: manifest lines.  done: lines whose wav is there now (this run or before).
      skipped: lines already done when the run started.  synthesized / failed: lines this run wrote /
      recorded in errors.jsonl.  pending: lines neither done nor failed (``limit``, an interrupt).
      audio_seconds, wall_seconds: audio written and wall time of this run (the slowest process);
      audio_seconds_per_second = audio_seconds / wall_seconds.
      processes, devices: workers of this run (devices: over all processes).  batch_size: rows per batch.
      interrupted: Ctrl-C ended the run.  process: the index of the process that made this summary.
    """

    items: int
    done: int
    skipped: int
    synthesized: int
    failed: int
    pending: int
    audio_seconds: float
    wall_seconds: float
    audio_seconds_per_second: float
    processes: int
    devices: int
    batch_size: int
    interrupted: bool = False
    process: int = 0

    def line(self) -> str:
        """One human-readable line."""
        return (f"{self.items} lines: {self.synthesized} synthesized, {self.skipped} done before, {self.failed} "
                f"failed, {self.pending} left; {self.audio_seconds:.1f} s of audio in {self.wall_seconds:.1f} s = "
                f"{self.audio_seconds_per_second:.2f} audio-s/s ({self.processes} process(es), {self.devices} "
                f"device(s), batch {self.batch_size})" + (" [interrupted]" if self.interrupted else ""))


@dataclasses.dataclass(frozen=True)
class Batch:
    """Lines synthesised together: ``rows`` model requests (text segments) in all."""

    index: int
    entries: tuple[Entry, ...]
    rows: int


# --------------------------------------------------------------------------------------------
# The single-request calls, and the frontend that records them
# --------------------------------------------------------------------------------------------
def single_request(tts: Any, entry: Entry) -> Iterator[dict[str, np.ndarray]]:
    """The ``CosyVoice3`` call for one manifest line, as ``cosyjax tts`` makes it (non-stream).

    Returns the pipeline's generator of ``{"tts_speech": [1, samples]}``; its chunks joined are the line's
    audio.  ``run_batch`` writes, for every line, what this gives (within float32 rounding, see ``run_batch``).
    """
    from cosyjax.pipeline import MODE_ARGUMENTS

    # The manifest's modes are the pipeline's (manifest.MODES); a field the mode does not take (vc: text,
    # seed) is left out, the manifest having refused any that would matter.
    fields = dict(tts_text=entry.text, prompt_text=entry.prompt_text, instruct_text=entry.instruct_text,
                  prompt_wav=entry.prompt_wav, source_wav=entry.source_wav, zero_shot_spk_id=entry.spk_id or "",
                  speed=entry.speed, seed=entry.seed)
    return tts.inference(entry.mode, **{k: v for k, v in fields.items() if k in MODE_ARGUMENTS[entry.mode]})


class _Recorder:
    """Takes ``CosyVoice3Model``'s place while the pipeline's frontend runs: keeps each ``tts`` call's arguments."""

    def __init__(self):
        self.requests: list[dict[str, Any]] = []

    def tts(self, **kwargs: Any) -> Iterator[dict[str, np.ndarray]]:
        self.requests.append(kwargs)
        return iter(())


class LineError(RuntimeError):
    """A line that cannot run; the message is what errors.jsonl records."""


def _reason(error: BaseException) -> str:
    if isinstance(error, LineError):
        return str(error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else 'no detail'}"


class Frontend:
    """Model requests for manifest lines, from the pipeline's frontend; thread-safe.

    Prompt features are extracted once per distinct prompt wav (unaligned, as voice conversion takes
    them; the zero-shot 2:1 trim is ``align_prompt`` on those, which is what ``extract_prompt`` does) and
    dropped after the last line that uses them (``uses``).  A prompt that fails fails every line using it,
    without being decoded again.
    """

    def __init__(self, tts: Any, entries: Iterable[Entry]):
        self.tts = tts
        self._uses = collections.Counter(e.prompt_wav for e in entries if e.prompt_wav)
        self._features: dict[str, Any] = {}
        self._key_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        # The text normaliser and tokenizer are not documented as thread-safe: one line at a time there.
        self._text_lock = threading.Lock()
        self.extractions = 0

    def _unaligned(self, path: str) -> Any:
        with self._lock:
            key_lock = self._key_locks.setdefault(path, threading.Lock())
        with key_lock:
            if path not in self._features:
                self.extractions += 1
                try:
                    self._features[path] = (self.tts._prompt(path, align=False), None)
                except Exception as e:  # a corrupt or unusable prompt: remembered, reported per line
                    self._features[path] = (None, f"prompt_wav {path}: {_reason(e)}")
            features, error = self._features[path]
        if error:
            raise LineError(error)
        return features

    def prompt(self, prompt_wav: str, *, align: bool = True, timings: dict | None = None) -> Any:
        """``CosyVoice3._prompt``'s contract, from the cache (so no extraction ``timings``)."""
        from cosyjax.frontend import PromptFeatures, align_prompt

        features = self._unaligned(os.path.abspath(prompt_wav))
        if not align:
            return features
        tokens, mel = align_prompt(features.speech_tokens, features.prompt_mel, features.token_mel_ratio)
        return PromptFeatures(speech_tokens=tokens, embedding=features.embedding, prompt_mel=mel,
                              sample_rate=features.sample_rate, token_mel_ratio=features.token_mel_ratio,
                              aligned=True)

    def requests(self, entry: Entry) -> list[dict[str, Any]]:
        """The ``CosyVoice3Model.tts`` keyword arguments of each segment of ``entry`` (keys included)."""
        if entry.prompt_wav:
            self._unaligned(entry.prompt_wav)  # the slow part, outside the text lock
        planner = copy.copy(self.tts)
        recorder = _Recorder()
        planner.model, planner._prompt, planner.progress = recorder, self.prompt, False
        # A cached voice's LLM prefix saves batch-1 prefill work only (tts_batch prefills whole prompts,
        # same tokens): none is made here, and the voice's own prefix cache is left as it is.
        planner._voice_prefix = lambda spk_id, prompt_ids: None
        with self._text_lock:
            for _ in single_request(planner, entry):
                pass
        if not recorder.requests:
            raise LineError("the text frontend produced no segment to synthesise")
        return recorder.requests

    def release(self, entry: Entry) -> None:
        """``entry`` is finished: drop its prompt's features if no later line of this process needs them."""
        if not entry.prompt_wav:
            return
        with self._lock:
            self._uses[entry.prompt_wav] -= 1
            if self._uses[entry.prompt_wav] <= 0:
                self._features.pop(entry.prompt_wav, None)


# --------------------------------------------------------------------------------------------
# Bucketing
# --------------------------------------------------------------------------------------------
def _seconds(path: str | None) -> float:
    import soundfile

    return float(soundfile.info(path).duration) if path else 0.0


def line_cost(tts: Any, entry: Entry) -> tuple[bool, int, int, float]:
    """(voice conversion, model rows, tokens of its longest row, prompt seconds) of one line.

    Text rows count text tokens (the LLM's max_len is proportional to them); voice conversion counts
    its source's speech tokens.  An estimate for sorting only: a line whose text or audio cannot be read
    costs (.., 1, 0, 0.0) here and reports its problem when it runs.
    """
    try:
        if entry.mode == "vc":
            return True, 1, int(_seconds(entry.source_wav) * tts.config.token_frame_rate), _seconds(entry.prompt_wav)
        segments = tts.normalizer(entry.text)
        longest = max(len(tts.tokenizer.encode(s)) for s in segments)
        if entry.spk_id:
            prompt = len(tts.spk2info[entry.spk_id]["prompt"].speech_tokens) / tts.config.token_frame_rate
        else:
            prompt = _seconds(entry.prompt_wav)
        return False, len(segments), longest, prompt
    except Exception:
        return entry.mode == "vc", 1, 0, 0.0


def plan_batches(tts: Any, entries: Sequence[Entry], batch_size: int) -> list[Batch]:
    """Length-sorted batches of at most ``batch_size`` rows, longest first (see the module docstring).

    A line with more segments than ``batch_size`` is a batch of its own (run ``batch_size`` rows at a time).
    """
    costed = sorted(((line_cost(tts, e), e) for e in entries),
                    key=lambda ce: (ce[0][0], -ce[0][2], -ce[0][3], ce[1].line))
    batches: list[Batch] = []
    current: list[Entry] = []
    rows, kind = 0, None
    for (vc, n_rows, _, _), entry in costed:
        if current and (rows + n_rows > batch_size or vc != kind):
            batches.append(Batch(len(batches), tuple(current), rows))
            current, rows = [], 0
        current.append(entry)
        rows += n_rows
        kind = vc
    if current:
        batches.append(Batch(len(batches), tuple(current), rows))
    return batches


# --------------------------------------------------------------------------------------------
# The output directory
# --------------------------------------------------------------------------------------------
def _read_jsonl(path: str) -> Iterator[dict[str, Any]]:
    """Records of a journal; a line cut short by a crash is skipped (its line simply runs again)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                yield record


class OutputDir:
    """``<id>.wav`` files, the journals and the summary of one output directory."""

    def __init__(self, path: str, proc: ProcessInfo, *, subtype: str, sample_rate: int):
        self.path = os.path.abspath(path)
        self.proc = proc
        self.subtype = subtype
        self.sample_rate = sample_rate
        os.makedirs(self.path, exist_ok=True)
        part = "" if proc.count == 1 else f".p{proc.index}"
        self.results_journal = os.path.join(self.path, f"results{part}.jsonl")
        self.errors_journal = os.path.join(self.path, f"errors{part}.jsonl")
        self._files: dict[str, Any] = {}

    def wav(self, ident: str) -> str:
        return os.path.join(self.path, f"{ident}.wav")

    def _journals(self, stem: str) -> list[str]:
        parts = sorted(glob.glob(os.path.join(self.path, f"{stem}.p*.jsonl")))
        return [os.path.join(self.path, f"{stem}.jsonl")] + parts

    def completed(self, entries: Sequence[Entry], salt: str) -> set[str]:
        """Ids of ``entries`` done by an earlier run: journalled with the same fingerprint, wav present."""
        recorded: dict[str, str] = {}
        for path in self._journals("results"):
            for record in _read_jsonl(path):
                recorded[record["id"]] = record.get("fingerprint")
        return {e.id for e in entries
                if recorded.get(e.id) == e.fingerprint(salt) and os.path.isfile(self.wav(e.id))}

    def remove_stale_temps(self) -> None:
        """Temp wavs of a run that was killed (``staged_file`` names: hidden, ``.tmp-`` inside)."""
        for path in glob.glob(os.path.join(self.path, ".*.tmp-*.wav")):
            os.unlink(path)

    def write_wav(self, ident: str, audio: np.ndarray) -> None:
        import soundfile

        from cosyjax.serving.pcm import write_wav16

        with staged_file(self.wav(ident)) as tmp:
            if self.subtype == "PCM_16":  # the int16 samples of cosyjax tts, the web UI and the HTTP API
                write_wav16(tmp, audio, self.sample_rate)
            else:
                soundfile.write(tmp, audio, self.sample_rate, subtype=self.subtype)

    def journal(self, path: str, records: Sequence[dict[str, Any]]) -> None:
        """Append records and make them durable (one fsync per batch)."""
        if not records:
            return
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "a", encoding="utf-8")
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def write_json(self, name: str, value: Any) -> None:
        with staged_file(os.path.join(self.path, name)) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(value, f, indent=1)
                f.write("\n")

    def part_summaries(self, token: int, count: int) -> list[dict[str, Any]]:
        """Wait until every other process has written its ``summary.p<i>.json`` for run ``token``.

        No timeout: a process that dies without writing it takes the run down through JAX's distributed
        runtime (heartbeats), and one that fails writes it with its status first.
        """
        found: dict[int, dict[str, Any]] = {}
        while len(found) < count - 1:
            for i in range(1, count):
                path = os.path.join(self.path, f"summary.p{i}.json")
                if i not in found and os.path.isfile(path):
                    with open(path, encoding="utf-8") as f:
                        part = json.load(f)
                    if part.get("token") == token:
                        found[i] = part
            if len(found) < count - 1:
                time.sleep(PART_POLL_S)
        return [found[i] for i in sorted(found)]

    def merge(self, entries: Sequence[Entry]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Rewrite results.jsonl / errors.jsonl from every journal (last record per id, manifest order).

        A result counts only with its wav present; an error is dropped once its id has a result.  Per-process
        journals are removed after merging.  Returns (results, errors).
        """
        order = {e.id: e.line for e in entries}

        def collect(stem: str) -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for path in self._journals(stem):
                for record in _read_jsonl(path):
                    out[record["id"]] = record
            return out

        def ordered(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
            return sorted(records.values(), key=lambda r: (r["id"] not in order, order.get(r["id"], 0), r["id"]))

        results = {k: r for k, r in collect("results").items() if os.path.isfile(self.wav(k))}
        errors = {k: r for k, r in collect("errors").items() if k not in results}
        for stem, records in (("results", results), ("errors", errors)):
            with staged_file(os.path.join(self.path, f"{stem}.jsonl")) as tmp:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered(records)))
            for path in self._journals(stem)[1:]:
                os.unlink(path)
        return ordered(results), ordered(errors)


# --------------------------------------------------------------------------------------------
# Running batches
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Outcome:
    batch: Batch
    results: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    audio_seconds: float


class _Worker:
    """Runs batches on one device with its own model copy (``tts_batch``), writing the wavs."""

    def __init__(self, model: Any, device: Any, frontend: Frontend, out: OutputDir, salt: str, batch_size: int):
        self.model, self.device, self.frontend, self.out = model, device, frontend, out
        self.salt, self.batch_size = salt, batch_size

    def _synthesize(self, requests: list[dict[str, Any]]) -> tuple[list[np.ndarray], list[int], list[int]]:
        audio, tokens, llm_tokens = [], [], []
        for start in range(0, len(requests), self.batch_size):
            part = requests[start:start + self.batch_size]
            traces = [Trace() for _ in part]
            audio += self.model.tts_batch(part, traces=traces)
            tokens += [int(t.flow_tokens.size) for t in traces]
            llm_tokens += [int(t.llm_tokens.size) for t in traces]
        return audio, tokens, llm_tokens

    def _lines(self, planned: list[tuple[Entry, list[dict[str, Any]]]], errors: list[dict[str, Any]]
               ) -> list[tuple[Entry, np.ndarray, int, int, int]]:
        """(entry, audio [S], tokens, llm tokens, segments) per line; a failing batch is retried line by line."""
        requests = [r for _, reqs in planned for r in reqs]
        if not requests:
            return []
        try:
            audio, tokens, llm_tokens = self._synthesize(requests)
        except Exception as e:
            if len(planned) == 1:
                errors.append(self._error(planned[0][0], "synthesis", e))
                return []
            return [line for one in planned for line in self._lines([one], errors)]
        out, start = [], 0
        for entry, reqs in planned:
            stop = start + len(reqs)
            joined = np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in audio[start:stop]])
            out.append((entry, joined, sum(tokens[start:stop]), sum(llm_tokens[start:stop]), len(reqs)))
            start = stop
        return out

    def _error(self, entry: Entry, stage: str, error: BaseException) -> dict[str, Any]:
        return {"id": entry.id, "line": entry.line, "stage": stage, "error": _reason(error),
                "process": self.out.proc.index}

    def run(self, batch: Batch) -> _Outcome:
        start = time.perf_counter()
        planned, errors = [], []
        for entry in batch.entries:
            try:
                planned.append((entry, self.frontend.requests(entry)))
            except Exception as e:
                errors.append(self._error(entry, "frontend", e))
        lines = self._lines(planned, errors)
        results, audio_seconds = [], 0.0
        for entry, audio, tokens, llm_tokens, segments in lines:
            if audio.size == 0:  # e.g. the LLM chose a stop token at once (cosyjax tts refuses this too)
                errors.append(self._error(entry, "synthesis", LineError("the model produced no audio for this line")))
                continue
            self.out.write_wav(entry.id, audio)  # an OSError here (disk full, ...) stops the run
            seconds = audio.size / self.out.sample_rate
            audio_seconds += seconds
            results.append({"id": entry.id, "line": entry.line, "wav": os.path.basename(self.out.wav(entry.id)),
                            "seconds": round(seconds, 6), "tokens": tokens, "llm_tokens": llm_tokens,
                            "segments": segments, "fingerprint": entry.fingerprint(self.salt)})
        wall = time.perf_counter() - start
        for record in results:
            record.update(wall_s=round(wall, 4), batch=batch.index, batch_rows=batch.rows, device=str(self.device),
                          process=self.out.proc.index)
        for entry in batch.entries:
            self.frontend.release(entry)
        return _Outcome(batch, results, errors, audio_seconds)

    def loop(self, jobs: "queue.Queue[Batch]", outcomes: queue.Queue, stop: threading.Event) -> None:
        import jax

        try:
            with jax.default_device(self.device):
                while not stop.is_set():
                    try:
                        batch = jobs.get_nowait()
                    except queue.Empty:
                        break
                    outcomes.put(("batch", self.run(batch)))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which re-raises it
            outcomes.put(("fatal", e))
        finally:
            outcomes.put(("exit", None))


def _replicas(tts: Any, devices: Sequence[Any]) -> list[Any]:
    """One ``CosyVoice3Model`` per device: ``tts.model`` itself on its own device, shallow copies with the
    params placed on the others and a program cache of their own (a compiled program is tied to the
    device it was compiled for; the cache keys on shapes, not devices)."""
    import jax

    from cosyjax.programs import ProgramCache

    models = []
    for device in devices:
        if device == tts.device:
            models.append(tts.model)
        else:
            model = copy.copy(tts.model)
            model.params = jax.device_put(tts.model.params, device)
            model.programs = ProgramCache()
            models.append(model)
    return models


def _local_devices(tts: Any, devices: int | None) -> list[Any]:
    import jax

    local = [d for d in jax.local_devices(backend=tts.device.platform)]
    local.sort(key=lambda d: d != tts.device)  # the pipeline's own device first
    if devices is not None:
        if not 1 <= devices <= len(local):
            raise ValueError(f"devices={devices}: this process has {len(local)} {tts.device.platform} device(s)")
        local = local[:devices]
    return local


@dataclasses.dataclass
class _RunStats:
    synthesized: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    interrupted: bool = False


class _Interrupts:
    """SIGINT while batches run: the first sets ``stop`` (running batches finish), the second raises."""

    def __init__(self, stop: threading.Event, notify):
        self.stop, self.notify, self.count = stop, notify, 0
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt
        self.stop.set()
        self.notify("interrupted: finishing the batches in flight (Ctrl-C again to stop at once)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def _execute(workers: list[_Worker], batches: Sequence[Batch], out: OutputDir, show: bool, desc: str) -> _RunStats:
    from tqdm.auto import tqdm

    jobs: queue.Queue = queue.Queue()
    for batch in batches:
        jobs.put(batch)
    outcomes: queue.Queue = queue.Queue()
    stop = threading.Event()
    stats = _RunStats()
    bar = tqdm(total=sum(len(b.entries) for b in batches), unit="line", desc=desc, disable=not show, smoothing=0.1)
    start = time.perf_counter()
    threads = [threading.Thread(target=w.loop, args=(jobs, outcomes, stop), daemon=True,
                                name=f"cosyjax-batch-{w.device}") for w in workers]
    fatal: BaseException | None = None
    try:
        with _Interrupts(stop, bar.write) as interrupts:
            for t in threads:
                t.start()
            alive = len(threads)
            while alive:
                try:
                    kind, payload = outcomes.get(timeout=0.2)
                except queue.Empty:
                    continue
                if kind == "exit":
                    alive -= 1
                elif kind == "fatal":
                    fatal = fatal or payload
                    stop.set()
                else:
                    out.journal(out.results_journal, payload.results)
                    out.journal(out.errors_journal, payload.errors)
                    stats.synthesized += len(payload.results)
                    stats.failed += len(payload.errors)
                    stats.audio_seconds += payload.audio_seconds
                    bar.update(len(payload.batch.entries))
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(f"{stats.audio_seconds / elapsed:.2f} audio-s/s, {stats.failed} failed")
            stats.interrupted = interrupts.count > 0
    finally:
        bar.close()
        stats.wall_seconds = time.perf_counter() - start
    if fatal is not None:
        raise fatal
    return stats


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def _check_options(batch_size: int, subtype: str, limit: int | None, devices: int | None) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1")
    if subtype not in SUBTYPES:
        raise ValueError(f"subtype={subtype!r}: expected one of {', '.join(SUBTYPES)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r}: expected an integer >= 1")
    if devices is not None and (not isinstance(devices, int) or devices < 1):
        raise ValueError(f"devices={devices!r}: expected an integer >= 1")


def fingerprint_salt(tts: Any, subtype: str) -> str:
    """What besides a line's fields decides its file: the model directory, the dtype, the wav subtype."""
    return json.dumps([os.path.abspath(tts.model_dir), str(tts.model.dtype), subtype])


def run_batch(manifest: str, out_dir: str, *, tts: Any = None, model_dir: str | None = None,
              converted_dir: str | None = None, dtype: str = "float32", llm_file: str = "llm.pt",
              backend: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE, spkinfo: str | None = None,
              subtype: str = "PCM_16", devices: int | None = None, limit: int | None = None,
              progress: bool = True, progress_all_processes: bool = False,
              coordinator_address: str | None = None, num_processes: int | None = None,
              process_id: int | None = None, auto_detect_cluster: bool = False) -> BatchSummary:
    """Synthesise every line of ``manifest`` into ``out_dir`` (see the module docstring).

    Args:
      manifest: the ``.jsonl`` manifest (``cosyjax.batch.manifest`` has the contract).
      out_dir: output directory (created; a rerun resumes it).
      tts: a loaded ``CosyVoice3`` to use; else one is loaded from ``model_dir`` (default the Hub release),
        ``converted_dir``, ``dtype``, ``llm_file``, ``backend`` as ``CosyVoice3.from_pretrained`` takes them.
      batch_size: model rows (text segments) per ``tts_batch`` call on one device.
      spkinfo: a ``save_spkinfo`` directory, for lines with ``spk_id``.
      subtype: wav sample format: "PCM_16" (as ``cosyjax tts``), "PCM_24" or "FLOAT" (the float32 audio as is).
      devices: use the first N local devices (default: all of the model's platform).
      limit: run at most this many of the pending lines (manifest order), e.g. for a trial.
      progress: progress bar (lines, ETA, audio-seconds per second) on process 0;
        ``progress_all_processes``: on every process.
      coordinator_address, num_processes, process_id, auto_detect_cluster: the multi-process run
        (``cosyjax.batch.distributed.setup``).
    Returns:
      the BatchSummary (process 0: of all processes; it is also in ``out_dir/summary.json``).
    Raises:
      ManifestError: bad lines (all of them), before anything is loaded.  ValueError: bad options.
      BatchInterrupted: Ctrl-C; what finished is recorded, a rerun does the rest.
    """
    _check_options(batch_size, subtype, limit, devices)
    entries = read_manifest(manifest, spkinfo=spkinfo is not None)
    proc = setup(coordinator_address, num_processes, process_id, auto_detect=auto_detect_cluster)
    show = progress and (proc.is_main or progress_all_processes)
    if tts is None:
        from cosyjax.pipeline import DEFAULT_HUB_ID, CosyVoice3

        tts = CosyVoice3.from_pretrained(model_dir or DEFAULT_HUB_ID, dtype=dtype, backend=backend,
                                         converted_dir=converted_dir, llm_file=llm_file, progress=show)
    if spkinfo is not None:
        tts.load_spkinfo(spkinfo)
        check_speakers(manifest, entries, tts.spk2info)  # with voices the caller's tts already held
    local = _local_devices(tts, devices)
    out = OutputDir(out_dir, proc, subtype=subtype, sample_rate=tts.sample_rate)
    salt = fingerprint_salt(tts, subtype)
    if proc.is_main:
        out.remove_stale_temps()
    done = out.completed(entries, salt)
    token = agree_on_run_token(proc)  # every process has read the directory before anyone writes to it
    pending = [e for e in entries if e.id not in done]
    if limit is not None:
        pending = pending[:limit]
    batches = plan_batches(tts, pending, batch_size)
    mine = batches[proc.index::proc.count]
    frontend = Frontend(tts, (e for b in mine for e in b.entries))
    workers = [_Worker(m, d, frontend, out, salt, batch_size) for m, d in zip(_replicas(tts, local), local)]
    desc = "batch" if proc.count == 1 else f"batch p{proc.index}"
    status, stats = "failed", _RunStats()
    try:
        stats = _execute(workers, mine, out, show, desc)
        status = "interrupted" if stats.interrupted else "done"
    finally:
        out.close()
        part = dict(dataclasses.asdict(stats), token=token, status=status, process=proc.index,
                    devices=len(local), skipped=len(done))
        if not proc.is_main:
            out.write_json(f"summary.p{proc.index}.json", part)
    if not proc.is_main or (proc.count > 1 and stats.interrupted):
        # the merge waits for a complete run; until then the journals hold everything
        summary = _summary(entries, len(done), [part], proc, batch_size, done_now=len(done) + stats.synthesized,
                           failed_now=stats.failed)
    else:
        parts = [part] + (out.part_summaries(token, proc.count) if proc.count > 1 else [])
        results, errors = out.merge(entries)
        ids = {e.id for e in entries}
        summary = _summary(entries, len(done), parts, proc, batch_size,
                           done_now=len(out.completed(entries, salt)),
                           failed_now=sum(r["id"] in ids for r in errors))
        out.write_json(SUMMARY, dict(dataclasses.asdict(summary), manifest=os.path.abspath(manifest),
                                     model_dir=os.path.abspath(tts.model_dir), dtype=str(tts.model.dtype),
                                     subtype=subtype, parts=parts))
        for i in range(1, proc.count):
            path = os.path.join(out.path, f"summary.p{i}.json")
            if os.path.isfile(path):
                os.unlink(path)
    if stats.interrupted:
        raise BatchInterrupted(summary)
    return summary


def _summary(entries: Sequence[Entry], skipped: int, parts: Sequence[dict[str, Any]], proc: ProcessInfo,
             batch_size: int, *, done_now: int, failed_now: int) -> BatchSummary:
    audio = sum(p["audio_seconds"] for p in parts)
    wall = max(p["wall_seconds"] for p in parts)
    return BatchSummary(items=len(entries), done=done_now, skipped=skipped,
                        synthesized=sum(p["synthesized"] for p in parts), failed=failed_now,
                        pending=len(entries) - done_now - failed_now, audio_seconds=round(audio, 3),
                        wall_seconds=round(wall, 3), audio_seconds_per_second=round(audio / wall, 4) if wall else 0.0,
                        processes=len(parts) if proc.is_main else proc.count,
                        devices=sum(p["devices"] for p in parts), batch_size=batch_size,
                        interrupted=any(p["status"] == "interrupted" for p in parts), process=proc.index)
