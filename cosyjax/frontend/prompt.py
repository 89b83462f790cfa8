"""Prompt-audio features for zero-shot / cross-lingual / instruct2 / VC (SPEC §2.1-2.5, §6).

One prompt yields three things (upstream ``frontend_zero_shot`` / ``frontend_vc``):

* ``speech_tokens`` [N] int64: ``speech_tokenizer_v3.onnx`` on the whisper log-mel of the **16 kHz** load;
* ``embedding`` [D] float32: ``campplus.onnx`` on the mean-normalised fbank of the **16 kHz** load;
* ``prompt_mel`` [T, 80] float32: the matcha mel of a separate **24 kHz** load of the same file (never
  resampled from the 16 kHz signal, SPEC §10.12).

Zero-shot alignment (``align=True``, upstream's ``resample_rate == 24000`` branch): with
``r = token_mel_ratio`` (2 in the release, from the flow config), ``n = min(T // r, N)``; the mel is
cut to ``r * n`` frames and the tokens to ``n``. Voice conversion (``frontend_vc``) skips this step
upstream, so the flow then sees a prompt whose mel length need not be ``r`` times its token count
(SPEC §6); pass ``align=False`` to reproduce that.

:class:`PromptFeatures` can be saved to / loaded from ``.npz`` so a voice's prompt features are
computed once and reused (the write is atomic: temp file in the same directory, then rename).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import time

import numpy as np
import soundfile

from cosyjax.config import MelConfig
from cosyjax.frontend.audio import AudioSource, load_audio
from cosyjax.frontend.features import prompt_mel
from cosyjax.frontend.onnx_models import SpeakerEncoderBase, SpeechTokenizerBase

TOKENIZER_SAMPLE_RATE = 16000
CACHE_FORMAT = 1
_CACHE_KEYS = ("format", "speech_tokens", "embedding", "prompt_mel", "meta")


class PromptError(ValueError):
    """Prompt features that cannot be built, saved or loaded."""


@dataclasses.dataclass(frozen=True, eq=False)
class PromptFeatures:
    """Features of one prompt recording.

    Attributes:
      speech_tokens: [N] int64 prompt speech tokens (25 Hz).
      embedding: [D] float32 speaker embedding.
      prompt_mel: [T, num_mels] float32 prompt mel (50 Hz), time-major.
      sample_rate: rate of the waveform the mel was computed from (the model's output rate).
      token_mel_ratio: mel frames per speech token.
      aligned: True when the zero-shot alignment was applied (T == token_mel_ratio * N).
    """

    speech_tokens: np.ndarray
    embedding: np.ndarray
    prompt_mel: np.ndarray
    sample_rate: int
    token_mel_ratio: int
    aligned: bool

    def __post_init__(self):
        tokens = np.array(self.speech_tokens, np.int64)  # copies: the frozen object owns its arrays
        embedding = np.array(self.embedding, np.float32)
        mel = np.array(self.prompt_mel, np.float32)
        if tokens.ndim != 1 or tokens.shape[0] == 0:
            raise PromptError(f"PromptFeatures: speech_tokens must be [N>0], got shape {tokens.shape}")
        if tokens.min() < 0:
            raise PromptError(f"PromptFeatures: negative speech token {tokens.min()}")
        if embedding.ndim != 1 or embedding.shape[0] == 0 or not np.all(np.isfinite(embedding)):
            raise PromptError(f"PromptFeatures: embedding must be a finite [D>0] vector, got shape {embedding.shape}")
        if mel.ndim != 2 or mel.shape[0] == 0 or not np.all(np.isfinite(mel)):
            raise PromptError(f"PromptFeatures: prompt_mel must be a finite [T>0, num_mels], got shape {mel.shape}")
        if self.token_mel_ratio < 1 or self.sample_rate <= 0:
            raise PromptError(f"PromptFeatures: token_mel_ratio={self.token_mel_ratio}, sample_rate={self.sample_rate}")
        if self.aligned and mel.shape[0] != self.token_mel_ratio * tokens.shape[0]:
            raise PromptError(f"PromptFeatures: aligned, but {mel.shape[0]} mel frames != "
                              f"{self.token_mel_ratio} x {tokens.shape[0]} tokens")
        for name, value in (("speech_tokens", tokens), ("embedding", embedding), ("prompt_mel", mel)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "sample_rate", int(self.sample_rate))
        object.__setattr__(self, "token_mel_ratio", int(self.token_mel_ratio))
        object.__setattr__(self, "aligned", bool(self.aligned))

    def save(self, path: str | os.PathLike) -> None:
        """Write the features to ``path`` (.npz, uncompressed), atomically."""
        path = os.fspath(path)
        meta = {"sample_rate": self.sample_rate, "token_mel_ratio": self.token_mel_ratio, "aligned": self.aligned}
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".prompt-", suffix=".npz.tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, format=np.int64(CACHE_FORMAT), speech_tokens=self.speech_tokens,
                         embedding=self.embedding, prompt_mel=self.prompt_mel, meta=np.array(json.dumps(meta)))
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PromptFeatures":
        """Read features written by :meth:`save`.

        Raises:
          PromptError: missing file, not an npz of this format, or invalid contents.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise PromptError(f"{path}: prompt feature file not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in _CACHE_KEYS if k not in z.files]
                if missing:
                    raise PromptError(f"{path}: not a prompt feature file (missing {missing})")
                if int(z["format"]) != CACHE_FORMAT:
                    raise PromptError(f"{path}: cache format {int(z['format'])}, expected {CACHE_FORMAT}")
                meta = json.loads(str(z["meta"]))
                return cls(speech_tokens=z["speech_tokens"], embedding=z["embedding"], prompt_mel=z["prompt_mel"],
                           sample_rate=meta["sample_rate"], token_mel_ratio=meta["token_mel_ratio"],
                           aligned=meta["aligned"])
        except PromptError:
            raise
        except Exception as e:  # zipfile/pickle/json/key errors of a corrupt or foreign file
            raise PromptError(f"{path}: cannot read prompt features ({type(e).__name__}: {e})") from e


def align_prompt(speech_tokens: np.ndarray, mel: np.ndarray, token_mel_ratio: int) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's zero-shot trim: n = min(T // r, N); keep r*n mel frames and n tokens.

    Args:
      speech_tokens: [N] tokens.
      mel: [T, num_mels] prompt mel.
      token_mel_ratio: r.
    Returns:
      (tokens [n], mel [r*n, num_mels]).
    Raises:
      PromptError: n == 0 (the prompt is too short to give one token's worth of mel).
    """
    n = min(mel.shape[0] // token_mel_ratio, speech_tokens.shape[0])
    if n == 0:
        raise PromptError(f"prompt too short: {mel.shape[0]} mel frames and {speech_tokens.shape[0]} tokens "
                          f"leave no aligned token (token_mel_ratio {token_mel_ratio})")
    return speech_tokens[:n], mel[:token_mel_ratio * n]


def _reusable(source: AudioSource | tuple[np.ndarray, int]) -> AudioSource:
    """Make the source readable twice: file objects are read into bytes, arrays become a float WAV."""
    if isinstance(source, tuple):
        wav, sample_rate = source
        wav = np.asarray(wav, np.float32)
        if wav.ndim != 1:
            raise PromptError(f"prompt waveform must be mono [S], got shape {wav.shape}")
        if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise PromptError(f"prompt sample rate must be a positive int, got {sample_rate!r}")
        buffer = io.BytesIO()
        soundfile.write(buffer, wav, int(sample_rate), format="WAV", subtype="FLOAT")  # lossless for float32
        return buffer.getvalue()
    if hasattr(source, "read"):
        return source.read()
    return source


def extract_prompt(wav: AudioSource | tuple[np.ndarray, int], *, speech_tokenizer: SpeechTokenizerBase,
                   speaker_encoder: SpeakerEncoderBase, mel_cfg: MelConfig, token_mel_ratio: int,
                   align: bool = True, timings: dict | None = None) -> PromptFeatures:
    """Prompt features of one recording, as upstream's ``frontend_zero_shot`` (or ``frontend_vc``).

    Args:
      wav: a path, encoded file bytes, a binary file object, or ``(waveform [S], sample_rate)``.
      speech_tokenizer: the speech tokenizer (``SpeechTokenizerONNX`` or ``SpeechTokenizerJAX``).
      speaker_encoder: the speaker encoder (``SpeakerEncoderONNX`` or ``SpeakerEncoderJAX``).
      mel_cfg: the release's feat_extractor config (``ModelConfig.mel``); its sampling rate is the
        second load rate.
      token_mel_ratio: ``FlowConfig.token_mel_ratio``.
      align: apply the zero-shot trim (True for zero-shot/cross-lingual/instruct2; False for VC).
      timings: a dict to fill with the seconds of "audio_decode", "speech_tokenizer", "speaker_encoder"
        and "prompt_mel".
    Returns:
      PromptFeatures.
    Raises:
      AudioError: unreadable, silent, too short or too long (> 30 s) audio.
      PromptError: bad arguments, or a prompt too short to align.
    """
    if mel_cfg is None:
        raise PromptError("extract_prompt: mel_cfg is None (the release yaml has no feat_extractor)")
    if int(token_mel_ratio) < 1:
        raise PromptError(f"extract_prompt: token_mel_ratio must be >= 1, got {token_mel_ratio}")
    timings = {} if timings is None else timings
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock
        clock = now

    source = _reusable(wav)
    wav16k = load_audio(source, TOKENIZER_SAMPLE_RATE)
    wav_mel = load_audio(source, mel_cfg.sampling_rate)  # a separate load, never resampled from 16 kHz
    lap("audio_decode")
    tokens = np.asarray(speech_tokenizer(wav16k))
    lap("speech_tokenizer")
    embedding = np.asarray(speaker_encoder(wav16k))
    lap("speaker_encoder")
    mel = prompt_mel(wav_mel, mel_cfg)
    lap("prompt_mel")
    if align:
        tokens, mel = align_prompt(tokens, mel, int(token_mel_ratio))
    return PromptFeatures(speech_tokens=tokens, embedding=embedding, prompt_mel=mel,
                          sample_rate=mel_cfg.sampling_rate, token_mel_ratio=int(token_mel_ratio), aligned=align)
