"""The batch manifest: one JSON object per line, checked whole before any work starts.

Fields (these names are the contract; any other key is refused, so a typo cannot be silently ignored):

============== ======================================================================================
``id``         required; names the output ``<id>.wav``: letters, digits, ``_``, ``-``, ``.``, not
               starting with ``.``, at most 200 characters, unique in the manifest
``mode``       required: ``zero_shot``, ``cross_lingual``, ``instruct2`` or ``vc``
``text``       the text to speak (every mode but ``vc``, which takes none).  ``cross_lingual`` text
               without ``<|endofprompt|>`` gets ``cosyjax tts``'s default prefix
``prompt_wav`` the voice: a path relative to the manifest's folder, or absolute; or, instead,
``spk_id``     a voice cached with ``CosyVoice3.save_spkinfo`` (needs ``--spkinfo DIR``; not for ``vc``)
``prompt_text`` ``zero_shot`` with ``prompt_wav`` only: the transcript of the prompt
``instruct_text`` ``instruct2`` only (required there)
``source_wav`` ``vc`` only (required there): the speech to convert, a path like ``prompt_wav``
``seed``       optional int in [0, 2**32), default 0: the line's PRNG key, as ``cosyjax tts --seed`` (``vc`` draws none)
``speed``      optional positive number, default 1.0
============== ======================================================================================

Blank lines are skipped (line numbers still count them).  Missing audio files are bad lines; audio that
exists but cannot be decoded is found when the line runs, and that line alone fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from typing import Any, Collection

MODES = ("zero_shot", "cross_lingual", "instruct2", "vc")
FIELDS = ("id", "mode", "text", "prompt_wav", "prompt_text", "spk_id", "instruct_text", "source_wav", "seed",
          "speed")
MAX_ID_CHARS = 200
MAX_SEED = 2 ** 32  # jax.random.key(seed) keeps 32 bits without x64: larger seeds would alias smaller ones
ID_PATTERN = re.compile(r"[^\W][\w.\-]*\Z")
MAX_REPORTED = 50  # bad lines listed in one ManifestError (the count says how many more)

# What each mode needs ("required") and refuses ("refused"); the voice (prompt_wav / spk_id) is checked apart.
_MODE_FIELDS = {
    "zero_shot": ({"text"}, {"instruct_text", "source_wav"}),
    "cross_lingual": ({"text"}, {"prompt_text", "instruct_text", "source_wav"}),
    "instruct2": ({"text", "instruct_text"}, {"prompt_text", "source_wav"}),
    "vc": ({"source_wav", "prompt_wav"}, {"text", "prompt_text", "instruct_text", "spk_id"}),
}


class ManifestError(ValueError):
    """Bad manifest lines, all reported at once: ``problems`` is a list of (line number, reason)."""

    def __init__(self, path: str, problems: list[tuple[int, str]]):
        self.path = path
        self.problems = problems
        shown = "\n".join(f"  line {n}: {why}" for n, why in problems[:MAX_REPORTED])
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        super().__init__(f"{path}: {len(problems)} bad line(s), nothing was run:\n{shown}{more}")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One checked manifest line (paths absolute)."""

    line: int
    id: str
    mode: str
    text: str = ""
    prompt_wav: str | None = None
    prompt_text: str | None = None
    spk_id: str | None = None
    instruct_text: str | None = None
    source_wav: str | None = None
    seed: int = 0
    speed: float = 1.0

    def fingerprint(self, salt: str = "") -> str:
        """A digest of what decides this line's audio (every field but the line number, plus ``salt``)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "line"}
        blob = json.dumps([fields, salt], sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _string(obj: dict, key: str, *, nonblank: bool) -> str | None:
    if key not in obj or obj[key] is None:
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, found {type(value).__name__}")
    if nonblank and not value.strip():
        raise ValueError(f"{key}: empty")
    return value


def _audio_path(obj: dict, key: str, base_dir: str) -> str | None:
    value = _string(obj, key, nonblank=True)
    if value is None:
        return None
    path = os.path.abspath(os.path.join(base_dir, os.path.expanduser(value)))
    if not os.path.isfile(path):
        raise ValueError(f"{key}: {path} not found")
    return path


def parse_entry(obj: Any, line: int, base_dir: str, *, spkinfo: bool) -> Entry:
    """Check one decoded manifest line.

    Args:
      obj: the line's JSON value.  line: its 1-based number.  base_dir: folder relative paths start from.
      spkinfo: whether a speaker cache was given (``spk_id`` needs one).
    Raises:
      ValueError: naming the field and what is wrong with it.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} (fields: {', '.join(FIELDS)})")
    ident = obj.get("id")
    if not isinstance(ident, str) or not ident:
        raise ValueError("id: required, a non-empty string")
    if len(ident) > MAX_ID_CHARS or not ID_PATTERN.match(ident):
        raise ValueError(f"id {ident!r}: use letters, digits, '_', '-', '.' (not first), at most {MAX_ID_CHARS} "
                         "characters: it names the output file")
    mode = obj.get("mode")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, found {mode!r}")
    present = {k for k in FIELDS if obj.get(k) is not None}
    required, refused = _MODE_FIELDS[mode]
    if required - present:
        raise ValueError(f"mode {mode} needs {', '.join(sorted(required - present))}")
    if refused & present:
        raise ValueError(f"mode {mode} takes no {', '.join(sorted(refused & present))}")
    if mode != "vc":
        if ("prompt_wav" in present) == ("spk_id" in present):
            raise ValueError("give the voice as prompt_wav or as spk_id (one of them)")
        if mode == "zero_shot" and "prompt_wav" in present and "prompt_text" not in present:
            raise ValueError("mode zero_shot with prompt_wav needs prompt_text (its transcript)")
        if "spk_id" in present and "prompt_text" in present:
            raise ValueError("spk_id carries its own transcript: drop prompt_text")
        if "spk_id" in present and not spkinfo:
            raise ValueError("spk_id needs a speaker cache (--spkinfo DIR / spkinfo=)")
    seed = obj.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed: expected an integer in [0, 2**32), found {seed!r}")
    speed = obj.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed: expected a positive number, found {speed!r}")
    return Entry(line=line, id=ident, mode=mode, text=_string(obj, "text", nonblank=True) or "",
                 prompt_wav=_audio_path(obj, "prompt_wav", base_dir),
                 prompt_text=_string(obj, "prompt_text", nonblank=True),
                 spk_id=_string(obj, "spk_id", nonblank=True),
                 instruct_text=_string(obj, "instruct_text", nonblank=True),
                 source_wav=_audio_path(obj, "source_wav", base_dir), seed=int(seed), speed=float(speed))


