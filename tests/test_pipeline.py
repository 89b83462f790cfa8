"""End to end on the committed tiny release: the four modes, streaming, the CLI, the speaker cache, bad input."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from cosyjax.pipeline import HubError, resolve_model_dir

from conftest import TINY_PROMPT_TEXT as PROMPT_TEXT, TINY_RELEASE as RELEASE, voice_wav_bytes


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "prompt.wav"
    path.write_bytes(voice_wav_bytes())
    return str(path)


def _audio(gen):
    chunks = [np.asarray(out["tts_speech"]) for out in gen]
    assert chunks and all(c.ndim == 2 and c.shape[0] == 1 and c.dtype == np.float32 for c in chunks)
    return chunks


def test_four_modes_produce_audio(tts, prompt_wav):
    zero = _audio(tts.inference_zero_shot("Hello.", PROMPT_TEXT, prompt_wav))
    cross = _audio(tts.inference_cross_lingual("You are a helpful assistant.<|endofprompt|>Hello.", prompt_wav))
    inst = _audio(tts.inference_instruct2("Hello.", "You are a helpful assistant. Speak fast.<|endofprompt|>",
                                          prompt_wav))
    vc = _audio(tts.inference_vc(prompt_wav, prompt_wav))
    for chunks in (zero, cross, inst, vc):
        audio = np.concatenate(chunks, axis=1)
        assert audio.shape[1] > 0 and np.isfinite(audio).all() and np.abs(audio).max() <= 0.99 + 1e-6
        assert audio.shape[1] % (tts.sample_rate // tts.config.token_frame_rate) == 0  # whole tokens
    # VC turns the 3.2 s source into speech tokens at 25 Hz, 2 mel frames each, 480 samples per frame.
    assert np.concatenate(vc, axis=1).shape[1] == 80 * tts.sample_rate // tts.config.token_frame_rate


def test_same_seed_same_audio_stream_or_not(tts, prompt_wav):
    offline = np.concatenate(_audio(tts.inference_zero_shot("Hello.", PROMPT_TEXT, prompt_wav, seed=3)), axis=1)
    again = np.concatenate(_audio(tts.inference_zero_shot("Hello.", PROMPT_TEXT, prompt_wav, seed=3)), axis=1)
    np.testing.assert_array_equal(offline, again)
    chunks = _audio(tts.inference_zero_shot("Hello.", PROMPT_TEXT, prompt_wav, seed=3, stream=True))
    stream = np.concatenate(chunks, axis=1)
    assert len(chunks) >= 2
    assert stream.shape == offline.shape  # same tokens: one key per request, whatever the chunking
    again = _audio(tts.inference_zero_shot("Hello.", PROMPT_TEXT, prompt_wav, seed=3, stream=True))
    assert [c.shape for c in again] == [c.shape for c in chunks]
    np.testing.assert_array_equal(np.concatenate(again, axis=1), stream)  # no state carried between requests
    other = np.concatenate(_audio(tts.inference_zero_shot("Hello.", PROMPT_TEXT, prompt_wav, seed=4)), axis=1)
    assert not np.array_equal(other[:, :offline.shape[1]], offline[:, :other.shape[1]])  # the seed matters


def test_speaker_cache_round_trip(tts, prompt_wav, tmp_path):
    try:
        assert tts.add_zero_shot_spk(PROMPT_TEXT, prompt_wav, "alice")
        direct = np.concatenate(_audio(tts.inference_zero_shot("Hello.", PROMPT_TEXT, prompt_wav, seed=1)), axis=1)
        cached = np.concatenate(_audio(tts.inference_zero_shot("Hello.", "", zero_shot_spk_id="alice", seed=1)),
                                axis=1)
        np.testing.assert_array_equal(direct, cached)
        tts.save_spkinfo(str(tmp_path / "voices"))
        tts.spk2info.clear()
        assert tts.load_spkinfo(str(tmp_path / "voices")) == ["alice"]
        again = np.concatenate(_audio(tts.inference_zero_shot("Hello.", "", zero_shot_spk_id="alice", seed=1)),
                               axis=1)
        np.testing.assert_array_equal(direct, again)
    finally:  # the session's pipeline is shared: test_server registers its own "alice" on it
        tts.spk2info.pop("alice", None)


def test_bad_inputs(tts, prompt_wav, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        next(tts.inference_zero_shot("   ", PROMPT_TEXT, prompt_wav))
    with pytest.raises(ValueError, match="prompt_text"):
        tts.inference_zero_shot("Hello.", "", prompt_wav)
    with pytest.raises(ValueError, match="prompt_wav"):
        tts.inference_cross_lingual("Hello.", None)
    with pytest.raises(KeyError, match="bob"):
        tts.inference_zero_shot("Hello.", "", zero_shot_spk_id="bob")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    with pytest.raises(ValueError, match="corrupt.wav"):
        tts.inference_cross_lingual("Hello.", str(corrupt))
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(32000, np.float32), 16000)
    with pytest.raises(ValueError, match="silent"):
        tts.inference_cross_lingual("Hello.", str(silent))
    with pytest.raises(ValueError, match="[Pp]unctuation|empty"):
        next(tts.inference_zero_shot("...!?", PROMPT_TEXT, prompt_wav))


def test_inference_dispatch_equals_each_mode_method(tts, prompt_wav, monkeypatch):
    """``inference(mode, ...)`` gives what that mode's ``inference_*`` method gives (same seed)."""
    import jax

    from cosyjax.pipeline import MODES

    def audio(gen):
        return np.concatenate(_audio(gen), axis=1)

    cross_text = "You are a helpful assistant.<|endofprompt|>Hello."
    instruction = "You are a helpful assistant. Speak fast.<|endofprompt|>"
    cases = {
        "zero_shot": (dict(tts_text="Hello.", prompt_text=PROMPT_TEXT, prompt_wav=prompt_wav, seed=5),
                      lambda: tts.inference_zero_shot("Hello.", PROMPT_TEXT, prompt_wav, seed=5)),
        "instruct2": (dict(tts_text="Hello.", instruct_text=instruction, prompt_wav=prompt_wav, seed=7),
                      lambda: tts.inference_instruct2("Hello.", instruction, prompt_wav, seed=7)),
        "vc": (dict(source_wav=prompt_wav, prompt_wav=prompt_wav), lambda: tts.inference_vc(prompt_wav, prompt_wav)),
        "cross_lingual": (dict(tts_text=cross_text, prompt_wav=prompt_wav, seed=6),
                          lambda: tts.inference_cross_lingual(cross_text, prompt_wav, seed=6)),
    }
    assert sorted(cases) == sorted(MODES)
    # A cached voice: zero_shot needs no prompt_text (the voice has its transcript), as inference_zero_shot.
    tts.add_zero_shot_spk(PROMPT_TEXT, prompt_wav, "dispatch voice")
    try:
        np.testing.assert_array_equal(
            audio(tts.inference("zero_shot", tts_text="Hello.", zero_shot_spk_id="dispatch voice", seed=5)),
            audio(tts.inference_zero_shot("Hello.", "", zero_shot_spk_id="dispatch voice", seed=5)))
    finally:
        del tts.spk2info["dispatch voice"]
    for mode, (kwargs, direct) in cases.items():
        if mode == "cross_lingual":  # its text decodes to the length cap (tens of s on CPU): forced tokens
            calls = record_llm_inputs(tts, monkeypatch)
        np.testing.assert_array_equal(audio(tts.inference(mode, **kwargs)), audio(direct()), err_msg=mode)
    assert len(calls) == 2  # ... and the same seed's key in both calls
    np.testing.assert_array_equal(*(jax.random.key_data(call["key"]) for call in calls))


