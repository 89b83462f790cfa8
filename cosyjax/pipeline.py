"""Text (+ a prompt recording) in, 24 kHz speech out: the user-facing ``CosyVoice3``.

Same method names and generator contract as upstream's ``cosyvoice.cli.cosyvoice.CosyVoice3``, so
switching is one line::

    from cosyjax import CosyVoice3
    tts = CosyVoice3.from_pretrained("FunAudioLLM/Fun-CosyVoice3-0.5B-2512")   # or a local release dir
    for out in tts.inference_zero_shot("Hello world.", "You are a helpful assistant.<|endofprompt|>"
                                       "Transcript of the prompt.", "prompt.wav"):
        audio = out["tts_speech"]                                            # float32 [1, samples]

Each text segment (upstream's normalisation and splitting) is one ``CosyVoice3Model.tts`` run with
its own yield(s).  Randomness: ``seed`` makes one PRNG key per call; segment ``i`` uses
``fold_in(key, i)``, so output does not depend on streaming or on how requests are batched.

Differences from upstream, on purpose:
- ``inference_instruct2`` with a cached speaker (``zero_shot_spk_id``) uses the *given* instruction;
  upstream's ``frontend_instruct2`` takes the cached input, whose prompt text is the zero-shot
  transcript, and silently drops the instruction.
- The speaker cache stores numpy prompt features (``PromptFeatures``) in a directory of ``.npz``
  files instead of a pickled ``spk2info.pt``.
- A prompt without ``<|endofprompt|>`` (zero-shot ``prompt_text``, cross-lingual ``tts_text``,
  instruct2 ``instruct_text``) gets CosyVoice3's prompt built around it, with a warning
  (:func:`build_prompt`); upstream's LLM asserts instead, which ``strict=True`` reproduces as a
  ``ValueError``.  ``language=`` adds a language instruction to that prompt.  A cross-lingual text
  without the marker is normalised and split first and each segment gets the prompt; upstream skips
  its text frontend for any text holding the marker, so a text written with the marker is passed
  whole and unnormalised, here as upstream.
- A prompt recording shorter than ``MIN_PROMPT_SECONDS`` gets a warning.
- ``tts_text`` must be a str: upstream's text-in streaming (a generator of text pieces, run through
  ``Qwen2LM.inference_bistream``) is refused with a ``TypeError``.
"""

from __future__ import annotations

import json
import logging
import inspect
import os
import re
import tempfile
from typing import Any, Iterator, Literal

import jax
import numpy as np

from cosyjax.checkpoint import CONVERTED_SUBDIR, CheckpointError, load_converted
from cosyjax.config import QWEN_DIR, load_model_config
from cosyjax.precision import PrecisionPolicy
from cosyjax.request import Trace
from cosyjax.frontend.tokenizer import ENDOFPROMPT

DEFAULT_HUB_ID = "FunAudioLLM/Fun-CosyVoice3-0.5B-2512"
SPEECH_TOKENIZER = "speech_tokenizer_v3.onnx"
SPEAKER_ENCODER = "campplus.onnx"
FRONTENDS = ("onnx", "jax")  # where the prompt's speech tokenizer and speaker encoder run
# The modes of CosyVoice3.inference, each the inference_<mode> method it calls.
MODES = ("zero_shot", "cross_lingual", "instruct2", "vc")
# The system prompt of every CosyVoice3 prompt in upstream's examples and instruct_list.
SYSTEM_PROMPT = "You are a helpful assistant."
# Shorter prompt recordings hold a handful of speech tokens (25 Hz): too little voice to clone.
MIN_PROMPT_SECONDS = 1.0
# language= -> the sentence added after the system prompt.  Cantonese's is upstream's own
# (cosyvoice/utils/common.py instruct_list); upstream ships no instruction for the other languages,
# so those sentences are ours, in the form "Please speak in <Language>.".
LANGUAGE_INSTRUCTIONS = {
    "zh": "Please speak in Chinese.", "en": "Please speak in English.", "ja": "Please speak in Japanese.",
    "ko": "Please speak in Korean.", "de": "Please speak in German.", "es": "Please speak in Spanish.",
    "fr": "Please speak in French.", "it": "Please speak in Italian.", "ru": "Please speak in Russian.",
    "yue": "请用广东话表达。",
}
LANGUAGE_NAMES = {"chinese": "zh", "mandarin": "zh", "english": "en", "japanese": "ja", "korean": "ko",
                  "german": "de", "spanish": "es", "french": "fr", "italian": "it", "russian": "ru",
                  "cantonese": "yue"}

