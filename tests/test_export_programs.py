"""``jax.export`` of every stage program (cosyjax/export_programs.py) and ``cosyjax export-programs``.

Every program kind a request runs (LLM prefill and decode chunk, the flow offline and stream push,
the stream cache growth, the vocoder's offline and stream programs) is exported, serialised,
deserialised and run on the inputs a real request gave it; the result must equal the jitted one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyjax.export_programs import export_programs, load_program
from cosyjax.limits import Limits
from cosyjax.model import CosyVoice3Model
from cosyjax.programs import ProgramCache

from conftest import TINY_RELEASE

SMALL = Limits(max_text_tokens=8, max_prompt_text_tokens=4, max_prompt_seconds=1.0, max_output_seconds=2.0)


@pytest.fixture(scope="module")
def model(tiny_converted):
    from cosyjax.checkpoint import load_converted

    return CosyVoice3Model(load_converted(tiny_converted), limits=SMALL)


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def _recorded_calls(model) -> dict[str, tuple]:
    """The first real call of each program kind, recorded through the model's ProgramCache."""
    calls: dict[str, tuple] = {}
    real = ProgramCache.__call__

    def record(self, fn, *args, **static):
        name = fn.__name__
        if name not in calls:  # copy before any donation consumes the inputs
            copy = [jnp.array(a, copy=True) if isinstance(a, jax.Array) else np.array(a) for a in jax.tree.leaves(args)]
            calls[name] = (fn, jax.tree.unflatten(jax.tree.structure(args), copy), static)
        return real(self, fn, *args, **static)

    ProgramCache.__call__ = record
    try:
        cfg = model.config
        prompt = dict(flow_prompt_speech_tokens=np.arange(4), prompt_feat=np.zeros((8, cfg.flow.output_size), np.float32),
                      embedding=np.ones(cfg.flow.spk_embed_dim, np.float32))
        for stream in (False, True):
            for _ in model.tts(text_ids=[3, 4, 5], **prompt, stream=stream, key=1):
                pass
            for _ in model.tts(forced_tokens=np.arange(40) % cfg.flow.vocab_size, **prompt, stream=stream):
                pass
    finally:
        ProgramCache.__call__ = real
    return calls


def test_every_program_kind_round_trips_through_serialization(model):
    calls = _recorded_calls(model)
    assert {"prefill", "decode_chunk", "_flow_core", "_push_core", "_hift_core", "_stream_core", "_make_noise"} <= set(calls), \
        sorted(calls)
    for name, (fn, args, static) in calls.items():
        exported = jax.export.export(fn, platforms=["cpu"])(*args, **static)
        restored = jax.export.deserialize(exported.serialize())
        got = restored.call(*args)
        want = fn(*args, **static)  # last: the jitted call may donate its inputs
        assert jax.tree.structure(got) == jax.tree.structure(want), name
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(_host(a), _host(b), err_msg=name)


def test_export_programs_writes_every_program_with_a_manifest(model, tmp_path):
    manifest = export_programs(model, str(tmp_path / "p"), platforms=("cpu", "cuda"))
    specs = model.program_specs()
    assert len(manifest["programs"]) == len(specs) > 10
    on_disk = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    first = on_disk["programs"][0]
    exported = load_program(str(tmp_path / "p" / first["file"]))
    assert set(exported.platforms) == {"cpu", "cuda"}
    assert [list(a.shape) for a in exported.in_avals][-len(first["args"]):] == [a["shape"] for a in first["args"]]
    with pytest.raises(ValueError, match="output exists"):
        export_programs(model, str(tmp_path / "p"))
    with pytest.raises(ValueError, match="metal"):
        export_programs(model, str(tmp_path / "q"), platforms=("metal",))
    assert not (tmp_path / "q").exists()


def test_cli_export_programs(tiny_converted, tmp_path):
    out = tmp_path / "programs"
    r = subprocess.run([sys.executable, "-m", "cosyjax.cli", "export-programs", "--model-dir", TINY_RELEASE,
                        "--converted-dir", tiny_converted, "--out", str(out), "--quiet", "--max-text-tokens", "8",
                        "--max-prompt-text-tokens", "4", "--max-prompt-seconds", "1", "--max-output-seconds", "2"],
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "programs" in r.stdout and (out / "manifest.json").is_file()
