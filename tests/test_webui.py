"""``cosyjax webui`` (cosyjax/webui.py) on the tiny release.

- the page's generate endpoint through ``gradio_client`` (no browser): a 24 kHz wav equal to the same
  pipeline call made directly with the same seed; streamed; errors as the pipeline's message;
  cached voices saved from the page;
- a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium with the system
  chromedriver): upload a prompt, type text, press Generate, fetch the audio element's wav.

Set COSYJAX_WEBUI_SCREENSHOT=docs/webui.png to write the browser test's screenshot there (the
README's picture); otherwise it goes to the test's temporary directory.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import time
import urllib.request

import numpy as np
import pytest

from conftest import TINY_PROMPT_TEXT, TINY_RELEASE, voice_wav_bytes

gr = pytest.importorskip("gradio", reason='the web UI needs gradio: pip install "cosyjax[webui]"')
gradio_client = pytest.importorskip("gradio_client")

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SR = 24000


def wav_header(data: bytes) -> tuple[int, int, int, int]:
    """(channels, sample rate, bits per sample, data bytes) of a RIFF/WAVE file, read from its chunks."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE", data[:16]
    pos, fmt, size = 12, None, None
    while pos + 8 <= len(data):
        cid, n = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if cid == b"fmt ":
            _, channels, rate, _, _, bits = struct.unpack("<HHIIHH", data[pos + 8:pos + 24])
            fmt = (channels, rate, bits)
        elif cid == b"data":
            size = min(n, len(data) - pos - 8)
            break
        pos += 8 + n + (n & 1)
    assert fmt is not None and size is not None, "no fmt/data chunk"
    return (*fmt, size)


def as_pcm16(audio: np.ndarray) -> np.ndarray:
    """``audio`` through the same 16-bit wav encoding the page uses, read back as int16."""
    import soundfile

    from cosyjax.webui import wav_bytes

    return soundfile.read(io.BytesIO(wav_bytes(audio, SR)), dtype="int16")[0]


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("webui-prompt") / "prompt.wav"
    path.write_bytes(voice_wav_bytes())
    return str(path)


@pytest.fixture(scope="module")
def webui(tiny_converted, tmp_path_factory):
    """(pipeline, page URL, spkinfo dir): the page served on 127.0.0.1 over its own CosyVoice3."""
    from cosyjax.pipeline import CosyVoice3
    from cosyjax.webui import build_demo

    tts = CosyVoice3(TINY_RELEASE, converted_dir=tiny_converted, progress=False)
    spk = str(tmp_path_factory.mktemp("webui-spkinfo"))
    demo = build_demo(tts, spkinfo_dir=spk, output_dir=str(tmp_path_factory.mktemp("webui-out")))
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        assert demo.local_url.startswith("http://127.0.0.1:"), demo.local_url
        yield tts, demo.local_url, spk
    finally:
        demo.close()
        tts.engine.shutdown(drain_seconds=5)


@pytest.fixture(scope="module")
def client(webui):
    return gradio_client.Client(webui[1], verbose=False, download_files=True)


ARGS = dict(text="Hello world.", mode="zero-shot", prompt_record=None, prompt_text=TINY_PROMPT_TEXT,
            instruct_text="", source_wav=None, voice="(use the prompt recording)", language="none", seed=7,
            stream=False, speed=1.0)


def generate(client, prompt_wav, **kw):
    args = {**ARGS, "prompt_upload": gradio_client.handle_file(prompt_wav), **kw}
    return client.predict(**args, api_name="/generate")


def test_generate_endpoint_matches_the_pipeline(webui, client, prompt_wav):
    tts, _, _ = webui
    live, player, download, settings = generate(client, prompt_wav, seed=7)
    data = open(download, "rb").read()
    channels, rate, bits, size = wav_header(data)
    assert (channels, rate, bits) == (1, SR, 16) and size > 0
    assert "<audio" in player and os.path.basename(download) in player  # the page plays the downloadable file
    assert settings["seed"] == 7 and settings["mode"] == "zero-shot" and settings["sample_rate"] == SR
    assert settings["seconds"] == pytest.approx(size / 2 / SR, abs=1e-3)

    direct = np.concatenate([np.asarray(o["tts_speech"], np.float32).reshape(-1) for o in
                             tts.inference_zero_shot("Hello world.", TINY_PROMPT_TEXT, prompt_wav, seed=7)])
    import soundfile

    page = soundfile.read(io.BytesIO(data), dtype="int16")[0]
    assert page.size == direct.size > 0
    np.testing.assert_array_equal(page, as_pcm16(direct))