log = logging.getLogger(__name__)


def language_instruction(language: str) -> str:
    """The instruction sentence for a language code or English name (``"en"``, ``"English"``, ``"yue"``)."""
    key = str(language).strip().lower()
    key = LANGUAGE_NAMES.get(key, key)
    if key not in LANGUAGE_INSTRUCTIONS:
        raise ValueError(f"language={language!r}: expected one of {', '.join(LANGUAGE_INSTRUCTIONS)} "
                         f"(or {', '.join(LANGUAGE_NAMES)})")
    return LANGUAGE_INSTRUCTIONS[key]


def build_prompt(text: str, field: str, *, kind: Literal["transcript", "instruction"] = "transcript",
                 language: str | None = None, strict: bool = False, has_marker: bool | None = None) -> str:
    """``text`` in CosyVoice3's prompt format, which puts ``<|endofprompt|>`` after an instruction.

    Args:
      text: a transcript or tts text (``kind="transcript"``) or an instruction (``kind="instruction"``).
      field: the argument's name, for messages.
      language: a code or name of ``LANGUAGE_INSTRUCTIONS``: add that instruction to the built prompt.
      strict: refuse a prompt without the marker, as upstream does (its LLM asserts it).
      has_marker: whether the LLM input already holds the marker (default: ``<|endofprompt|>`` in
        ``text``; upstream accepts it anywhere in prompt text + tts text).
    Returns:
      ``text`` unchanged when it has the marker; else a transcript becomes
      ``"You are a helpful assistant.<|endofprompt|>" + text`` and an instruction
      ``"You are a helpful assistant. " + text + "<|endofprompt|>"`` (upstream's instruct_list form; a
      leading system prompt is not doubled), with ``" " + language_instruction(language)`` after the
      system prompt.  Filling in a missing marker logs a warning naming the inserted text.
    Raises:
      ValueError: the marker is missing and ``strict``; or ``language`` is given but the text already
        has the marker (the prompt is then the caller's); or an unknown language.
    """
    has_marker = ENDOFPROMPT in text if has_marker is None else has_marker
    if has_marker:
        if language:
            raise ValueError(f"{field} already holds {ENDOFPROMPT}, so language={language!r} has nowhere to go: "
                             f"pass {field} without the marker (language= builds the prompt) or write the "
                             "instruction into it yourself")
        return text
    if strict:
        raise ValueError(f"{field} has no {ENDOFPROMPT}: CosyVoice3 expects e.g. "
                         f"{SYSTEM_PROMPT + ENDOFPROMPT + 'transcript'!r} (upstream refuses such input; "
                         "without strict the prompt is built for you)")
    head = [SYSTEM_PROMPT] + ([language_instruction(language)] if language else [])
    if kind == "instruction":
        body = text.strip()
        body = body[len(SYSTEM_PROMPT):].strip() if body.startswith(SYSTEM_PROMPT) else body
        built = " ".join(head + ([body] if body else [])) + ENDOFPROMPT
    else:
        built = " ".join(head) + ENDOFPROMPT + text
    if language:
        log.info("%s: using the CosyVoice3 prompt %r", field, built)
    elif kind == "transcript":
        log.warning("%s has no %s, which CosyVoice3 needs: inserted %r before it (strict=True refuses instead; "
                    "language= adds a language instruction)", field, ENDOFPROMPT, built[:len(built) - len(text)])
    else:
        log.warning("%s has no %s, which CosyVoice3 needs: using %r (strict=True refuses instead; language= "
                    "adds a language instruction)", field, ENDOFPROMPT, built)
    return built


class HubError(RuntimeError):
    """The model could not be fetched from the Hugging Face Hub (offline, unknown id, ...)."""


