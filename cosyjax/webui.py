"""``cosyjax webui``: a Gradio page over :class:`cosyjax.pipeline.CosyVoice3`.

The controls of upstream CosyVoice's ``webui.py`` demo, for CosyVoice3's modes: zero-shot,
cross-lingual, instruct2 and voice conversion; a prompt recording uploaded or recorded with the
microphone; cached voices (``--spkinfo``, written by ``CosyVoice3.save_spkinfo``) and "save this
prompt as a voice"; a seed with a dice button; speed (non-stream only); streamed playback as the
chunks arrive; the result as a 24 kHz 16-bit wav to play or download, with the settings that made it.

Every request is one call of the pipeline's ``inference_*`` method (``CosyVoice3.inference``), with the
pipeline routed through its batching engine (``CosyVoice3.use_engine``), so concurrent visitors share the
device.  Bad input shows the pipeline's own message in the page (``gr.Error``), never a traceback.

Streamed playback needs ``ffmpeg`` on the server (Gradio sends the chunks to the browser as AAC);
without it a streamed request is refused with that message and non-stream requests work as usual.

Needs ``pip install "cosyjax[webui]"`` (gradio).  Start it with ``cosyjax webui --model-dir DIR``;
:func:`build_demo` gives the ``gradio.Blocks`` to embed or launch yourself.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import urllib.parse
import uuid
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)

INSTALL_HINT = 'the web UI needs gradio: pip install "cosyjax[webui]"'
ZERO_SHOT, CROSS_LINGUAL, INSTRUCT2, VC = "zero-shot", "cross-lingual", "instruct2", "voice conversion"
MODES = (ZERO_SHOT, CROSS_LINGUAL, INSTRUCT2, VC)
# The page's mode labels -> CosyVoice3.inference's modes (cosyjax.pipeline.MODES).
PIPELINE_MODES = {ZERO_SHOT: "zero_shot", CROSS_LINGUAL: "cross_lingual", INSTRUCT2: "instruct2", VC: "vc"}
# The numbered steps shown beside the mode choice (upstream's demo shows one such text per mode).
STEPS = {
    ZERO_SHOT: "1. Upload a prompt recording or record one with the microphone (at most 30 s; when both are "
               "given, the uploaded file is used), or choose a cached voice.\n"
               "2. Enter the prompt text: the transcript of the prompt recording.\n"
               "3. Press Generate.",
    CROSS_LINGUAL: "1. Upload a prompt recording or record one with the microphone (at most 30 s; when both are "
                   "given, the uploaded file is used), or choose a cached voice.\n"
                   "2. Press Generate. The text to speak is usually in another language than the prompt.",
    INSTRUCT2: "1. Upload a prompt recording or record one with the microphone, or choose a cached voice.\n"
               "2. Enter the instruction, e.g. \"Please speak as fast as you can.\"\n"
               "3. Press Generate.",
    VC: "1. Upload a prompt recording or record one with the microphone: the voice to speak in.\n"
        "2. Upload the source speech: what is said.\n"
        "3. Press Generate (the text box is not used).",
}
NO_VOICE = "(use the prompt recording)"
NO_LANGUAGE = "none"
MAX_SEED = 100_000_000
DEFAULT_TEXT = "Hello! This is CosyVoice 3 running on JAX, speaking in the voice of your prompt."
OUTPUT_MAX_AGE_S = 3600.0  # the wavs this page wrote are removed after an hour


def _gradio():
    try:
        import gradio
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return gradio


@dataclasses.dataclass
class Request:
    """What one press of Generate asks for (the page's inputs, checked by :meth:`check`)."""

    text: str = ""
    mode: str = ZERO_SHOT
    prompt_wav: str | None = None
    prompt_text: str = ""
    instruct_text: str = ""
    source_wav: str | None = None
    voice: str = ""  # a cached voice id; "" = use prompt_wav
    language: str | None = None
    seed: int = 0
    stream: bool = False
    speed: float = 1.0

    def check(self) -> list[str]:
        """Refuse combinations the page cannot run (``ValueError``); returns notes on inputs that are ignored."""
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if not (isinstance(self.seed, int) and 0 <= self.seed <= 2**32 - 1):
            raise ValueError(f"seed {self.seed!r}: expected a whole number from 0 to {2**32 - 1}")
        if not (self.speed > 0 and np.isfinite(self.speed)):
            raise ValueError(f"speed {self.speed!r}: expected a positive number")
        notes = []
        if self.stream and self.speed != 1.0:
            notes.append(f"speed {self.speed:g} applies to non-stream synthesis only: streaming at speed 1")
            self.speed = 1.0
        if self.mode == VC:
            if self.voice:
                raise ValueError("voice conversion needs a prompt recording: cached voices hold no audio to convert "
                                 "with; choose the prompt recording instead of a cached voice")
            if self.prompt_wav is None:
                raise ValueError("voice conversion needs a prompt recording (the voice to speak in): upload or "
                                 "record one")
            if self.source_wav is None:
                raise ValueError("voice conversion needs the source speech: upload it under 'Source speech'")
            if self.language:
                notes.append("the language instruction is not used in voice conversion")
            return notes
        if not self.text.strip():
            raise ValueError("the text to speak is empty")
        if self.voice:
            if self.prompt_wav is not None:
                notes.append(f"using the cached voice {self.voice!r}: the prompt recording is ignored")
            if self.mode == ZERO_SHOT and self.prompt_text.strip():
                notes.append(f"using the cached voice {self.voice!r} and its own prompt text: the prompt text "
                             "box is ignored")
        elif self.prompt_wav is None:
            raise ValueError(f"{self.mode} needs a prompt recording: upload or record one, or choose a cached voice")
        if self.mode == ZERO_SHOT and not self.voice and not self.prompt_text.strip():
            raise ValueError("zero-shot needs the prompt text: the transcript of the prompt recording "
                             "(or use cross-lingual, which needs none)")
        if self.mode == INSTRUCT2 and not self.instruct_text.strip():
            raise ValueError("instruct2 needs an instruction, e.g. \"Please speak as fast as you can.\"")
        return notes

    def run(self, tts: Any) -> Iterator[dict[str, np.ndarray]]:
        """The pipeline call for this request (after :meth:`check`): ``CosyVoice3.inference`` with the
        inputs this mode takes (the page's other boxes are ignored, see :meth:`check`'s notes)."""
        from cosyjax.pipeline import MODE_ARGUMENTS

        mode = PIPELINE_MODES[self.mode]
        fields = dict(tts_text=self.text, prompt_text=self.prompt_text, instruct_text=self.instruct_text,
                      prompt_wav=None if self.voice else self.prompt_wav, source_wav=self.source_wav,
                      zero_shot_spk_id=self.voice, stream=self.stream, speed=self.speed, seed=self.seed,
                      language=self.language)
        return tts.inference(mode, **{k: v for k, v in fields.items() if k in MODE_ARGUMENTS[mode]})

    def settings(self) -> dict[str, Any]:
        """The settings shown with the result (enough to make the same audio again)."""
        out: dict[str, Any] = {"mode": self.mode, "seed": self.seed, "stream": self.stream, "speed": self.speed}
        if self.mode != VC:
            out["voice"] = self.voice or "prompt recording"
            out["language"] = self.language or NO_LANGUAGE
        if self.mode == INSTRUCT2:
            out["instruction"] = self.instruct_text
        return out


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """``audio`` (float32, [-1, 1]) as a 16-bit PCM wav file: the samples of the HTTP API's PCM and of
    ``cosyjax tts``'s wav (``cosyjax.serving.pcm.pcm16``, truncated toward zero as upstream)."""
    from cosyjax.serving.pcm import wav16_bytes

    return wav16_bytes(audio, sample_rate)


def player_html(path: str | None, autoplay: bool = False) -> str:
    """The result player: an ``<audio>`` element on the wav at ``path`` (served by Gradio's file route)."""
    if path is None:
        return '<p class="cosyjax-result">The result plays here.</p>'
    src = html.escape("gradio_api/file=" + urllib.parse.quote(os.path.abspath(path)), quote=True)
    return (f'<audio class="cosyjax-result" controls preload="auto"{" autoplay" if autoplay else ""} src="{src}" '
            'style="width: 100%"></audio>')


def error_message(e: BaseException) -> str:
    """The one line the page shows for a failed request: the pipeline's own message."""
    from cosyjax.serving import QueueFull

    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, QueueFull):
        return f"the server is busy: {e} (retry in {e.retry_after:.0f} s)"
    text = str(e) or type(e).__name__
    if isinstance(e, (ValueError, TypeError, FileNotFoundError)):
        return text
    return f"synthesis failed ({type(e).__name__}): {text}"


