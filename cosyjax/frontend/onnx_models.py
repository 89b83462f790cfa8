"""The two ONNX models of the release: the speech tokenizer and the CAM++ speaker encoder (SPEC §2.2-2.3).

Both run once per prompt on onnxruntime, as upstream does (``cosyvoice/cli/frontend.py``):

* ``speech_tokenizer_v3.onnx``: input 0 = whisper log-mel ``[1, 128, T]`` float32 (100 Hz frames of
  16 kHz audio), input 1 = ``[T]`` as int32 ``[1]``; output 0 flattened = the 25 Hz speech tokens.
  Upstream asserts the audio is at most 30 s. Upstream picks the CUDA provider when torch sees a GPU,
  and notes that the provider can flip single tokens; we default to CPU and take a provider list.
* ``campplus.onnx``: input 0 = mean-normalised Kaldi fbank ``[1, T, 80]`` float32; output 0
  flattened = the speaker embedding (192 values in the release). Upstream always runs it on CPU.

Input names are read from the session (upstream does the same), so any export of these models works.
Session options follow upstream: full graph optimisation, one intra-op thread.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from cosyjax.frontend.features import WHISPER_HOP, WHISPER_SAMPLE_RATE, spk_fbank, whisper_log_mel

MAX_TOKENIZER_SECONDS = 30.0  # upstream asserts this in _extract_speech_token
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


class OnnxModelError(ValueError):
    """An ONNX model file that is missing, unloadable or has unexpected inputs/outputs."""


def _session(path: str | os.PathLike, providers: Sequence[str], num_inputs: int, what: str):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OnnxModelError(f"{what}: model file not found: {path}")
    try:
        import onnxruntime
    except ImportError as e:
        raise OnnxModelError(f"{what}: needs onnxruntime (pip install onnxruntime)") from e
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    available = set(onnxruntime.get_available_providers())
    missing = [p for p in providers if p not in available]
    if missing:
        raise OnnxModelError(f"{what}: execution providers {missing} are not available "
                             f"(this onnxruntime has {sorted(available)})")
    try:
        session = onnxruntime.InferenceSession(path, sess_options=options, providers=list(providers))
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... exception types
        raise OnnxModelError(f"{what}: cannot load {path} ({type(e).__name__}: {e})") from e
    inputs = session.get_inputs()
    if len(inputs) != num_inputs or not session.get_outputs():
        raise OnnxModelError(f"{what}: {path} has inputs {[i.name for i in inputs]}; expected {num_inputs} "
                             "input(s) and at least one output")
    return session


class SpeechTokenizerBase:
    """16 kHz waveform -> speech tokens; a backend implements ``tokens_from_features`` ([128, T] -> [N])."""

    def tokens_from_features(self, feats: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, wav16k: np.ndarray) -> np.ndarray:
        """Speech tokens of a prompt.

        Args:
          wav16k: [S] float32 mono waveform at 16 kHz, at most 30 s.
        Returns:
          [N] int64 speech tokens.
        Raises:
          ValueError: the waveform is not 1-D, too short for one frame, or longer than 30 s.
        """
        wav16k = np.asarray(wav16k)
        if wav16k.ndim != 1:
            raise ValueError(f"speech tokenizer: expected a mono waveform [S], got shape {wav16k.shape}")
        seconds = wav16k.shape[0] / WHISPER_SAMPLE_RATE
        if seconds > MAX_TOKENIZER_SECONDS:
            raise ValueError(f"speech tokenizer: {seconds:.2f} s of audio is longer than the "
                             f"{MAX_TOKENIZER_SECONDS:g} s the model supports")
        if wav16k.shape[0] < WHISPER_HOP:
            raise ValueError(f"speech tokenizer: {wav16k.shape[0]} samples give no 10 ms frame")
        return self.tokens_from_features(whisper_log_mel(wav16k))


class SpeakerEncoderBase:
    """16 kHz waveform -> speaker embedding; a backend implements ``embedding_from_features`` ([T, 80] -> [D])."""

    def embedding_from_features(self, feats: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, wav16k: np.ndarray) -> np.ndarray:
        """Speaker embedding of a prompt.

        Args:
          wav16k: [S] float32 mono waveform at 16 kHz (at least 25 ms).
        Returns:
          [D] float32 embedding.
        """
        wav16k = np.asarray(wav16k)
        if wav16k.ndim != 1:
            raise ValueError(f"speaker encoder: expected a mono waveform [S], got shape {wav16k.shape}")
        return self.embedding_from_features(spk_fbank(wav16k))


class SpeechTokenizerONNX(SpeechTokenizerBase):
    """16 kHz waveform -> 25 Hz speech tokens with ``speech_tokenizer_v3.onnx``.

    Args:
      path: the ONNX file.
      providers: onnxruntime execution providers, in preference order (default CPU only).
    Raises:
      OnnxModelError: the file is missing or not a two-input model.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = DEFAULT_PROVIDERS):
        self.path = os.fspath(path)
        self._session = _session(path, providers, 2, "speech tokenizer")
        self._feats_name, self._length_name = (i.name for i in self._session.get_inputs())

    def tokens_from_features(self, feats: np.ndarray) -> np.ndarray:
        """Run the model on whisper log-mel features.

        Args:
          feats: [128, T] float32 (``whisper_log_mel`` output).
        Returns:
          [N] int64 speech tokens (N = ceil(T / 4) for the release model).
        """
        feats = np.asarray(feats, np.float32)
        if feats.ndim != 2 or feats.shape[1] == 0:
            raise ValueError(f"speech tokenizer: expected features [n_mels, T>0], got shape {feats.shape}")
        out = self._session.run(None, {
            self._feats_name: feats[None],
            self._length_name: np.array([feats.shape[1]], np.int32),
        })[0]
        return np.asarray(out).reshape(-1).astype(np.int64)


class SpeakerEncoderONNX(SpeakerEncoderBase):
    """16 kHz waveform -> speaker embedding with ``campplus.onnx``.

    Args:
      path: the ONNX file.
      providers: onnxruntime execution providers (upstream uses CPU only).
    Raises:
      OnnxModelError: the file is missing or not a one-input model.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = DEFAULT_PROVIDERS):
        self.path = os.fspath(path)
        self._session = _session(path, providers, 1, "speaker encoder")
        self._feats_name = self._session.get_inputs()[0].name

    def embedding_from_features(self, feats: np.ndarray) -> np.ndarray:
        """Run the model on mean-normalised fbank features.

        Args:
          feats: [T, 80] float32 (``spk_fbank`` output).
        Returns:
          [D] float32 embedding (D = 192 for the release model).
        """
        feats = np.asarray(feats, np.float32)
        if feats.ndim != 2 or feats.shape[0] == 0:
            raise ValueError(f"speaker encoder: expected features [T>0, n_bins], got shape {feats.shape}")
        out = self._session.run(None, {self._feats_name: feats[None]})[0]
        return np.asarray(out, np.float32).reshape(-1)