def resolve_model_dir(model_dir_or_hub_id: str, *, cache_dir: str | None = None) -> str:
    """A local release directory for a path or a Hub id (downloaded once, then cached by huggingface_hub).

    Raises:
      FileNotFoundError: a path that does not exist.
      HubError: a Hub id that cannot be downloaded (offline, unknown), with how to pass a local dir.
    """
    path = os.path.expanduser(model_dir_or_hub_id)
    if os.path.isdir(path):
        return path
    if path.startswith((".", "/", "~")) or os.sep in path.strip("/").replace("/", "", 1) or path.count("/") != 1:
        raise FileNotFoundError(f"{model_dir_or_hub_id}: model directory not found (and not a Hub id 'owner/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise HubError(f"downloading {model_dir_or_hub_id} needs huggingface_hub (pip install huggingface_hub), "
                       "or pass a local release directory") from e
    try:
        return snapshot_download(model_dir_or_hub_id, cache_dir=cache_dir)
    except Exception as e:  # offline, DNS, 401/404: one clear message
        raise HubError(
            f"cannot download {model_dir_or_hub_id} from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'}). On a machine with internet run "
            f"`huggingface-cli download {model_dir_or_hub_id} --local-dir DIR`, copy DIR here and pass "
            "it as the model directory (cosyjax tts --model-dir DIR, CosyVoice3.from_pretrained(DIR)).") from None


def _source_fingerprint(model_dir: str, names: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for name in names:
        p = os.path.join(model_dir, name)
        if os.path.exists(p):
            st = os.stat(p)
            out[name] = [st.st_size, int(st.st_mtime)]
    return out


def _writable(directory: str) -> bool:
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _cache_candidates(model_dir: str, variant: str) -> list[str]:
    """Where a converted copy of ``model_dir`` lives: next to the release, else under ~/.cache/cosyjax."""
    key = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.abspath(model_dir).strip("/"))
    return [os.path.join(model_dir, CONVERTED_SUBDIR, variant),
            os.path.join(os.path.expanduser("~/.cache/cosyjax"), key, variant)]


def ensure_frontend_converted(model_dir: str) -> str:
    """Path of the converted prompt-frontend models of ``model_dir`` (``<model_dir>/.cosyjax/frontend``),
    converting ``speech_tokenizer_v3.onnx`` and ``campplus.onnx`` on first use (needs the ``onnx``
    package then, never onnxruntime); rebuilt when the files' sizes or times change.

    Raises:
      ConversionError: a file that is not the released architecture (the message names it).
    """
    from cosyjax.frontend.jax_models import FrontendCheckpointError, read_frontend_meta

    fingerprint = _source_fingerprint(model_dir, (SPEECH_TOKENIZER, SPEAKER_ENCODER))
    candidates = _cache_candidates(model_dir, "frontend")
    for out in candidates:
        try:
            if read_frontend_meta(out).get("source", {}).get("fingerprint") == fingerprint:
                return out
        except FrontendCheckpointError:
            continue
    target = next((c for c in candidates if _writable(os.path.dirname(c))), None)
    if target is None:
        raise CheckpointError(f"no writable place for the converted frontend of {model_dir}; convert it with "
                              "cosyjax.convert.frontend.convert_frontend_to_dir and pass frontend_dir")
    from cosyjax.convert.frontend import convert_frontend_to_dir

    log.info("converting the frontend ONNX models of %s to %s (first use)", model_dir, target)
    return convert_frontend_to_dir(model_dir, target, overwrite=True, source={"fingerprint": fingerprint})


def ensure_converted(model_dir: str, dtype: str = "float32", *, llm_file: str = "llm.pt",
                     progress: bool = True) -> str:
    """Path of a converted copy of ``model_dir``, converting on first use.

    The cache lives next to the release (``<model_dir>/.cosyjax/<dtype>``, ``<dtype>-llm.rl`` for
    ``llm_file="llm.rl.pt"``) or, if that is read-only, under ``~/.cache/cosyjax``.  It is rebuilt
    when the source files' sizes or times change.
    """
    from cosyjax.convert import stage_files  # validates llm_file (the converter needs torch only to run)

    stage_files(llm_file)
    fingerprint = _source_fingerprint(model_dir, ("cosyvoice3.yaml", llm_file, "flow.pt", "hift.pt",
                                                  os.path.join(QWEN_DIR, "config.json")))
    variant = dtype if llm_file == "llm.pt" else f"{dtype}-{llm_file[:-len('.pt')]}"
    candidates = _cache_candidates(model_dir, variant)
    for out in candidates:
        cfg = os.path.join(out, "config.json")
        if os.path.isfile(cfg):
            with open(cfg, encoding="utf-8") as f:
                if json.load(f).get("source", {}).get("fingerprint") == fingerprint:
                    return out
    target = next((c for c in candidates if _writable(os.path.dirname(c))), None)
    if target is None:
        raise CheckpointError(f"no writable place for the converted model of {model_dir}; run "
                              "`cosyjax convert --model-dir ... --out DIR` and pass DIR as converted_dir")
    try:
        from cosyjax.convert import convert_model
    except ImportError as e:
        raise CheckpointError(f"{model_dir} is not converted yet and converting needs torch: pip install "
                              "'cosyjax[convert]' (or convert elsewhere with `cosyjax convert` and pass "
                              "converted_dir)") from e
    from cosyjax.checkpoint import save_converted

    log.info("converting %s to %s (first use)", model_dir, target)
    model = convert_model(model_dir, dtype=dtype, llm_file=llm_file, progress=progress)
    model = type(model)(config=model.config, params=model.params, buffers=model.buffers, dtype=model.dtype,
                        source={**model.source, "fingerprint": fingerprint})
    return save_converted(target, model, overwrite=True)