class _WarningCapture(logging.Handler):
    """Collects the cosyjax warnings logged on this thread (e.g. "prompt_text has no <|endofprompt|>"),
    to show them in the page of the request that caused them."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())

    def __enter__(self) -> "_WarningCapture":
        logging.getLogger("cosyjax").addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("cosyjax").removeHandler(self)


def _remove_old_files(directory: str, max_age_s: float = OUTPUT_MAX_AGE_S) -> None:
    cutoff = time.time() - max_age_s
    for entry in os.scandir(directory):
        try:
            if entry.is_file() and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
        except OSError:
            pass


def build_demo(tts: Any, spkinfo_dir: str | None = None, *, output_dir: str | None = None,
               max_pending: int = 16, concurrency: int = 4) -> Any:
    """The page, as a ``gradio.Blocks`` with its queue set up (``.launch()`` it, or mount it).

    Args:
      tts: a ``CosyVoice3``; its requests go through its batching engine from now on (``use_engine``).
      spkinfo_dir: a directory written by ``CosyVoice3.save_spkinfo``: its voices are loaded and
        offered as cached voices, and voices saved from the page are written there (without it they
        live only as long as the process).
      output_dir: where the result wavs are written (default: a new temporary directory); files
        older than an hour are removed as new ones are written.
      max_pending: requests waiting in the page's queue before new ones are refused.
      concurrency: requests handed to the engine at once (it batches them on the device).
    Raises:
      ImportError: gradio is not installed (with the pip command).
    """
    gr = _gradio()
    if spkinfo_dir and os.path.isdir(spkinfo_dir):
        tts.load_spkinfo(spkinfo_dir)
    tts.use_engine()
    out_dir = os.path.abspath(output_dir or tempfile.mkdtemp(prefix="cosyjax-webui-"))
    os.makedirs(out_dir, exist_ok=True)
    gr.set_static_paths([out_dir])  # the page's <audio> plays the wavs from there
    sample_rate = int(tts.sample_rate)
    from cosyjax.pipeline import LANGUAGE_INSTRUCTIONS

    def voices() -> list[str]:
        return [NO_VOICE] + sorted(tts.list_available_spks())

    def generate(text, mode, prompt_upload, prompt_record, prompt_text, instruct_text, source_wav, voice,
                 language, seed, stream, speed):
        req = Request(text=text or "", mode=mode, prompt_wav=prompt_upload or prompt_record,
                      prompt_text=prompt_text or "", instruct_text=instruct_text or "", source_wav=source_wav,
                      voice="" if voice in (None, "", NO_VOICE) else voice,
                      language=None if language in (None, "", NO_LANGUAGE) else language,
                      seed=int(seed) if seed is not None and float(seed).is_integer() else seed,
                      stream=bool(stream), speed=float(speed if speed is not None else 1.0))
        try:
            for note in req.check():
                gr.Info(note)
            if req.stream and shutil.which("ffmpeg") is None:
                raise ValueError("streamed playback needs ffmpeg on the server (Gradio sends the chunks as AAC): "
                                 "install it (apt-get install ffmpeg) or turn streaming off")
            start = time.perf_counter()
            with _WarningCapture() as warned:  # the prompt is built and extracted at the call and first chunk
                chunks = req.run(tts)
                first = next(chunks, None)
            for message in warned.messages:
                gr.Warning(message)
            audio, first_s = [], None
            for out in itertools.chain([] if first is None else [first], chunks):
                piece = np.asarray(out["tts_speech"], np.float32).reshape(-1)
                audio.append(piece)
                first_s = time.perf_counter() - start if first_s is None else first_s
                if req.stream:
                    yield wav_bytes(piece, sample_rate), gr.skip(), gr.skip(), gr.skip()
            elapsed = time.perf_counter() - start
            n_chunks = len(audio)
            audio = np.concatenate(audio) if audio else np.zeros(0, np.float32)
            if audio.size == 0:
                raise ValueError("the model produced no audio for this input (it stopped at once); try another "
                                 "seed or text")
        except gr.Error:
            raise
        except Exception as e:  # the pipeline's message in the page; the traceback only in the server's log
            if not isinstance(e, (ValueError, KeyError, TypeError, FileNotFoundError)):
                log.exception("webui request failed")
            raise gr.Error(error_message(e), print_exception=False) from None
        _remove_old_files(out_dir)
        path = os.path.join(out_dir, f"cosyjax-{req.mode.replace(' ', '-')}-seed{req.seed}-{uuid.uuid4().hex[:8]}.wav")
        with open(path, "wb") as f:
            f.write(wav_bytes(audio, sample_rate))
        settings = {**req.settings(), "sample_rate": sample_rate, "seconds": round(audio.size / sample_rate, 3),
                    "chunks": n_chunks, "first_chunk_s": round(first_s, 3), "elapsed_s": round(elapsed, 3)}
        yield gr.skip() if req.stream else None, player_html(path, autoplay=not req.stream), path, settings

    def save_voice(name, prompt_upload, prompt_record, prompt_text, language):
        name = (name or "").strip()
        wav = prompt_upload or prompt_record
        try:
            if not name:
                raise ValueError("enter a name for the voice")
            if name == NO_VOICE:
                raise ValueError(f"{name!r} is reserved: choose another name")
            if wav is None:
                raise ValueError("upload or record the prompt recording to save")
            tts.add_zero_shot_spk(prompt_text or "", wav, name,
                                  language=None if language in (None, "", NO_LANGUAGE) else language)
            where = tts.save_spkinfo(spkinfo_dir) if spkinfo_dir else None
        except Exception as e:
            raise gr.Error(error_message(e), print_exception=False) from None
        gr.Info(f"saved voice {name!r}" + (f" to {where}" if where else " (until the server stops: start it with "
                                                                          "--spkinfo DIR to keep voices)"))
        return gr.update(choices=voices(), value=name)

    def on_mode(mode):
        return (STEPS.get(mode, ""), gr.update(visible=mode == ZERO_SHOT), gr.update(visible=mode == INSTRUCT2),
                gr.update(visible=mode == VC))

    languages = [("none", NO_LANGUAGE)] + [(f"{code}: {sentence}", code) for code, sentence in
                                           LANGUAGE_INSTRUCTIONS.items()]
    with gr.Blocks(title="cosyjax: CosyVoice3 on JAX", analytics_enabled=False) as demo:
        gr.Markdown("## cosyjax: Fun-CosyVoice3 on JAX\nType the text to speak, choose a mode and follow its steps.")
        text = gr.Textbox(label="Text to speak", lines=2, value=DEFAULT_TEXT, elem_id="tts-text")
        with gr.Row():
            mode = gr.Radio(choices=list(MODES), value=ZERO_SHOT, label="Mode", elem_id="mode")
            steps = gr.Textbox(label="Steps", value=STEPS[ZERO_SHOT], lines=3, interactive=False, scale=2)
        with gr.Row():
            voice = gr.Dropdown(choices=voices(), value=NO_VOICE, label="Cached voice", elem_id="voice")
            language = gr.Dropdown(choices=languages, value=NO_LANGUAGE, elem_id="language",
                                   label="Language instruction (added when a prompt has no <|endofprompt|>)")
        with gr.Row():
            prompt_upload = gr.Audio(sources=["upload"], type="filepath", elem_id="prompt-upload",
                                     label="Prompt recording (file; at least 16 kHz, at most 30 s)")
            prompt_record = gr.Audio(sources=["microphone"], type="filepath", elem_id="prompt-record",
                                     label="Prompt recording (microphone)")
        prompt_text = gr.Textbox(label="Prompt text", lines=1, elem_id="prompt-text",
                                 placeholder="the transcript of the prompt recording")
        instruct_text = gr.Textbox(label="Instruction", lines=1, visible=False, elem_id="instruct-text",
                                   placeholder="e.g. Please speak as fast as you can.")
        source_wav = gr.Audio(sources=["upload"], type="filepath", label="Source speech (voice conversion)",
                              visible=False, elem_id="source-wav")
        with gr.Row():
            with gr.Column(scale=1, min_width=120):
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=2**32 - 1, label="Seed", elem_id="seed")
                dice = gr.Button("\U0001F3B2 random seed", size="sm", elem_id="dice")
            speed = gr.Slider(0.5, 2.0, value=1.0, step=0.1, label="Speed (non-stream only)", elem_id="speed")
            stream = gr.Checkbox(value=False, label="Stream (play the chunks as they arrive)", elem_id="stream")
        with gr.Accordion("Save this prompt as a voice", open=False):
            with gr.Row():
                voice_name = gr.Textbox(label="Voice name", lines=1, elem_id="voice-name", scale=3)
                save = gr.Button("Save voice", elem_id="save-voice", scale=1)
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        live = gr.Audio(label="Streaming", streaming=True, autoplay=True, interactive=False, visible=False,
                        elem_id="live")
        with gr.Row():
            with gr.Column():
                # the browser's own player on the wav (gradio 6.17's gr.Audio without its waveform view
                # leaves its <audio> element empty)
                result = gr.HTML(player_html(None), label="Result", elem_id="result", padding=True)
                download = gr.File(label="Result: 24 kHz wav", interactive=False, elem_id="download")
            used = gr.JSON(label="Settings used", elem_id="settings")

        dice.click(lambda: random.randint(1, MAX_SEED), outputs=seed, api_name="random_seed")
        mode.change(on_mode, inputs=mode, outputs=[steps, prompt_text, instruct_text, source_wav], api_name=False)
        stream.change(lambda s: gr.update(visible=bool(s)), inputs=stream, outputs=live, api_name=False)
        button.click(generate, inputs=[text, mode, prompt_upload, prompt_record, prompt_text, instruct_text,
                                       source_wav, voice, language, seed, stream, speed],
                     outputs=[live, result, download, used], api_name="generate")
        save.click(save_voice, inputs=[voice_name, prompt_upload, prompt_record, prompt_text, language],
                   outputs=voice, api_name="save_voice")
    demo.queue(max_size=max_pending, default_concurrency_limit=concurrency)
    return demo


def main(model_dir: str, *, converted_dir: str | None = None, host: str = "127.0.0.1", port: int = 8000,
         share: bool = False, spkinfo: str | None = None, dtype: str = "auto", backend: str | None = None,
         llm_file: str = "llm.pt") -> int:
    """Load the model, build the page and serve it until interrupted (``cosyjax webui``)."""
    _gradio()  # fail before loading the model
    from cosyjax.pipeline import CosyVoice3

    tts = CosyVoice3.from_pretrained(model_dir, dtype=dtype, backend=backend, converted_dir=converted_dir,
                                     llm_file=llm_file)
    if spkinfo and not os.path.isdir(spkinfo):
        os.makedirs(spkinfo)  # voices saved from the page go here
    demo = build_demo(tts, spkinfo_dir=spkinfo)
    print(f"cached voices: {', '.join(tts.list_available_spks()) or '(none)'}")
    try:
        demo.launch(server_name=host, server_port=port, share=share, show_error=True)
    finally:
        if tts.engine is not None:
            tts.engine.shutdown()
    return 0


if __name__ == "__main__":
    import sys

    from cosyjax.cli import main as cli_main

    sys.exit(cli_main(["webui", *sys.argv[1:]]))