def read_manifest(path: str, *, spkinfo: bool = False) -> list[Entry]:
    """Every line of a manifest, checked; nothing is loaded or run.

    Args:
      path: the ``.jsonl`` manifest.  spkinfo: whether a speaker cache will be loaded.
    Returns:
      the entries in file order.
    Raises:
      FileNotFoundError: no such manifest.
      ManifestError: every bad line with its number and reason (bad JSON, a bad field, a duplicate id,
        a missing audio file), or an empty manifest.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: manifest not found")
    base_dir = os.path.dirname(os.path.abspath(path))
    entries: list[Entry] = []
    problems: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                entry = parse_entry(json.loads(raw), number, base_dir, spkinfo=spkinfo)
            except json.JSONDecodeError as e:
                problems.append((number, f"not JSON ({e.msg} at column {e.colno})"))
                continue
            except ValueError as e:
                problems.append((number, str(e)))
                continue
            if entry.id in first_line:
                problems.append((number, f"id {entry.id!r} repeats line {first_line[entry.id]}"))
                continue
            first_line[entry.id] = number
            entries.append(entry)
    if not entries and not problems:
        problems.append((0, "no lines"))
    if problems:
        raise ManifestError(path, problems)
    return entries


def check_speakers(path: str, entries: list[Entry], known: Collection[str]) -> None:
    """Raise ManifestError for lines whose ``spk_id`` is not in the loaded speaker cache."""
    known = set(known)
    problems = [(e.line, f"spk_id {e.spk_id!r} is not in the speaker cache (it holds: "
                         f"{', '.join(sorted(known)) or 'nothing'})")
                for e in entries if e.spk_id is not None and e.spk_id not in known]
    if problems:
        raise ManifestError(path, problems)