class CosyVoice3:
    """Fun-CosyVoice3 text-to-speech on JAX.

    Args:
      model_dir: a release directory (cosyvoice3.yaml, llm/flow/hift.pt, CosyVoice-BlankEN/,
        campplus.onnx, speech_tokenizer_v3.onnx).
      dtype: the precision policy for the whole pipeline (``cosyjax.precision``): "float32" (upstream's
        numerics), "bfloat16" (every stage's matmuls/convs in bf16, float32 accumulation) or "auto"
        (float32 on CPU, bf16 on GPU/TPU).  The release is converted (and cached) in float32 once;
        the model casts each stage to its compute dtype when it loads.
      converted_dir: an existing ``cosyjax convert`` output; default: convert on first use and cache.
      llm_file: the LLM checkpoint converted on first use: "llm.pt" (upstream's choice) or the
        release's RL-tuned "llm.rl.pt" (ignored with ``converted_dir``, which holds what it was made from).
      backend: JAX platform to run on ("cpu", "gpu", "tpu"); default: JAX's default.
      frontend: where the prompt's speech tokenizer and speaker encoder run: "onnx" (onnxruntime, as
        upstream; the default) or "jax" (the Flax ports, converted from the release's ONNX files on
        first use; no onnxruntime is imported).
      frontend_dir: an existing converted frontend (``convert_frontend_to_dir``) for ``frontend="jax"``.
      onnx_providers: onnxruntime providers for the prompt feature models (``frontend="onnx"``).
      progress: progress bars (first-use conversion, texts of several segments).
      model_options: passed to ``CosyVoice3Model`` (sampler, upstream quirk switches, ...).
    """

    def __init__(self, model_dir: str, *, dtype: str = "auto", converted_dir: str | None = None,
                 llm_file: str = "llm.pt", backend: str | None = None, frontend: str = "onnx",
                 frontend_dir: str | None = None, onnx_providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 progress: bool = True, **model_options: Any):
        from cosyjax.frontend import CosyVoice3Tokenizer, TextNormalizer
        from cosyjax.model import CosyVoice3Model

        if frontend not in FRONTENDS:
            raise ValueError(f"frontend={frontend!r}: expected one of {', '.join(FRONTENDS)}")

        self.model_dir = model_dir
        self.config = load_model_config(model_dir)
        self.sample_rate = self.config.sample_rate
        # local: in a multi-process run jax.devices()[0] belongs to process 0
        self.device = jax.local_devices(backend=backend)[0]
        self.tokenizer = CosyVoice3Tokenizer(os.path.join(model_dir, QWEN_DIR))
        self.tokenizer.check_release(self.config.llm.vocab_size)
        self.normalizer = TextNormalizer(self.tokenizer.encode)
        for name in (SPEECH_TOKENIZER, SPEAKER_ENCODER):
            if not os.path.isfile(os.path.join(model_dir, name)):
                raise FileNotFoundError(f"{os.path.join(model_dir, name)}: missing (a release directory holds it)")
        if frontend == "jax":
            from cosyjax.frontend.jax_models import load_frontend

            self.speech_tokenizer, self.speaker_encoder = load_frontend(
                frontend_dir or ensure_frontend_converted(model_dir), device=self.device)
        else:
            from cosyjax.frontend import SpeakerEncoderONNX, SpeechTokenizerONNX

            self.speech_tokenizer = SpeechTokenizerONNX(os.path.join(model_dir, SPEECH_TOKENIZER),
                                                        providers=onnx_providers)
            self.speaker_encoder = SpeakerEncoderONNX(os.path.join(model_dir, SPEAKER_ENCODER),
                                                      providers=onnx_providers)
        converted = load_converted(converted_dir or ensure_converted(model_dir, "float32", llm_file=llm_file,
                                                                     progress=progress))
        with jax.default_device(self.device):
            self.model = CosyVoice3Model(converted, PrecisionPolicy.resolve(dtype, self.device.platform),
                                         **model_options)
        self.spk2info: dict[str, Any] = {}
        self.engine = None  # a cosyjax.serving.Engine once use_engine() starts one
        self.progress = progress

    @classmethod
    def from_pretrained(cls, model_dir_or_hub_id: str = DEFAULT_HUB_ID, *, dtype: str = "auto",
                        backend: str | None = None, cache_dir: str | None = None, **kwargs: Any) -> "CosyVoice3":
        """Load a local release directory or download a Hub id (``FunAudioLLM/Fun-CosyVoice3-0.5B-2512``)."""
        return cls(resolve_model_dir(model_dir_or_hub_id, cache_dir=cache_dir), dtype=dtype, backend=backend,
                   **kwargs)

    # ------------------------------------------------------------------ frontend
    @staticmethod
    def _check_tts_text(text: Any) -> None:
        if not isinstance(text, str):
            # Upstream streams a generator of text pieces through Qwen2LM.inference_bistream; that decode
            # (text interleaved 5:15 with speech tokens, forced fill tokens) is not implemented here.
            raise TypeError(f"tts_text must be a str, got {type(text).__name__}: text-in streaming (a generator "
                            "of text pieces, upstream's bistream) is not supported; join the pieces "
                            "(''.join(pieces)) or call once per sentence")
        if not text.strip():
            raise ValueError("tts_text is empty")

    def _segments(self, text: str, text_frontend: bool) -> list[str]:
        self._check_tts_text(text)
        return self.normalizer(text) if text_frontend else [text]

    def _prompt(self, prompt_wav: Any, *, align: bool = True, timings: dict | None = None):
        from cosyjax.frontend import extract_prompt, read_audio

        if hasattr(prompt_wav, "read"):  # read below twice: once for the features, once for the duration
            prompt_wav = prompt_wav.read()
        prompt = extract_prompt(prompt_wav, speech_tokenizer=self.speech_tokenizer,
                                speaker_encoder=self.speaker_encoder, mel_cfg=self.config.mel,
                                token_mel_ratio=self.config.flow.token_mel_ratio, align=align, timings=timings)
        if isinstance(prompt_wav, tuple):  # (waveform, rate), checked by extract_prompt
            samples, rate = np.asarray(prompt_wav[0]).size, int(prompt_wav[1])
        else:
            wav, rate = read_audio(prompt_wav)
            samples = wav.size
        if samples < MIN_PROMPT_SECONDS * rate:
            name = os.fspath(prompt_wav) if isinstance(prompt_wav, (str, os.PathLike)) else "the prompt recording"
            log.warning("%s is %.2f s long: a prompt shorter than %.0f s gives too few speech tokens to clone the "
                        "voice well", name, samples / rate, MIN_PROMPT_SECONDS)
        return prompt

    def _speaker(self, prompt_wav: Any, zero_shot_spk_id: str, timings: dict | None = None) -> Any:
        if zero_shot_spk_id:
            if zero_shot_spk_id not in self.spk2info:
                raise KeyError(f"speaker {zero_shot_spk_id!r} is not cached (add_zero_shot_spk / load_spkinfo)")
            return self.spk2info[zero_shot_spk_id]["prompt"]
        if prompt_wav is None:
            raise ValueError("prompt_wav is required (or a cached zero_shot_spk_id)")
        return self._prompt(prompt_wav, timings=timings)

    def _voice_prefix(self, zero_shot_spk_id: str, prompt_ids: np.ndarray) -> Any:
        """The cached voice's LLM prefix for these prompt-text ids, made on first use and kept with the voice."""
        prefixes = self.spk2info[zero_shot_spk_id].setdefault("prefixes", {})
        key = tuple(int(i) for i in prompt_ids)
        if key not in prefixes:
            with jax.default_device(self.device):
                prefixes[key] = self.model.voice_prefix(prompt_ids)
        return prefixes[key]

    def _run(self, segments: list[str], make_inputs, stream: bool, speed: float, seed: int,
             timings: dict | None = None) -> Iterator[dict]:
        from tqdm.auto import tqdm

        key = jax.random.key(seed)
        for i, segment in enumerate(tqdm(segments, desc="segments", disable=not self.progress or len(segments) < 2)):
            trace = Trace()
            with jax.default_device(self.device):
                for chunk in self._synthesize(**make_inputs(segment), stream=stream, speed=speed,
                                              key=jax.random.fold_in(key, i), trace=trace):
                    if timings is not None and i == 0:  # the first chunk's stages, as they complete
                        timings.update(trace.timings)
                    yield chunk

    def _synthesize(self, **request: Any) -> Iterator[dict[str, np.ndarray]]:
        """One segment: through the serving engine when ``use_engine`` started one, else the model."""
        return (self.engine or self.model).tts(**request)

    def use_engine(self, config: Any = None) -> Any:
        """Run every request from now on through a batching ``cosyjax.serving.Engine`` on this
        pipeline's model and device (concurrent callers share the device; see the engine's docs).
        Returns the started engine; ``engine.shutdown()`` stops it."""
        from cosyjax.serving import Engine

        if self.engine is None:
            self.engine = Engine(self.model, config, device=self.device).start()
        return self.engine

    def _flow_prompt(self, prompt) -> dict[str, Any]:
        return {"flow_prompt_speech_tokens": prompt.speech_tokens, "prompt_feat": prompt.prompt_mel,
                "embedding": prompt.embedding}

    # ------------------------------------------------------------------ modes
    def inference(self, mode: str, *, tts_text: str | None = None, prompt_text: str | None = None,
                  instruct_text: str | None = None, prompt_wav: Any = None, source_wav: Any = None,
                  zero_shot_spk_id: str = "", stream: bool | None = None, speed: float | None = None,
                  text_frontend: bool | None = None, seed: int | None = None, language: str | None = None,
                  strict: bool | None = None, timings: dict | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The ``inference_<mode>`` call for ``mode`` (one of :data:`MODES`: ``"zero_shot"``,
        ``"cross_lingual"``, ``"instruct2"``, ``"vc"``), for callers that pick the mode at run time.

        The keywords are those of the ``inference_*`` methods, same names and meanings; an argument left
        ``None`` (``zero_shot_spk_id``: ``""``) is not passed, so that method's default applies.  Which
        keywords a mode takes is :data:`MODE_ARGUMENTS`.  Returns that method's generator, called here
        (so its own checks run when they would on a direct call): ``inference("vc", source_wav=a,
        prompt_wav=b)`` is ``inference_vc(a, b)``, ``inference("zero_shot", tts_text=t, prompt_text=p,
        prompt_wav=w, seed=3)`` is ``inference_zero_shot(t, p, w, seed=3)``.

        Raises:
          ValueError: ``mode`` is not one of :data:`MODES`; a keyword the mode does not take is given
            (e.g. ``seed`` or ``tts_text`` for ``"vc"``, ``prompt_text`` for ``"cross_lingual"``); one it
            needs is missing: ``tts_text`` (text modes), ``prompt_text`` (``"zero_shot"`` without a
            cached voice), ``instruct_text`` (``"instruct2"``), ``prompt_wav`` or ``zero_shot_spk_id``
            (text modes), ``source_wav`` and ``prompt_wav`` (``"vc"``).  The message names the field.
        """
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        given = {name: value for name, value in dict(
            tts_text=tts_text, prompt_text=prompt_text, instruct_text=instruct_text, prompt_wav=prompt_wav,
            source_wav=source_wav, zero_shot_spk_id=zero_shot_spk_id or None, stream=stream, speed=speed,
            text_frontend=text_frontend, seed=seed, language=language, strict=strict, timings=timings,
        ).items() if value is not None}
        refused = [name for name in given if name not in MODE_ARGUMENTS[mode]]
        if refused:
            raise ValueError(f"mode {mode} takes no {', '.join(refused)} (inference_{mode} has no such argument)")
        if mode == "vc":
            needed = [name for name in ("source_wav", "prompt_wav") if name not in given]
        else:
            needed = [] if "tts_text" in given else ["tts_text"]
            if mode == "instruct2" and "instruct_text" not in given:
                needed.append("instruct_text")
            if mode == "zero_shot" and "prompt_text" not in given:
                if zero_shot_spk_id:  # a cached voice brings its own transcript: inference_zero_shot ignores it
                    given["prompt_text"] = ""
                else:
                    needed.append("prompt_text (the transcript of prompt_wav)")
            if "prompt_wav" not in given and not zero_shot_spk_id:
                needed.append("prompt_wav (or a cached zero_shot_spk_id)")
        if needed:
            raise ValueError(f"mode {mode} needs {', '.join(needed)}")
        return getattr(self, f"inference_{mode}")(**given)

    def inference_zero_shot(self, tts_text: str, prompt_text: str, prompt_wav: Any = None, zero_shot_spk_id: str = "",
                            stream: bool = False, speed: float = 1.0, text_frontend: bool = True,
                            seed: int = 0, *, language: str | None = None, strict: bool = False,
                            timings: dict | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Clone the prompt's voice: ``prompt_text`` is its transcript (CosyVoice3 expects
        ``"You are a helpful assistant.<|endofprompt|>transcript"``; without the marker that prompt is
        built, see :func:`build_prompt` for ``language`` and ``strict``).  A cached voice
        (``zero_shot_spk_id``) also reuses the LLM's KV cache of its prompt text (same tokens).
        ``timings``: a dict to fill with the seconds of the first chunk's stages (frontend and model)."""
        self._check_tts_text(tts_text)
        tts_marker = ENDOFPROMPT in tts_text
        if zero_shot_spk_id:
            cached = self.spk2info.get(zero_shot_spk_id)
            if cached is None:
                raise KeyError(f"speaker {zero_shot_spk_id!r} is not cached (add_zero_shot_spk / load_spkinfo)")
            prompt, prompt_ids = cached["prompt"], np.asarray(cached["prompt_text_ids"], np.int64)
            # Ids of "<prefix><|endofprompt|>" + ids of the transcript are the ids of the joined text: the
            # tokenizer splits at special tokens.
            prefix = build_prompt("", f"prompt_text of cached speaker {zero_shot_spk_id!r}", language=language,
                                  strict=strict, has_marker=tts_marker or self.tokenizer.endofprompt_id in prompt_ids)
            if prefix:
                prompt_ids = np.concatenate([np.asarray(self.tokenizer.encode(prefix), np.int64), prompt_ids])
            extra = {"voice_prefix": self._voice_prefix(zero_shot_spk_id, prompt_ids)}
        else:
            if not prompt_text or not prompt_text.strip():
                raise ValueError("zero-shot needs prompt_text (the transcript of prompt_wav)")
            prompt_text = build_prompt(prompt_text, "prompt_text", language=language, strict=strict,
                                       has_marker=tts_marker or ENDOFPROMPT in prompt_text)
            prompt = self._speaker(prompt_wav, "", timings)
            prompt_ids = self.tokenizer.encode(self.normalizer.normalize(prompt_text)[0] if text_frontend
                                               else prompt_text)
            extra = {}
        segments = self._segments(tts_text, text_frontend)
        return self._run(segments, lambda s: {"text_ids": self.tokenizer.encode(s), "prompt_text_ids": prompt_ids,
                                              "llm_prompt_speech_tokens": prompt.speech_tokens,
                                              **self._flow_prompt(prompt), **extra}, stream, speed, seed, timings)

    def inference_cross_lingual(self, tts_text: str, prompt_wav: Any = None, zero_shot_spk_id: str = "",
                                stream: bool = False, speed: float = 1.0, text_frontend: bool = True,
                                seed: int = 0, *, language: str | None = None, strict: bool = False,
                                timings: dict | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Speak ``tts_text`` in the prompt's voice, no transcript needed.  CosyVoice3's text carries
        ``<|endofprompt|>`` (then it is passed whole, as upstream); without it the text is normalised
        and split and each segment gets the prompt (see :func:`build_prompt`)."""
        self._check_tts_text(tts_text)
        prefix = build_prompt("", "tts_text", language=language, strict=strict,
                              has_marker=ENDOFPROMPT in tts_text)
        prompt = self._speaker(prompt_wav, zero_shot_spk_id, timings)
        segments = self._segments(tts_text, text_frontend)
        return self._run(segments, lambda s: {"text_ids": self.tokenizer.encode(prefix + s),
                                              **self._flow_prompt(prompt)}, stream, speed, seed, timings)

    def inference_instruct2(self, tts_text: str, instruct_text: str, prompt_wav: Any = None,
                            zero_shot_spk_id: str = "", stream: bool = False, speed: float = 1.0,
                            text_frontend: bool = True, seed: int = 0, *, language: str | None = None,
                            strict: bool = False, timings: dict | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Follow a natural-language instruction (e.g. ``"You are a helpful assistant. 请用广东话表达。<|endofprompt|>"``;
        ``"请用广东话表达。"`` alone gets the rest added, see :func:`build_prompt`)."""
        self._check_tts_text(tts_text)
        if not isinstance(instruct_text, str) or not instruct_text.strip():
            raise ValueError("instruct2 needs instruct_text")
        instruct_text = build_prompt(instruct_text, "instruct_text", kind="instruction", language=language,
                                     strict=strict, has_marker=ENDOFPROMPT in instruct_text or ENDOFPROMPT in tts_text)
        prompt = self._speaker(prompt_wav, zero_shot_spk_id, timings)
        instruct_ids = self.tokenizer.encode(instruct_text)  # upstream does not normalise it
        segments = self._segments(tts_text, text_frontend)
        return self._run(segments, lambda s: {"text_ids": self.tokenizer.encode(s), "prompt_text_ids": instruct_ids,
                                              **self._flow_prompt(prompt)}, stream, speed, seed, timings)

    def inference_vc(self, source_wav: Any, prompt_wav: Any, stream: bool = False, speed: float = 1.0, *,
                     timings: dict | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Voice conversion: the source's speech tokens in the prompt's voice (no LLM; no 2:1 prompt trim)."""
        from cosyjax.frontend import load_audio

        prompt = self._prompt(prompt_wav, align=False, timings=timings)
        source = self.speech_tokenizer(load_audio(source_wav, 16000))
        trace = Trace()
        with jax.default_device(self.device):
            for chunk in self._synthesize(source_speech_tokens=source, stream=stream, speed=speed, trace=trace,
                                          **self._flow_prompt(prompt)):
                if timings is not None:
                    timings.update(trace.timings)
                yield chunk

    # ------------------------------------------------------------------ speaker cache
    def list_available_spks(self) -> list[str]:
        """Ids of the cached voices (upstream's method; a CosyVoice3 release ships none)."""
        return list(self.spk2info)

    def add_zero_shot_spk(self, prompt_text: str, prompt_wav: Any, zero_shot_spk_id: str, *,
                          language: str | None = None, strict: bool = False) -> bool:
        """Extract and cache a voice's prompt features under ``zero_shot_spk_id`` (``prompt_text`` as in
        :meth:`inference_zero_shot`, not normalised, as upstream)."""
        if not zero_shot_spk_id:
            raise ValueError("zero_shot_spk_id must be a non-empty string")
        if not isinstance(prompt_text, str) or not prompt_text.strip():
            raise ValueError("add_zero_shot_spk needs prompt_text (the transcript of prompt_wav)")
        prompt_text = build_prompt(prompt_text, "prompt_text", language=language, strict=strict)
        prompt = self._prompt(prompt_wav)
        self.spk2info[zero_shot_spk_id] = {"prompt": prompt,
                                           "prompt_text_ids": np.asarray(self.tokenizer.encode(prompt_text), np.int64)}
        return True

    def save_spkinfo(self, directory: str | None = None) -> str:
        """Write the speaker cache (one ``<id>.npz`` per voice plus ``<id>.json``) to ``directory``."""
        directory = directory or os.path.join(self.model_dir, "spk2info")
        os.makedirs(directory, exist_ok=True)
        for spk, info in self.spk2info.items():
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", spk)
            info["prompt"].save(os.path.join(directory, f"{safe}.npz"))
            tmp = os.path.join(directory, f".{safe}.json.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"id": spk, "prompt_text_ids": [int(i) for i in info["prompt_text_ids"]]}, f)
            os.replace(tmp, os.path.join(directory, f"{safe}.json"))
        return directory

    def load_spkinfo(self, directory: str) -> list[str]:
        """Load voices written by ``save_spkinfo``; returns their ids."""
        from cosyjax.frontend import PromptFeatures

        loaded = []
        for name in sorted(os.listdir(directory)):
            if name.endswith(".json"):
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    meta = json.load(f)
                prompt = PromptFeatures.load(os.path.join(directory, name[:-5] + ".npz"))
                self.spk2info[meta["id"]] = {"prompt": prompt,
                                             "prompt_text_ids": np.asarray(meta["prompt_text_ids"], np.int64)}
                loaded.append(meta["id"])
        return loaded


# The keyword arguments of CosyVoice3.inference each mode takes: its inference_<mode> method's parameters.
MODE_ARGUMENTS = {mode: tuple(name for name in inspect.signature(getattr(CosyVoice3, f"inference_{mode}")).parameters
                              if name != "self") for mode in MODES}