def test_inference_dispatch_refuses_bad_modes_and_arguments(tts, prompt_wav):
    """Checked before anything runs: the mode, then each argument the mode refuses or needs, by name."""
    from cosyjax.pipeline import MODE_ARGUMENTS

    assert "seed" not in MODE_ARGUMENTS["vc"] and "prompt_text" not in MODE_ARGUMENTS["cross_lingual"]
    for bad in ("sft", "zero-shot", None):
        with pytest.raises(ValueError, match=r"mode .*: expected one of zero_shot, cross_lingual, instruct2, vc"):
            tts.inference(bad, tts_text="Hello.", prompt_wav=prompt_wav)
    with pytest.raises(ValueError, match="mode zero_shot needs prompt_text"):
        tts.inference("zero_shot", tts_text="Hello.", prompt_wav=prompt_wav)
    with pytest.raises(ValueError, match="mode instruct2 needs instruct_text"):
        tts.inference("instruct2", tts_text="Hello.", prompt_wav=prompt_wav)
    with pytest.raises(ValueError, match="mode cross_lingual needs tts_text"):
        tts.inference("cross_lingual", prompt_wav=prompt_wav)
    with pytest.raises(ValueError, match=r"mode cross_lingual needs prompt_wav \(or a cached zero_shot_spk_id\)"):
        tts.inference("cross_lingual", tts_text="Hello.")
    with pytest.raises(ValueError, match="mode vc needs source_wav"):
        tts.inference("vc", prompt_wav=prompt_wav)
    with pytest.raises(ValueError, match="mode vc takes no seed"):
        tts.inference("vc", source_wav=prompt_wav, prompt_wav=prompt_wav, seed=1)
    with pytest.raises(ValueError, match="mode vc takes no tts_text, language"):
        tts.inference("vc", tts_text="Hello.", source_wav=prompt_wav, prompt_wav=prompt_wav, language="en")
    with pytest.raises(ValueError, match="mode cross_lingual takes no prompt_text"):
        tts.inference("cross_lingual", tts_text="Hello.", prompt_text=PROMPT_TEXT, prompt_wav=prompt_wav)


