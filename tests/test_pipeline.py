"""End to end on the committed tiny release: the four modes, streaming, the CLI, the speaker cache, bad input."""

from __future__ import annotations

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


def test_speaker_cache_round_trip(tts, prompt_wav, tmp_path):
    assert tts.add_zero_shot_spk(PROMPT_TEXT, prompt_wav, "alice")
    direct = np.concatenate(_audio(tts.inference_zero_shot("Hello.", PROMPT_TEXT, prompt_wav, seed=1)), axis=1)
    cached = np.concatenate(_audio(tts.inference_zero_shot("Hello.", "", zero_shot_spk_id="alice", seed=1)), axis=1)
    np.testing.assert_array_equal(direct, cached)
    tts.save_spkinfo(str(tmp_path / "voices"))
    tts.spk2info.clear()
    assert tts.load_spkinfo(str(tmp_path / "voices")) == ["alice"]
    again = np.concatenate(_audio(tts.inference_zero_shot("Hello.", "", zero_shot_spk_id="alice", seed=1)), axis=1)
    np.testing.assert_array_equal(direct, again)


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
