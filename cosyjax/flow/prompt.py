"""The flow's prompt (speech tokens, mel, speaker embedding), checked once.

``FlowPrompt.check`` validates what the flow conditions on, for a batch of rows, and
``flow_inference`` / ``flow_stream_init`` take the checked value (``prompt=``) without checking
again; ``CosyVoice3Model`` builds one per request.

Legend: B batch, P prompt tokens, F prompt mel frames, C mel bins, E speaker embedding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cosyjax.config import FlowConfig


def int_rows(name: str, value: Any, batch: int | None) -> np.ndarray:
    """A 2-D [batch, length] integer array, or a ValueError naming ``name``."""
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [batch, length] integer array, found shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integer token ids, found dtype {arr.dtype}")
    if batch is not None and arr.shape[0] != batch:
        raise ValueError(f"{name}: batch {arr.shape[0]} != token batch {batch}")
    return arr.astype(np.int64)


def row_lengths(name: str, value: Any, batch: int, full: int) -> np.ndarray:
    """Per-row lengths [B] in [0, full] (default: ``full`` for every row)."""
    if value is None:
        return np.full((batch,), full, np.int64)
    arr = np.asarray(value)
    if arr.shape != (batch,) or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: expected integer lengths of shape ({batch},), found {arr.dtype} {arr.shape}")
    if (arr < 0).any() or (arr > full).any():
        raise ValueError(f"{name}: lengths {arr.tolist()} must lie in [0, {full}]")
    return arr.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class FlowPrompt:
    """A checked flow prompt for B rows (host arrays).

    Attributes:
      tokens: [B, P] int64 prompt speech tokens (right-padded; P may be 0).
      feat: [B, F, C] float32 prompt mel, time-major.  F need not be ratio * P (voice conversion).
      embedding: [B, E] float32 raw speaker embedding.
      token_len, feat_len: [B] valid prompt tokens / mel frames per row.
    """

    tokens: np.ndarray
    feat: np.ndarray
    embedding: np.ndarray
    token_len: np.ndarray
    feat_len: np.ndarray

    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def check(cls, cfg: FlowConfig, prompt_token: Any, prompt_feat: Any, embedding: Any, *, batch: int | None = None,
              prompt_token_len: Any = None, prompt_feat_len: Any = None) -> "FlowPrompt":
        """Validate a prompt batch (``batch``: the rows the caller's tokens have, if known).

        Raises ValueError naming the field for: a batch mismatch or an empty batch, prompt mel
        channels != C or a non-time-major layout, an embedding of the wrong width, NaN or inf,
        prompt ids outside [0, vocab_size), bad lengths.
        """
        tokens = int_rows("prompt_token", prompt_token, batch)
        rows = tokens.shape[0]
        if rows == 0:
            raise ValueError("prompt_token: empty batch")
        feat = np.asarray(prompt_feat)
        emb = np.asarray(embedding)
        c = cfg.output_size
        if feat.ndim != 3 or feat.shape[0] != rows or feat.shape[2] != c:
            hint = " (looks channel-major: transpose torch's (B, C, T))" if feat.ndim == 3 and feat.shape[1] == c else ""
            raise ValueError(f"prompt_feat: expected [batch={rows}, frames, {c}] (time-major mel), "
                             f"found shape {feat.shape}{hint}")
        if emb.shape != (rows, cfg.spk_embed_dim):
            raise ValueError(f"embedding: expected shape ({rows}, {cfg.spk_embed_dim}), found {emb.shape}")
        if not np.isfinite(emb).all():
            raise ValueError("embedding: contains NaN or inf")
        if not np.isfinite(feat).all():
            raise ValueError("prompt_feat: contains NaN or inf")
        token_len = row_lengths("prompt_token_len", prompt_token_len, rows, tokens.shape[1])
        feat_len = row_lengths("prompt_feat_len", prompt_feat_len, rows, feat.shape[1])
        valid = np.arange(tokens.shape[1])[None, :] < token_len[:, None]
        ids = np.where(valid, tokens, 0)
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"prompt_token: ids must lie in [0, {cfg.vocab_size}), found "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return cls(tokens, feat.astype(np.float32), emb.astype(np.float32), token_len, feat_len)


__all__ = ["FlowPrompt", "int_rows", "row_lengths"]