def test_generate_other_modes(webui, client, prompt_wav):
    """Cross-lingual (with a language instruction) and voice conversion equal their direct pipeline calls."""
    tts, _, _ = webui
    import soundfile

    _, _, r, s = generate(client, prompt_wav, mode="cross-lingual", prompt_text="", seed=3, language="en")
    direct = np.concatenate([np.asarray(o["tts_speech"], np.float32).reshape(-1) for o in
                             tts.inference_cross_lingual("Hello world.", prompt_wav, seed=3, language="en")])
    np.testing.assert_array_equal(soundfile.read(r, dtype="int16")[0], as_pcm16(direct))
    assert s["language"] == "en" and s["mode"] == "cross-lingual"

    _, _, r, s = generate(client, prompt_wav, mode="voice conversion", text="",
                          source_wav=gradio_client.handle_file(prompt_wav))
    direct = np.concatenate([np.asarray(o["tts_speech"], np.float32).reshape(-1) for o in
                             tts.inference_vc(prompt_wav, prompt_wav)])
    np.testing.assert_array_equal(soundfile.read(r, dtype="int16")[0], as_pcm16(direct))


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="streamed playback needs ffmpeg (apt-get install ffmpeg)")
def test_generate_streamed(webui, client, prompt_wav):
    tts, _, _ = webui
    import soundfile

    job = client.submit(**{**ARGS, "prompt_upload": gradio_client.handle_file(prompt_wav), "seed": 5, "stream": True},
                        api_name="/generate")
    job.result(timeout=300)
    outputs = job.outputs()
    _, _, result, settings = outputs[-1]
    direct = [np.asarray(o["tts_speech"], np.float32).reshape(-1) for o in
              tts.inference_zero_shot("Hello world.", TINY_PROMPT_TEXT, prompt_wav, seed=5, stream=True)]
    assert settings["stream"] is True and settings["chunks"] == len(direct) >= 2
    # the page keeps what the pipeline streamed (the streamed vocoder's waveform, not the one-shot one)
    np.testing.assert_array_equal(soundfile.read(result, dtype="int16")[0], as_pcm16(np.concatenate(direct)))
    # one streamed update per chunk, as it arrived (Gradio serves them to the player as an HLS playlist)
    streamed = [o[0] for o in outputs[:-1]]
    assert len(streamed) == len(direct) and all(isinstance(p, str) and p.endswith(".m3u8") for p in streamed)


def test_errors_are_the_pipelines_message(client, prompt_wav):
    with pytest.raises(Exception, match="zero-shot needs the prompt text"):
        generate(client, prompt_wav, prompt_text="")
    with pytest.raises(Exception, match="needs a prompt recording"):
        generate(client, prompt_wav, mode="cross-lingual", prompt_upload=None)
    with pytest.raises(Exception, match="tts_text is empty|text to speak is empty"):
        generate(client, prompt_wav, text="   ")
    with pytest.raises(Exception, match="already holds <\\|endofprompt\\|>, so language='en'") as e:
        generate(client, prompt_wav, language="en")  # raised by the pipeline (build_prompt) itself
    assert "Traceback" not in str(e.value) and "File " not in str(e.value)


def test_save_voice_and_use_it(webui, client, prompt_wav):
    tts, _, spk = webui
    import soundfile

    client.predict(name="tiny voice", prompt_upload=gradio_client.handle_file(prompt_wav), prompt_record=None,
                   prompt_text=TINY_PROMPT_TEXT, language="none", api_name="/save_voice")
    assert "tiny voice" in tts.list_available_spks()
    assert sorted(os.listdir(spk)) == ["tiny_voice.json", "tiny_voice.npz"]
    _, _, r, s = generate(client, prompt_wav, voice="tiny voice", prompt_upload=None, prompt_text="", seed=2)
    assert s["voice"] == "tiny voice"
    direct = np.concatenate([np.asarray(o["tts_speech"], np.float32).reshape(-1) for o in
                             tts.inference_zero_shot("Hello world.", "", zero_shot_spk_id="tiny voice", seed=2)])
    np.testing.assert_array_equal(soundfile.read(r, dtype="int16")[0], as_pcm16(direct))
    with pytest.raises(Exception, match="enter a name"):
        client.predict(name=" ", prompt_upload=gradio_client.handle_file(prompt_wav), prompt_record=None,
                       prompt_text=TINY_PROMPT_TEXT, language="none", api_name="/save_voice")


