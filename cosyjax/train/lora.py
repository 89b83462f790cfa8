"""LoRA as a transformation of the param tree: adapters merged into the kernels inside the loss.

For each target kernel ``W`` [in, out] (a Dense kernel of the Qwen2 LLM or the DiT) the adapter is a
pair ``a`` [in, r], ``b`` [r, out] and the model computes with ``W + (alpha / r) a b``.  The model code
is untouched: ``merge_lora(base, adapters, cfg)`` builds the merged tree that the usual loss reads, so
the train step differentiates only the adapters (the base is a frozen argument, see
``step.make_train_step(with_frozen=True)``) and the optimizer state holds adapter moments only.
``a`` starts N(0, 1/in) and ``b`` at zero (Hu et al. 2021): the adapted model starts as the base.
Export writes ``merge_lora(base, adapters)``, which upstream loads like any fine-tuned checkpoint.

Targets are named by the kernel's module (the path part before ``kernel``):

  llm:  q_proj k_proj v_proj o_proj gate_proj up_proj down_proj   (every Qwen2 layer)
  flow: to_q to_k to_v to_out_0 ff_0_0 ff_2                        (every DiT block)

Legend: r rank.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TARGETS = {"llm": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                   "flow": ("to_q", "to_k", "to_v", "to_out_0", "ff_0_0", "ff_2")}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r; None means alpha = r), target module names."""

    rank: int
    targets: tuple[str, ...]
    alpha: float | None = None

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank!r}: expected an integer >= 1")
        if not self.targets:
            raise ValueError("LoRA targets: none given")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"LoRA alpha={self.alpha!r}: expected a positive number")

    @property
    def scale(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank) / self.rank

    @classmethod
    def for_model(cls, model: str, rank: int, alpha: float | None = None,
                  targets: Sequence[str] | None = None) -> "LoraConfig":
        """Defaults for "llm" or "flow" (``DEFAULT_TARGETS``)."""
        if model not in DEFAULT_TARGETS:
            raise ValueError(f"model={model!r}: expected one of {sorted(DEFAULT_TARGETS)}")
        return cls(rank=rank, targets=tuple(targets or DEFAULT_TARGETS[model]), alpha=alpha)


def _path(path: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def target_kernels(params: Any, cfg: LoraConfig) -> dict[tuple[str, ...], tuple[int, int]]:
    """Module path (e.g. ``("llm", "layers_0", "self_attn", "q_proj")``) -> (in, out) of every target kernel.

    Raises ValueError when a target name matches no 2-D kernel (a typo would otherwise train nothing).
    """
    found: dict[tuple[str, ...], tuple[int, int]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        parts = _path(path)
        if len(parts) >= 2 and parts[-1] == "kernel" and parts[-2] in cfg.targets and np.ndim(leaf) == 2:
            found[parts[:-1]] = tuple(np.shape(leaf))
    unused = [t for t in cfg.targets if not any(k[-1] == t for k in found)]
    if unused:
        raise ValueError(f"LoRA targets {unused} match no 2-D kernel of the model")
    return found


def init_lora(params: Any, cfg: LoraConfig, seed: int) -> dict[str, Any]:
    """Adapters as a tree mirroring ``params``: at each target module {"a": [in, r] N(0, 1/in), "b": [r, out] zeros}
    (float32 numpy)."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for path, (fan_in, fan_out) in sorted(target_kernels(params, cfg).items()):
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node["a"] = (rng.standard_normal((fan_in, cfg.rank)) / np.sqrt(fan_in)).astype(np.float32)
        node["b"] = np.zeros((cfg.rank, fan_out), np.float32)
    return out


def _adapter_paths(adapters: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if set(adapters) == {"a", "b"} and not isinstance(adapters["a"], Mapping):
        return [prefix]
    out = []
    for key, value in adapters.items():
        if not isinstance(value, Mapping):
            raise ValueError(f"LoRA adapters: {'/'.join(prefix + (key,))} is not a module of {{'a', 'b'}}")
        out += _adapter_paths(value, prefix + (key,))
    return out


def merge_lora(params: Any, adapters: Mapping[str, Any], cfg: LoraConfig) -> Any:
    """``params`` with each adapted kernel replaced by ``W + scale * a @ b`` (same dtype as W).  Jittable.

    The product is accumulated in float32 and added to W in float32, so merging float32 masters is
    exact to float32 rounding; bf16 compute merges bf16 copies.
    """
    wanted = set(_adapter_paths(adapters))
    seen = set()

    def merge(path, leaf):
        parts = _path(path)
        if parts[-1] != "kernel" or parts[:-1] not in wanted:
            return leaf
        seen.add(parts[:-1])
        node = adapters
        for part in parts[:-1]:
            node = node[part]
        delta = jnp.matmul(jnp.asarray(node["a"]), jnp.asarray(node["b"]), preferred_element_type=jnp.float32)
        return (jnp.asarray(leaf, jnp.float32) + cfg.scale * delta).astype(jnp.asarray(leaf).dtype)

    merged = jax.tree_util.tree_map_with_path(merge, params)
    unknown = sorted("/".join(p) for p in wanted - seen)
    if unknown:
        raise ValueError(f"LoRA adapters for modules the params do not have: {unknown}")
    return merged


def lora_loss(inner: Any, cfg: LoraConfig) -> Any:
    """Wrap ``inner(params, batch, rng[, *rest]) -> (loss, aux)`` as ``(adapters, batch, rng, frozen)``.

    ``frozen["base"]`` is the base model; other frozen entries are handed on as ``inner``'s extra
    argument (``frozen`` without "base"), e.g. DPO's reference params.
    """
    def loss(adapters, batch, rng, frozen):
        params = merge_lora(frozen["base"], adapters, cfg)
        rest = {k: v for k, v in frozen.items() if k != "base"}
        return inner(params, batch, rng, rest) if rest else inner(params, batch, rng)

    return loss


__all__ = ["DEFAULT_TARGETS", "LoraConfig", "init_lora", "lora_loss", "merge_lora", "target_kernels"]
