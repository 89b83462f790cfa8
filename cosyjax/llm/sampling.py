"""Token samplers for the speech-token decode loop, with explicit JAX PRNG keys.

``ras`` follows cosyvoice/utils/common.py::ras_sampling (Repetition Aware Sampling, VALL-E 2):

1. nucleus: probs = softmax(scores), sorted descending (stable: lower id first on ties); tokens are
   taken while ``cum < top_p and count < top_k``, adding each prob *after* the check, so the token
   that crosses top_p is included; one is drawn with probability proportional to its prob.
2. repetition: if that token occurs at least ``win_size * tau_r`` times among the last ``win_size``
   decoded tokens, upstream sets its score to -inf and redraws from the *full* softmax
   (``random_sampling``), so the fallback never returns the repeated token but can return stop ids.

``greedy`` is argmax (the reference's parity sampler).  Settings are a frozen, hashable dataclass so
they can be a static jit argument.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.config import SamplingConfig

Array = jax.Array
METHODS = ("ras", "greedy")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How the decode loop picks tokens.

    Attributes:
      method: "ras" (upstream default) or "greedy".
      top_p, top_k, win_size, tau_r: RAS parameters (cosyvoice3.yaml ``sampling``).
      mask_all_stop_ids_before_min_len: False reproduces upstream, which during the first min_len
        steps masks only index ``speech_token_size`` (= sos in CosyVoice3, not eos), so eos and the
        other stop ids can still end generation early (SPEC 3.3).  True masks every stop id
        (``>= speech_token_size``), which is what min_len was meant to do.
    """

    method: str = "ras"
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1
    mask_all_stop_ids_before_min_len: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"SamplerSettings: method={self.method!r}, expected one of {METHODS}")
        SamplingConfig(self.top_p, self.top_k, self.win_size, self.tau_r)  # same range checks

    @classmethod
    def from_config(cls, sampling: SamplingConfig, **overrides) -> "SamplerSettings":
        """RAS settings from the release's ``sampling`` section; ``overrides`` replace fields."""
        base = dict(top_p=sampling.top_p, top_k=sampling.top_k, win_size=sampling.win_size,
                    tau_r=sampling.tau_r)
        base.update(overrides)
        return cls(**base)

    @property
    def repetition_threshold(self) -> float:
        """Upstream compares the count with the Python float ``win_size * tau_r``."""
        return self.win_size * self.tau_r


def nucleus_keep(probs: Array, top_p: float, top_k: int) -> tuple[Array, Array, Array]:
    """The nucleus candidate set of one distribution.

    Args:
      probs: [V] float32 probabilities.
    Returns:
      (values [k], ids [k], keep [k] bool) with k = min(top_k, V): the k largest probs in
      descending order (lower id first on ties, as torch's stable sort) and which of them RAS keeps.
    """
    k = min(top_k, probs.shape[-1])
    values, ids = jax.lax.top_k(probs, k)  # ties: lower index first
    # Upstream accumulates ``cum_prob += p`` one float32 add at a time and compares with top_p as
    # float32 (a Python scalar does not promote a float32 tensor); unrolled so the rounding is the same.
    threshold = np.float32(top_p)
    cum = jnp.float32(0.0)
    keep = []
    for j in range(k):
        keep.append(cum < threshold)
        cum = cum + values[j]
    return values, ids, jnp.stack(keep)


def _ras_one(key: Array, scores: Array, recent: Array, settings: SamplerSettings) -> Array:
    """One row: scores [V] log-probs (already min_len-masked), recent [W] last decoded ids (-1 = none)."""
    nucleus_key, fallback_key = jax.random.split(key)
    probs = jax.nn.softmax(scores)
    values, ids, keep = nucleus_keep(probs, settings.top_p, settings.top_k)
    logits = jnp.where(keep, jnp.log(values), -jnp.inf)
    first = ids[jax.random.categorical(nucleus_key, logits)]
    repeats = jnp.sum(recent == first)
    # random_sampling draws from softmax(scores) with the repeated token set to -inf.
    fallback = jax.random.categorical(fallback_key, scores.at[first].set(-jnp.inf))
    return jnp.where(repeats >= settings.repetition_threshold, fallback, first).astype(jnp.int32)


def sample(keys: Array, scores: Array, recent: Array, settings: SamplerSettings) -> Array:
    """Pick one token per row.

    Args:
      keys: [B] PRNG keys (one per row for this step; unused by greedy).
      scores: [B, V] float32 log-probs as upstream hands them to the sampler.
      recent: [B, W] int32, the row's last W decoded tokens, -1 where fewer were decoded.
      settings: static sampler settings.
    Returns:
      [B] int32 token ids.
    """
    if settings.method == "greedy":
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    return jax.vmap(lambda k, s, r: _ras_one(k, s, r, settings))(keys, scores, recent)