def test_random_seed_button(client):
    seeds = {int(client.predict(api_name="/random_seed")) for _ in range(3)}
    assert all(1 <= s <= 100_000_000 for s in seeds)


def test_request_check_refuses_bad_combinations():
    from cosyjax.webui import Request

    with pytest.raises(ValueError, match="voice conversion needs the source speech"):
        Request(mode="voice conversion", prompt_wav="p.wav").check()
    with pytest.raises(ValueError, match="instruct2 needs an instruction"):
        Request(text="hi", mode="instruct2", prompt_wav="p.wav").check()
    with pytest.raises(ValueError, match="mode 'sft'"):
        Request(text="hi", mode="sft").check()
    req = Request(text="hi", mode="cross-lingual", prompt_wav="p.wav", stream=True, speed=1.5)
    assert any("non-stream" in n for n in req.check()) and req.speed == 1.0


def test_cli_has_webui_command():
    from cosyjax.cli import build_parser

    args = build_parser().parse_args(["webui", "--model-dir", "m", "--port", "8123", "--spkinfo", "v"])
    assert (args.host, args.port, args.share, args.spkinfo, args.converted_dir) == ("127.0.0.1", 8123, False, "v", None)


def test_cli_webui_serves_the_page(tiny_converted, tmp_path):
    """`cosyjax webui` starts, serves the page on 127.0.0.1 and creates --spkinfo; stopped after one fetch."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spk = tmp_path / "voices"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "cosyjax.cli", "webui", "--model-dir", TINY_RELEASE,
                             "--converted-dir", tiny_converted, "--port", str(port), "--spkinfo", str(spk)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        page, deadline = None, time.monotonic() + 180
        while page is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    page = r.read().decode("utf-8", "replace")
            except OSError:
                time.sleep(1)
        assert page is not None, f"no page (exit code {proc.poll()})"
        assert "gradio" in page.lower() and spk.is_dir()
    finally:
        proc.terminate()
        try:
            out = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
    assert "Traceback" not in out, out[-3000:]


# ---------------------------------------------------------------------------------------------- browser
def _browser_missing() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return f"needs {' and '.join(missing)} (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install selenium)"
    return None


@pytest.mark.browser
@pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")
def test_browser_generate(webui, prompt_wav, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    _, url, _ = webui
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1650", "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#prompt-upload input[type=file]")))
        # no prompt yet: the page shows the reason, not a traceback
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: "zero-shot needs a prompt recording" in d.find_element(By.TAG_NAME, "body").text)
        assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text
        upload.send_keys(prompt_wav)
        prompt = driver.find_element(By.CSS_SELECTOR, "#prompt-text textarea")
        prompt.clear()
        prompt.send_keys(TINY_PROMPT_TEXT)
        text = driver.find_element(By.CSS_SELECTOR, "#tts-text textarea")
        text.clear()
        text.send_keys("Hello from the browser.")
        # the upload has landed when the component links the uploaded file
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt-upload a[data-testid=download-link]"))
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        src = WebDriverWait(driver, 240, poll_frequency=1).until(
            lambda d: next((a.get_attribute("src") for a in d.find_elements(By.CSS_SELECTOR, "#result audio")
                            if a.get_attribute("src")), None))
        assert src.startswith(url.rstrip("/")) and src.endswith(".wav"), src  # served by the page on 127.0.0.1
        with urllib.request.urlopen(src, timeout=30) as r:
            data = r.read()
        channels, rate, bits, size = wav_header(data)
        assert (channels, rate, bits) == (1, SR, 16) and size > 0
        time.sleep(1)  # let the player draw its waveform for the picture
        shot = os.environ.get("COSYJAX_WEBUI_SCREENSHOT") or str(tmp_path / "webui.png")
        os.makedirs(os.path.dirname(os.path.abspath(shot)), exist_ok=True)
        assert driver.save_screenshot(shot)
        with open(shot, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()
