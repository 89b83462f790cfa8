"""After ``CosyVoice3Model.warmup()``, a request inside the model's ``Limits`` compiles nothing.

Counted with ``jax.monitoring`` (``cosyjax.programs.CompileCounter``: XLA backend compiles and
persistent-cache loads) over random text, prompt-text, prompt-speech and output lengths, every
mode (zero-shot, cross-lingual, instruct, voice conversion), streamed and not, and speeds down to
the limit.  Every program of every stage (LLM prefill and decode chunk, flow offline and stream
push, HiFT offline and stream push, the HiFT noise) must come from the warm-up.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cosyjax.limits import Limits
from cosyjax.model import CosyVoice3Model
from cosyjax.programs import CompileCounter

# Small limits keep the warm-up short on 2 CPU cores; the bucket tables are the release ones.
LIMITS = Limits(max_text_tokens=24, max_prompt_text_tokens=12, max_prompt_seconds=2.0, max_output_seconds=3.0)


@pytest.fixture(scope="module")
def warmed(tiny_converted):
    from cosyjax.checkpoint import load_converted

    model = CosyVoice3Model(load_converted(tiny_converted), limits=LIMITS)
    # An executable another test built in this process is reused from jax's in-memory caches without a compile
    # event; cleared, each of warm-up's programs is compiled or loaded from the persistent cache: one event each.
    jax.clear_caches()
    with CompileCounter() as counter:
        report = model.warmup()
    return model, report, counter


def _requests(model: CosyVoice3Model, count: int, seed: int):
    """Random requests inside the limits: lengths drawn anew for each."""
    cfg, lim = model.config, model.limits
    rate, ratio = cfg.token_frame_rate, cfg.flow.token_mel_ratio
    rng = np.random.default_rng(seed)
    text_vocab = cfg.llm.vocab_size
    for i in range(count):
        stream = bool(i % 2)
        prompt_tokens = int(rng.integers(1, lim.prompt_speech_tokens(rate) + 1))
        request = dict(flow_prompt_speech_tokens=rng.integers(0, cfg.flow.vocab_size, prompt_tokens),
                       prompt_feat=rng.standard_normal((ratio * prompt_tokens, cfg.flow.output_size)).astype(np.float32),
                       embedding=rng.standard_normal(cfg.flow.spk_embed_dim).astype(np.float32),
                       key=int(rng.integers(1 << 30)), stream=stream)
        mode = i % 4
        if mode == 3:  # voice conversion: no LLM
            request["source_speech_tokens"] = rng.integers(0, cfg.flow.vocab_size,
                                                           int(rng.integers(1, lim.output_tokens(rate) + 1)))
        else:
            request["text_ids"] = rng.integers(0, text_vocab, int(rng.integers(1, lim.max_text_tokens + 1)))
            if mode != 1:  # zero-shot / instruct carry prompt text; cross-lingual does not
                request["prompt_text_ids"] = rng.integers(0, text_vocab,
                                                          int(rng.integers(1, lim.max_prompt_text_tokens + 1)))
            if mode == 0:
                request["llm_prompt_speech_tokens"] = request["flow_prompt_speech_tokens"]
        if not stream:
            request["speed"] = float(rng.choice([lim.min_speed, 0.8, 1.0, 1.5]))
        yield request


def test_warmup_compiles_every_program_then_requests_compile_nothing(warmed):
    model, report, counter = warmed
    assert report.programs > 10 and counter.count >= report.programs  # the counter sees compiles
    lengths = set()
    with CompileCounter() as after:
        for request in _requests(model, 12, seed=0):
            chunks = [c["tts_speech"] for c in model.tts(**request)]
            audio = np.concatenate(chunks, axis=1)
            assert audio.size > 0 and np.isfinite(audio).all()
            lengths.add((request.get("text_ids", ()).__len__(), len(request["flow_prompt_speech_tokens"]),
                         audio.shape[1]))
    assert len(lengths) >= 10  # the requests really differ in length
    assert after.count == 0, f"{after.count} compilation(s) after warmup ({after.seconds:.1f} s)"


def test_speed_below_the_limit_is_refused(warmed):
    model = warmed[0]
    with pytest.raises(ValueError, match="min_speed"):
        next(model.tts(source_speech_tokens=[1, 2], flow_prompt_speech_tokens=[1],
                       prompt_feat=np.zeros((model.config.flow.token_mel_ratio, model.config.flow.output_size),
                                            np.float32),
                       embedding=np.ones(model.config.flow.spk_embed_dim, np.float32), speed=0.25))


_CACHE_SCRIPT = r"""
import json, os, sys, tempfile

import jax
import numpy as np

sys.path.insert(0, os.getcwd())  # ``benchmarks`` is a top-level directory of the repo
from benchmarks.common import compile_record
from cosyjax.programs import CompileCounter

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
x = np.arange(8, dtype=np.float32)
out = {}
for name in ("compiled", "loaded"):
    jax.clear_caches()  # the second pass finds the executable only in the persistent cache
    with compile_record() as rec, CompileCounter() as counter:
        jax.jit(lambda v: jax.numpy.sin(v) * 2 + 1)(x).block_until_ready()
    out[name] = dict(count=counter.count, loads=counter.cache_loads, seconds=counter.seconds,
                     total=counter.total_seconds, rec_compiles=rec.compiles, rec_seconds=rec.seconds)
print(json.dumps(out))
"""


def test_a_persistent_cache_load_counts_once_and_benchmarks_count_the_same():
    """One definition of a compile: a persistent-cache load is one executable (jax records the backend compile
    event around the cache read too), and ``benchmarks.common.compile_record`` reports CompileCounter's
    count and its trace + lower + backend seconds."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], cwd=repo, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    compiled, loaded = got["compiled"], got["loaded"]
    assert compiled["count"] >= 1 and compiled["loads"] == 0, got
    assert loaded["count"] == compiled["count"] and loaded["loads"] == loaded["count"], got  # not twice
    for run in (compiled, loaded):
        assert run["rec_compiles"] == run["count"], got
        assert run["rec_seconds"] == pytest.approx(run["total"]) and run["total"] > run["seconds"] > 0, got
