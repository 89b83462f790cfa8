"""The prompt-frontend models on JAX: drop-in for the onnxruntime wrappers of ``onnx_models``.

:class:`SpeechTokenizerJAX` and :class:`SpeakerEncoderJAX` have the call interface of
``SpeechTokenizerONNX`` / ``SpeakerEncoderONNX`` (waveform or features in, tokens or embedding out),
so ``extract_prompt`` takes either; they add batched methods.  Their params come from a converted
frontend directory (``cosyjax.convert.frontend.convert_frontend_to_dir``; nothing here reads ONNX or
imports onnxruntime)::

    O/config.json   {"format": FORMAT, "speech_tokenizer": S3TokenizerConfig, "campplus": CAMPPlusConfig,
                     "source": {...}}
    O/params/       orbax PyTree {"speech_tokenizer": ..., "campplus": ...}
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from cosyjax.atomic import staged_dir
from cosyjax.frontend import campplus, s3tokenizer
from cosyjax.frontend.campplus import CAMPPlusConfig
from cosyjax.frontend.onnx_models import SpeakerEncoderBase, SpeechTokenizerBase
from cosyjax.frontend.s3tokenizer import S3TokenizerConfig

FORMAT = "cosyjax-frontend-v1"
CONFIG_NAME = "config.json"
PARAMS_DIR = "params"


class FrontendCheckpointError(ValueError):
    """A converted frontend directory that is missing, incomplete or of another format."""


def _to_device(tree: Any, device: Any) -> Any:
    return jax.device_put(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), tree), device)


class SpeechTokenizerJAX(SpeechTokenizerBase):
    """16 kHz waveform -> 25 Hz speech tokens with the Flax S3Tokenizer v3.

    Args:
      params: converted tokenizer params.
      cfg: its config.
      bucket_frames: frame-axis padding multiple (one jit compile per bucket and batch size).
      device: JAX device for the params (default: JAX's default).
    """

    def __init__(self, params: Any, cfg: S3TokenizerConfig, *, bucket_frames: int = 400, device: Any = None):
        self.cfg = cfg
        self.bucket_frames = int(bucket_frames)
        self.params = _to_device(params, device or jax.devices()[0])

    def tokens_from_features(self, feats: np.ndarray) -> np.ndarray:
        """[128, T] float32 whisper log-mel -> [ceil(T / 4)] int64 tokens."""
        return self.tokens_batch([feats])[0]

    def tokens_batch(self, feats: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Several utterances' [128, T_i] features in one padded call -> list of [S_i] int64 tokens."""
        return s3tokenizer.tokenize_batch(self.params, feats, cfg=self.cfg, bucket_frames=self.bucket_frames)


class SpeakerEncoderJAX(SpeakerEncoderBase):
    """16 kHz waveform -> speaker embedding with the Flax CAM++ (arguments as :class:`SpeechTokenizerJAX`)."""

    def __init__(self, params: Any, cfg: CAMPPlusConfig, *, bucket_frames: int = 400, device: Any = None):
        self.cfg = cfg
        self.bucket_frames = int(bucket_frames)
        self.params = _to_device(params, device or jax.devices()[0])

    def embedding_from_features(self, feats: np.ndarray) -> np.ndarray:
        """[T, 80] float32 mean-normalised fbank -> [embedding_size] float32."""
        return self.embedding_batch([feats])[0]

    def embedding_batch(self, feats: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Several utterances' [T_i, 80] features in one padded call -> list of embeddings."""
        return campplus.embed_batch(self.params, feats, cfg=self.cfg, bucket_frames=self.bucket_frames)


def save_frontend(out_dir: str, tokenizer: tuple[S3TokenizerConfig, Mapping[str, Any]],
                  speaker_encoder: tuple[CAMPPlusConfig, Mapping[str, Any]], *,
                  source: Mapping[str, Any] | None = None, overwrite: bool = False) -> str:
    """Write converted frontend params atomically (temp dir + rename); returns ``out_dir``.

    Raises:
      FrontendCheckpointError: ``out_dir`` exists and ``overwrite`` is False.
    """
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FrontendCheckpointError(f"{out_dir}: output exists (pass overwrite=True to replace it)")
    (tok_cfg, tok_params), (cam_cfg, cam_params) = tokenizer, speaker_encoder
    with staged_dir(out_dir) as tmp:
        tree = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32),
                                      {"speech_tokenizer": dict(tok_params), "campplus": dict(cam_params)})
        ocp.PyTreeCheckpointer().save(os.path.join(tmp, PARAMS_DIR), tree)
        meta = {"format": FORMAT, "speech_tokenizer": tok_cfg.to_dict(), "campplus": cam_cfg.to_dict(),
                "source": dict(source or {})}
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    return out_dir


def read_frontend_meta(path: str) -> dict[str, Any]:
    """``config.json`` of a converted frontend directory (checked for the format)."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path) or not os.path.isdir(os.path.join(path, PARAMS_DIR)):
        raise FrontendCheckpointError(f"{path}: not a converted frontend (needs {CONFIG_NAME} and {PARAMS_DIR}/)")
    with open(cfg_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise FrontendCheckpointError(f"{cfg_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_frontend(path: str, *, device: Any = None, bucket_frames: int = 400
                  ) -> tuple[SpeechTokenizerJAX, SpeakerEncoderJAX]:
    """The two models of a directory written by :func:`save_frontend`.

    Raises:
      FrontendCheckpointError: missing directory, or not a converted frontend of this format.
    """
    import orbax.checkpoint as ocp

    if not os.path.isdir(path):
        raise FrontendCheckpointError(f"{path}: converted frontend directory not found")
    meta = read_frontend_meta(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # orbax warns that numpy leaves carry no sharding
        tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(os.path.join(path, PARAMS_DIR)))
    tok_cfg = S3TokenizerConfig.from_dict(meta["speech_tokenizer"])
    cam_cfg = CAMPPlusConfig.from_dict(meta["campplus"])
    return (SpeechTokenizerJAX(tree["speech_tokenizer"], tok_cfg, bucket_frames=bucket_frames, device=device),
            SpeakerEncoderJAX(tree["campplus"], cam_cfg, bucket_frames=bucket_frames, device=device))