def test_offline_hub_id_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="--local-dir"):
        resolve_model_dir("FunAudioLLM/Fun-CosyVoice3-0.5B-2512", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_dir(str(tmp_path / "no-such-dir"))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cosyjax.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=cwd)


def test_cli_tts_writes_a_wav_atomically(tiny_converted, prompt_wav, tmp_path):
    out = tmp_path / "out.wav"
    r = _cli("tts", "--model-dir", RELEASE, "--converted-dir", tiny_converted, "--text", "Hello.", "--prompt-wav",
             prompt_wav, "--prompt-text", PROMPT_TEXT, "--stream", "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    audio, sr = soundfile.read(out)
    assert sr == 24000 and audio.size > 0
    assert "chunk 1:" in r.stdout
    bad = tmp_path / "bad.wav"
    r = _cli("tts", "--model-dir", RELEASE, "--converted-dir", tiny_converted, "--text", "Hello.", "--prompt-wav",
             prompt_wav, "--mode", "zero_shot", "-o", str(bad))
    assert r.returncode == 2 and "--prompt-text" in r.stderr
    assert not bad.exists()
    assert sorted(os.listdir(tmp_path)) == ["out.wav"]  # no temp files left behind


@pytest.mark.parametrize("stream", [False, True], ids=["offline", "stream"])
def test_cli_tts_all_four_modes(tiny_converted, prompt_wav, tmp_path, stream, capsys):
    """Issue acceptance: `cosyjax tts --model-dir tests/data/tiny-release ...` for every mode, stream or not
    (in-process `main`, so the four runs share compiled functions)."""
    from cosyjax.cli import main

    common = ["--model-dir", RELEASE, "--converted-dir", tiny_converted, "--prompt-wav", prompt_wav] + (
        ["--stream"] if stream else [])
    runs = {"zero_shot": ["--text", "Hello world.", "--prompt-text", PROMPT_TEXT],
            "cross_lingual": ["--text", "You are a helpful assistant.<|endofprompt|>Hello world."],
            "instruct2": ["--text", "Hello world.", "--instruct-text",
                          "You are a helpful assistant. Speak slowly.<|endofprompt|>"],
            "vc": ["--source-wav", prompt_wav]}
    for mode, extra in runs.items():
        out = tmp_path / f"{mode}.wav"
        assert main(["tts", "--mode", mode, *common, *extra, "-o", str(out)]) == 0, capsys.readouterr().err
        audio, sr = soundfile.read(out)
        assert sr == 24000 and audio.size > 0 and np.isfinite(audio).all()
    assert sorted(os.listdir(tmp_path)) == sorted(f"{m}.wav" for m in runs)


# ------------------------------------------------------------------------------------------------
# prompt format, text-in streaming, prompt length (issue 12)
# ------------------------------------------------------------------------------------------------
FORCED_TOKENS = np.arange(30, 55)  # distinct, so the silent filter keeps all 25


def record_llm_inputs(tts, monkeypatch, *, forced: bool = True) -> list[dict]:
    """Record the kwargs of every ``CosyVoice3Model.tts`` call (one per text segment).

    With ``forced`` the LLM decode is replaced by ``FORCED_TOKENS`` (flow and HiFT still run): the
    tiny release's random LLM never samples a stop token, so a real decode runs to 20x the text
    length, which costs tens of seconds per call on CPU.  The LLM inputs are checked against the
    decode's own request validation.
    """
    from cosyjax.llm import lm

    calls = []
    real = tts.model.tts

    def spy(**kw):
        calls.append(kw)
        if not forced:
            return real(**kw)
        ids = [tuple(int(t) for t in kw.get(name, ())) for name in
               ("text_ids", "prompt_text_ids", "llm_prompt_speech_tokens")]
        lm.validate_request(tts.config.llm, lm.LMRequest(*ids))
        return real(**kw, forced_tokens=FORCED_TOKENS)

    monkeypatch.setattr(tts.model, "tts", spy)
    return calls


def _ids(tts, text: str) -> list[int]:
    return list(tts.tokenizer.encode(text))


SYSTEM = "You are a helpful assistant."
MARK = "<|endofprompt|>"


def test_prompt_without_marker_gets_the_cosyvoice3_prompt_and_a_warning(tts, prompt_wav, caplog):
    """The built prompt is the one the README tells users to write: same ids, same audio."""
    transcript = PROMPT_TEXT.split(MARK)[1]
    assert PROMPT_TEXT == SYSTEM + MARK + transcript
    with caplog.at_level("WARNING", logger="cosyjax.pipeline"):
        built = np.concatenate(_audio(tts.inference_zero_shot("Hello.", transcript, prompt_wav, seed=3)), axis=1)
    assert f"prompt_text has no {MARK}" in caplog.text and repr(SYSTEM + MARK) in caplog.text
    explicit = np.concatenate(_audio(tts.inference_zero_shot("Hello.", PROMPT_TEXT, prompt_wav, seed=3)), axis=1)
    np.testing.assert_array_equal(built, explicit)


def test_missing_marker_in_each_mode(tts, prompt_wav, monkeypatch, caplog):
    calls = record_llm_inputs(tts, monkeypatch)
    with caplog.at_level("WARNING", logger="cosyjax.pipeline"):
        _audio(tts.inference_cross_lingual("Hello. Second sentence here.", prompt_wav, text_frontend=False))
        _audio(tts.inference_instruct2("Hello.", "Speak fast.", prompt_wav))
        _audio(tts.inference_instruct2("Hello.", SYSTEM + " Speak fast.", prompt_wav))
    assert calls[0]["text_ids"] == _ids(tts, SYSTEM + MARK + "Hello. Second sentence here.")
    assert calls[1]["prompt_text_ids"] == calls[2]["prompt_text_ids"] == _ids(tts, SYSTEM + " Speak fast." + MARK)
    assert caplog.text.count(f"has no {MARK}") == 3
    assert "tts_text" in caplog.text and "instruct_text" in caplog.text
    # Upstream accepts the marker anywhere in prompt text + tts text: then nothing is inserted.
    caplog.clear()
    with caplog.at_level("WARNING", logger="cosyjax.pipeline"):
        _audio(tts.inference_zero_shot(SYSTEM + MARK + "Hello.", "A short prompt.", prompt_wav))
        _audio(tts.inference_instruct2(SYSTEM + MARK + "Hello.", "Speak fast.", prompt_wav))
    assert calls[3]["prompt_text_ids"] == _ids(tts, "A short prompt.")
    assert calls[4]["prompt_text_ids"] == _ids(tts, "Speak fast.")
    assert "has no" not in caplog.text


def test_cross_lingual_without_marker_normalises_and_prefixes_each_segment(tts, prompt_wav, monkeypatch):
    calls = record_llm_inputs(tts, monkeypatch)
    text = "I have 3 cats. " + "This sentence is long enough to need its own segment of text. " * 3
    segments = tts.normalizer(text)
    assert len(segments) >= 2 and not any(c.isdigit() for c in "".join(segments))
    _audio(tts.inference_cross_lingual(text, prompt_wav))
    assert [c["text_ids"] for c in calls] == [_ids(tts, SYSTEM + MARK + s) for s in segments]
    # The same text written with the marker is passed whole and unnormalised, as upstream.
    _audio(tts.inference_cross_lingual(SYSTEM + MARK + text, prompt_wav))
    assert calls[-1]["text_ids"] == _ids(tts, SYSTEM + MARK + text)


def test_language_option_builds_the_language_instruction(tts, prompt_wav, monkeypatch, caplog):
    calls = record_llm_inputs(tts, monkeypatch)
    english = SYSTEM + " Please speak in English." + MARK
    with caplog.at_level("WARNING", logger="cosyjax.pipeline"):
        _audio(tts.inference_zero_shot("Hello.", "A short prompt.", prompt_wav, language="en"))
        _audio(tts.inference_cross_lingual("Hello.", prompt_wav, language="English"))
        _audio(tts.inference_instruct2("Hello.", "Speak fast.", prompt_wav, language="yue"))
    assert "has no" not in caplog.text  # asked for: no warning
    assert calls[0]["prompt_text_ids"] == _ids(tts, english + "A short prompt.")
    assert calls[1]["text_ids"] == _ids(tts, english + "Hello.")
    assert calls[2]["prompt_text_ids"] == _ids(tts, SYSTEM + " 请用广东话表达。 Speak fast." + MARK)
    with pytest.raises(ValueError, match="prompt_text already holds"):
        tts.inference_zero_shot("Hello.", PROMPT_TEXT, prompt_wav, language="en")
    with pytest.raises(ValueError, match="tts_text already holds"):
        tts.inference_cross_lingual(SYSTEM + MARK + "Hello.", prompt_wav, language="en")
    with pytest.raises(ValueError, match="language='klingon'"):
        tts.inference_cross_lingual("Hello.", prompt_wav, language="klingon")


@pytest.mark.upstream
def test_cantonese_instruction_is_upstreams():
    """language="yue" builds upstream's own instruct_list entry (read from the upstream checkout)."""
    import ast

    from cosyjax.pipeline import build_prompt

    repo = os.environ.get("COSYJAX_REFERENCE_REPO")
    if not repo:
        pytest.skip("set COSYJAX_REFERENCE_REPO to an upstream CosyVoice checkout")
    with open(os.path.join(repo, "cosyvoice", "utils", "common.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    instruct_list = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                         and getattr(n.targets[0], "id", "") == "instruct_list")
    assert build_prompt("", "prompt_text", language="yue") in instruct_list
    assert all(build_prompt(s, "instruct_text", kind="instruction") == s for s in instruct_list)
    dialect = instruct_list[0][len(SYSTEM):-len(MARK)].strip()  # "请用广东话表达。" as a bare instruction
    assert build_prompt(dialect, "instruct_text", kind="instruction") == instruct_list[0]


def test_strict_refuses_like_upstream(tts, prompt_wav, monkeypatch):
    for call, field in ((lambda: tts.inference_zero_shot("Hello.", "A short prompt.", prompt_wav, strict=True),
                         "prompt_text"),
                        (lambda: tts.inference_cross_lingual("Hello.", prompt_wav, strict=True), "tts_text"),
                        (lambda: tts.inference_instruct2("Hello.", "Speak fast.", prompt_wav, strict=True),
                         "instruct_text"),
                        (lambda: tts.add_zero_shot_spk("A short prompt.", prompt_wav, "x", strict=True),
                         "prompt_text")):
        with pytest.raises(ValueError, match=f"{field} has no"):
            call()
    assert "x" not in tts.spk2info
    # with the marker, strict changes nothing
    calls = record_llm_inputs(tts, monkeypatch)
    _audio(tts.inference_cross_lingual(SYSTEM + MARK + "Hello.", prompt_wav, strict=True))
    _audio(tts.inference_zero_shot("Hello.", PROMPT_TEXT, prompt_wav, strict=True))
    assert calls[0]["text_ids"] == _ids(tts, SYSTEM + MARK + "Hello.")
    assert list(calls[1]["prompt_text_ids"]) == _ids(tts, PROMPT_TEXT)


def test_cached_speaker_without_marker(tts, prompt_wav, monkeypatch, caplog):
    calls = record_llm_inputs(tts, monkeypatch)
    with caplog.at_level("WARNING", logger="cosyjax.pipeline"):
        tts.add_zero_shot_spk("A short prompt.", prompt_wav, "carol")
    assert "prompt_text has no" in caplog.text
    np.testing.assert_array_equal(tts.spk2info["carol"]["prompt_text_ids"], _ids(tts, PROMPT_TEXT))
    # A voice cached without the marker (a spkinfo directory written before) gets it at inference.
    tts.spk2info["old"] = {**tts.spk2info["carol"], "prompt_text_ids": np.asarray(_ids(tts, "A short prompt."))}
    _audio(tts.inference_zero_shot("Hello.", "", zero_shot_spk_id="old"))
    assert list(calls[-1]["prompt_text_ids"]) == _ids(tts, PROMPT_TEXT)
    with pytest.raises(ValueError, match="cached speaker 'old' has no"):
        tts.inference_zero_shot("Hello.", "", zero_shot_spk_id="old", strict=True)
    assert tts.list_available_spks()[-2:] == ["carol", "old"]
    for spk in ("carol", "old"):
        del tts.spk2info[spk]


def test_text_generator_is_refused_with_a_type_error(tts, prompt_wav):
    def pieces():
        yield "Hello, "
        yield "world."

    for call in (lambda g: tts.inference_zero_shot(g, PROMPT_TEXT, prompt_wav),
                 lambda g: tts.inference_cross_lingual(g, prompt_wav),
                 lambda g: tts.inference_instruct2(g, "Speak fast.", prompt_wav)):
        gen = pieces()
        with pytest.raises(TypeError, match="tts_text must be a str, got generator.*not supported"):
            call(gen)
        assert next(gen) == "Hello, "  # refused before anything was read from it


def test_short_prompt_warns(tts, caplog, tmp_path):
    short = tmp_path / "short.wav"
    short.write_bytes(voice_wav_bytes(seconds=0.5))
    samples, rate = soundfile.read(io.BytesIO(voice_wav_bytes(seconds=0.8)), dtype="float32")
    with caplog.at_level("WARNING", logger="cosyjax.pipeline"):
        tts.add_zero_shot_spk(PROMPT_TEXT, str(short), "short")
        tts.add_zero_shot_spk(PROMPT_TEXT, (samples, rate), "short")
        with open(short, "rb") as f:
            tts.add_zero_shot_spk(PROMPT_TEXT, f, "short")
        tts.add_zero_shot_spk(PROMPT_TEXT, voice_wav_bytes(seconds=1.0), "short")  # 1.0 s: no warning
    del tts.spk2info["short"]
    warnings = [r.getMessage() for r in caplog.records if "too few speech tokens" in r.getMessage()]
    assert len(warnings) == 3, warnings
    assert f"{short} is 0.50 s long" in warnings[0] and "is 0.80 s long" in warnings[1]
    assert "0.50 s" in warnings[2]


@pytest.mark.parametrize("text, spoken", [("こんにちは123", "こんにちはone hundred and twenty-three."),
                                          ("안녕하세요 123개", "안녕하세요 one hundred and twenty-three개.")])
def test_japanese_and_korean_digits_synthesise(tts, prompt_wav, monkeypatch, text, spoken):
    """The issue's inputs (a bare AssertionError before): they reach the LLM with their digits spelled
    by the rules path (inflect, as upstream without a normaliser), and produce audio."""
    inflect = pytest.importorskip("inflect")
    assert inflect.engine().number_to_words("123") == "one hundred and twenty-three"
    calls = record_llm_inputs(tts, monkeypatch)
    audio = _audio(tts.inference_zero_shot(text, PROMPT_TEXT, prompt_wav))
    assert calls[0]["text_ids"] == _ids(tts, spoken)
    assert np.concatenate(audio, axis=1).shape[1] == FORCED_TOKENS.size * tts.sample_rate // tts.config.token_frame_rate


def test_cli_language_and_strict_prompt(tiny_converted, prompt_wav, tmp_path, capsys):
    from cosyjax.cli import main

    common = ["tts", "--model-dir", RELEASE, "--converted-dir", tiny_converted, "--prompt-wav", prompt_wav,
              "--text", "Hello."]
    out = tmp_path / "strict.wav"
    assert main([*common, "--prompt-text", "A short prompt.", "--strict-prompt", "-o", str(out)]) == 2
    assert "prompt_text has no <|endofprompt|>" in capsys.readouterr().err and not out.exists()
    assert main([*common, "--mode", "cross_lingual", "--language", "klingon", "-o", str(out)]) == 2
    assert "language='klingon'" in capsys.readouterr().err and not out.exists()
    out = tmp_path / "en.wav"
    assert main([*common, "--prompt-text", "A short prompt.", "--language", "en", "-o", str(out)]) == 0
    assert soundfile.read(out)[0].size > 0


def test_server_passes_language_and_strict_prompt_and_speaks_korean(tts, prompt_wav, monkeypatch):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from cosyjax.server import create_app
    from cosyjax.serving import Engine

    calls = record_llm_inputs(tts, monkeypatch)
    submit = Engine.submit

    def spy_submit(self, **kw):  # the server runs the pipeline on its engine: record and force there too
        calls.append(kw)
        return submit(self, **kw, forced_tokens=FORCED_TOKENS)

    monkeypatch.setattr(Engine, "submit", spy_submit)
    with open(prompt_wav, "rb") as f:
        files = {"prompt_wav": ("p.wav", f.read())}
    with TestClient(create_app(tts)) as client:
        r = client.post("/inference_zero_shot", data={"tts_text": "안녕하세요 123개", "prompt_text": "A short prompt."},
                        files=files)
        assert r.status_code == 200 and len(r.content) > 0, r.text
        assert calls[-1]["prompt_text_ids"] == _ids(tts, PROMPT_TEXT)
        r = client.post("/inference_cross_lingual", data={"tts_text": "Hello.", "language": "en"}, files=files)
        assert r.status_code == 200, r.text
        assert calls[-1]["text_ids"] == _ids(tts, SYSTEM + " Please speak in English." + MARK + "Hello.")
        r = client.post("/inference_instruct2", data={"tts_text": "Hello.", "instruct_text": "Speak fast.",
                                                      "strict_prompt": "true"}, files=files)
        assert r.status_code == 400 and "instruct_text has no" in r.json()["detail"]
