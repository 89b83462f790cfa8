"""Shared fixtures: the committed reference cases and the full-size release manifest."""

from __future__ import annotations

import glob
import json
import os
import tempfile

import pytest

DATA = os.path.join(os.path.dirname(__file__), "data")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time on tiny models is XLA compilation, and many tests (and the CLI/server
# subprocesses they start, which inherit this environment) compile the same programs.  JAX's
# persistent compilation cache shares those executables between tests, pytest-xdist workers and
# subprocesses; a size bound turns on its file lock, so concurrent workers are safe.  Set
# JAX_COMPILATION_CACHE_DIR yourself to move it, or to "" to compile everything afresh.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "cosyjax-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))


def case_dirs() -> list[str]:
    """Every committed reference case (tests/data/*/golden.npz)."""
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(DATA, "*", "golden.npz")))


def cases_with_group(group: str) -> list[str]:
    """Committed cases that hold ``group`` (a key starting with ``group/``)."""
    import numpy as np

    out = []
    for d in case_dirs():
        with np.load(os.path.join(d, "golden.npz")) as z:
            if any(k.startswith(group + "/") for k in z.files):
                out.append(d)
    return out


@pytest.fixture(scope="session")
def full_size_manifest() -> dict:
    with open(os.path.join(DATA, "full-size-manifest.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def full_size_model_dir(tmp_path_factory, full_size_manifest) -> str:
    """A weightless release directory at the real sizes: yaml model section + Qwen config.json."""
    from cosyjax.parity.manifest import write_weightless_release

    return write_weightless_release(full_size_manifest, str(tmp_path_factory.mktemp("full_size_release")))


TINY_RELEASE = os.path.join(DATA, "tiny-release")
TINY_PROMPT_TEXT = "You are a helpful assistant.<|endofprompt|>A short prompt."


def voice_wav_bytes(seconds: float = 3.2, sr: int = 16000, f0: float = 180.0, seed: int = 0) -> bytes:
    """A synthetic voiced prompt (tremolo sine + noise) encoded as a 16-bit WAV file."""
    import io

    import numpy as np
    import soundfile

    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * f0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    x += 0.02 * np.random.default_rng(seed).standard_normal(t.size)
    buf = io.BytesIO()
    soundfile.write(buf, x.astype(np.float32), sr, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_converted(tmp_path_factory) -> str:
    """The committed tiny release converted once per session (its converted directory)."""
    from cosyjax.convert import convert_to_dir

    return convert_to_dir(TINY_RELEASE, str(tmp_path_factory.mktemp("tiny-release") / "conv"), progress=False)


@pytest.fixture(scope="session")
def tts(tiny_converted):
    """``CosyVoice3`` on the tiny release (shared by the pipeline and server tests)."""
    from cosyjax.pipeline import CosyVoice3

    return CosyVoice3(TINY_RELEASE, converted_dir=tiny_converted, progress=False)
