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
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from typing import Any, Iterator

import jax
import numpy as np

from cosyjax.checkpoint import CONVERTED_SUBDIR, CheckpointError, load_converted
from cosyjax.config import QWEN_DIR, load_model_config

DEFAULT_HUB_ID = "FunAudioLLM/Fun-CosyVoice3-0.5B-2512"
SPEECH_TOKENIZER = "speech_tokenizer_v3.onnx"
SPEAKER_ENCODER = "campplus.onnx"

log = logging.getLogger(__name__)


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


def _source_fingerprint(model_dir: str, llm_file: str) -> dict[str, Any]:
    out = {}
    for name in ("cosyvoice3.yaml", llm_file, "flow.pt", "hift.pt", os.path.join(QWEN_DIR, "config.json")):
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


def ensure_converted(model_dir: str, dtype: str = "float32", *, llm_file: str = "llm.pt",
                     progress: bool = True) -> str:
    """Path of a converted copy of ``model_dir``, converting on first use.

    The cache lives next to the release (``<model_dir>/.cosyjax/<dtype>``, ``<dtype>-llm.rl`` for
    ``llm_file="llm.rl.pt"``) or, if that is read-only, under ``~/.cache/cosyjax``.  It is rebuilt
    when the source files' sizes or times change.
    """
    from cosyjax.convert import stage_files  # validates llm_file (the converter needs torch only to run)

    stage_files(llm_file)
    fingerprint = _source_fingerprint(model_dir, llm_file)
    variant = dtype if llm_file == "llm.pt" else f"{dtype}-{llm_file[:-len('.pt')]}"
    candidates = [os.path.join(model_dir, CONVERTED_SUBDIR, variant)]
    key = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.abspath(model_dir).strip("/"))
    candidates.append(os.path.join(os.path.expanduser("~/.cache/cosyjax"), key, variant))
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
      dtype: "float32" or "bfloat16" (LLM weights and activations; flow/HiFT compute in float32).
      converted_dir: an existing ``cosyjax convert`` output; default: convert on first use and cache.
      llm_file: the LLM checkpoint converted on first use: "llm.pt" (upstream's choice) or the
        release's RL-tuned "llm.rl.pt" (ignored with ``converted_dir``, which holds what it was made from).
      backend: JAX platform to run on ("cpu", "gpu", "tpu"); default: JAX's default.
      onnx_providers: onnxruntime providers for the prompt feature models.
      progress: progress bars (first-use conversion, texts of several segments).
      model_options: passed to ``CosyVoice3Model`` (sampler, upstream quirk switches, ...).
    """

    def __init__(self, model_dir: str, *, dtype: str = "float32", converted_dir: str | None = None,
                 llm_file: str = "llm.pt", backend: str | None = None,
                 onnx_providers: tuple[str, ...] = ("CPUExecutionProvider",), progress: bool = True,
                 **model_options: Any):
        from cosyjax.frontend import (CosyVoice3Tokenizer, SpeakerEncoderONNX, SpeechTokenizerONNX,
                                      TextNormalizer)
        from cosyjax.model import CosyVoice3Model

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
        self.speech_tokenizer = SpeechTokenizerONNX(os.path.join(model_dir, SPEECH_TOKENIZER), providers=onnx_providers)
        self.speaker_encoder = SpeakerEncoderONNX(os.path.join(model_dir, SPEAKER_ENCODER), providers=onnx_providers)
        converted = load_converted(converted_dir or ensure_converted(model_dir, dtype, llm_file=llm_file,
                                                                     progress=progress))
        with jax.default_device(self.device):
            self.model = CosyVoice3Model(converted, dtype, **model_options)
        self.spk2info: dict[str, Any] = {}
        self.progress = progress

    @classmethod
    def from_pretrained(cls, model_dir_or_hub_id: str = DEFAULT_HUB_ID, *, dtype: str = "float32",
                        backend: str | None = None, cache_dir: str | None = None, **kwargs: Any) -> "CosyVoice3":
        """Load a local release directory or download a Hub id (``FunAudioLLM/Fun-CosyVoice3-0.5B-2512``)."""
        return cls(resolve_model_dir(model_dir_or_hub_id, cache_dir=cache_dir), dtype=dtype, backend=backend,
                   **kwargs)

    # ------------------------------------------------------------------ frontend
    def _segments(self, text: str, text_frontend: bool) -> list[str]:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("tts_text is empty")
        return self.normalizer(text) if text_frontend else [text]

    def _prompt(self, prompt_wav: Any, *, align: bool = True):
        from cosyjax.frontend import extract_prompt

        return extract_prompt(prompt_wav, speech_tokenizer=self.speech_tokenizer,
                              speaker_encoder=self.speaker_encoder, mel_cfg=self.config.mel,
                              token_mel_ratio=self.config.flow.token_mel_ratio, align=align)

    def _speaker(self, prompt_wav: Any, zero_shot_spk_id: str) -> Any:
        if zero_shot_spk_id:
            if zero_shot_spk_id not in self.spk2info:
                raise KeyError(f"speaker {zero_shot_spk_id!r} is not cached (add_zero_shot_spk / load_spkinfo)")
            return self.spk2info[zero_shot_spk_id]["prompt"]
        if prompt_wav is None:
            raise ValueError("prompt_wav is required (or a cached zero_shot_spk_id)")
        return self._prompt(prompt_wav)

    def _run(self, segments: list[str], make_inputs, stream: bool, speed: float, seed: int) -> Iterator[dict]:
        from tqdm.auto import tqdm

        key = jax.random.key(seed)
        for i, segment in enumerate(tqdm(segments, desc="segments", disable=not self.progress or len(segments) < 2)):
            with jax.default_device(self.device):
                yield from self.model.tts(**make_inputs(segment), stream=stream, speed=speed,
                                          key=jax.random.fold_in(key, i))

    def _flow_prompt(self, prompt) -> dict[str, Any]:
        return {"flow_prompt_speech_tokens": prompt.speech_tokens, "prompt_feat": prompt.prompt_mel,
                "embedding": prompt.embedding}

    # ------------------------------------------------------------------ modes
    def inference_zero_shot(self, tts_text: str, prompt_text: str, prompt_wav: Any = None, zero_shot_spk_id: str = "",
                            stream: bool = False, speed: float = 1.0, text_frontend: bool = True,
                            seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Clone the prompt's voice: ``prompt_text`` is its transcript (CosyVoice3 expects
        ``"You are a helpful assistant.<|endofprompt|>transcript"``)."""
        if zero_shot_spk_id:
            cached = self.spk2info.get(zero_shot_spk_id)
            if cached is None:
                raise KeyError(f"speaker {zero_shot_spk_id!r} is not cached (add_zero_shot_spk / load_spkinfo)")
            prompt, prompt_ids = cached["prompt"], cached["prompt_text_ids"]
        else:
            if not prompt_text or not prompt_text.strip():
                raise ValueError("zero-shot needs prompt_text (the transcript of prompt_wav)")
            prompt = self._speaker(prompt_wav, "")
            prompt_ids = self.tokenizer.encode(self.normalizer.normalize(prompt_text)[0] if text_frontend
                                               else prompt_text)
        segments = self._segments(tts_text, text_frontend)
        return self._run(segments, lambda s: {"text_ids": self.tokenizer.encode(s), "prompt_text_ids": prompt_ids,
                                              "llm_prompt_speech_tokens": prompt.speech_tokens,
                                              **self._flow_prompt(prompt)}, stream, speed, seed)

    def inference_cross_lingual(self, tts_text: str, prompt_wav: Any = None, zero_shot_spk_id: str = "",
                                stream: bool = False, speed: float = 1.0, text_frontend: bool = True,
                                seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Speak ``tts_text`` (which carries ``<|endofprompt|>``) in the prompt's voice, no transcript needed."""
        prompt = self._speaker(prompt_wav, zero_shot_spk_id)
        segments = self._segments(tts_text, text_frontend)
        return self._run(segments, lambda s: {"text_ids": self.tokenizer.encode(s), **self._flow_prompt(prompt)},
                         stream, speed, seed)

    def inference_instruct2(self, tts_text: str, instruct_text: str, prompt_wav: Any = None,
                            zero_shot_spk_id: str = "", stream: bool = False, speed: float = 1.0,
                            text_frontend: bool = True, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Follow a natural-language instruction (e.g. ``"You are a helpful assistant. 请用广东话表达。<|endofprompt|>"``)."""
        if not instruct_text or not instruct_text.strip():
            raise ValueError("instruct2 needs instruct_text")
        prompt = self._speaker(prompt_wav, zero_shot_spk_id)
        instruct_ids = self.tokenizer.encode(instruct_text)  # upstream does not normalise it
        segments = self._segments(tts_text, text_frontend)
        return self._run(segments, lambda s: {"text_ids": self.tokenizer.encode(s), "prompt_text_ids": instruct_ids,
                                              **self._flow_prompt(prompt)}, stream, speed, seed)

    def inference_vc(self, source_wav: Any, prompt_wav: Any, stream: bool = False,
                     speed: float = 1.0) -> Iterator[dict[str, np.ndarray]]:
        """Voice conversion: the source's speech tokens in the prompt's voice (no LLM; no 2:1 prompt trim)."""
        from cosyjax.frontend import load_audio

        prompt = self._prompt(prompt_wav, align=False)
        source = self.speech_tokenizer(load_audio(source_wav, 16000))
        with jax.default_device(self.device):
            yield from self.model.tts(source_speech_tokens=source, stream=stream, speed=speed,
                                      **self._flow_prompt(prompt))

    # ------------------------------------------------------------------ speaker cache
    def add_zero_shot_spk(self, prompt_text: str, prompt_wav: Any, zero_shot_spk_id: str) -> bool:
        """Extract and cache a voice's prompt features under ``zero_shot_spk_id``."""
        if not zero_shot_spk_id:
            raise ValueError("zero_shot_spk_id must be a non-empty string")
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
