"""What one request may ask for, and the static sizes that follow from it.

``Limits`` bounds a request's inputs and output; ``CosyVoice3Model`` refuses requests outside them
(with the numbers), caps the LLM's output by them, and sizes the LLM's KV cache from them once, so
every request shares one decode program.  ``CosyVoice3Model.warmup`` compiles every program a
request inside the limits can reach.

Defaults: upstream's speech tokenizer takes at most 30 s of prompt; 60 s of output is about 1,500
speech tokens (a few paragraphs; longer text is split into segments by the text frontend, each one
request); the text limits are generous for one segment.
"""

from __future__ import annotations

import dataclasses
import math


CACHE_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request bounds (see the module docstring).

    Attributes:
      max_text_tokens: text tokens of one request (the LLM's ``text``).
      max_prompt_text_tokens: prompt transcript / instruction tokens.
      max_prompt_seconds: prompt audio; gives the prompt speech tokens and mel frames.
      max_output_seconds: generated speech; caps the LLM's output tokens.
      min_speed: slowest ``speed`` a request may ask for (non-stream; stretches the mel, so the
        vocoder's longest input is max_output_seconds / min_speed).  0.5 is upstream's web UI bound.
    """

    max_text_tokens: int = 400
    max_prompt_text_tokens: int = 200
    max_prompt_seconds: float = 30.0
    max_output_seconds: float = 60.0
    min_speed: float = 0.5

    def __post_init__(self):
        for name in ("max_text_tokens", "max_prompt_text_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name}={value!r}: expected a positive integer")
        for name in ("max_prompt_seconds", "max_output_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isinf(value):
                raise ValueError(f"Limits.{name}={value!r}: expected a positive number of seconds")
        speed = self.min_speed
        if not isinstance(speed, (int, float)) or isinstance(speed, bool) or not 0 < speed <= 1:
            raise ValueError(f"Limits.min_speed={speed!r}: expected a number in (0, 1]")

    def prompt_speech_tokens(self, token_rate: int) -> int:
        return int(math.ceil(self.max_prompt_seconds * token_rate))

    def output_tokens(self, token_rate: int) -> int:
        return int(math.ceil(self.max_output_seconds * token_rate))

    def prefill_tokens(self, token_rate: int) -> int:
        """Longest LLM prompt: sos + prompt text + text + task_id + prompt speech tokens."""
        return 2 + self.max_prompt_text_tokens + self.max_text_tokens + self.prompt_speech_tokens(token_rate)

    def cache_len(self, token_rate: int, prefill_bucket) -> int:
        """KV-cache slots: the longest prefill's bucket plus the longest output, rounded up.  A request of
        a cached voice holds its prefix bucket (sos + prompt text) and the rest's bucket apart, so that
        layout is counted too."""
        total = self.prefill_tokens(token_rate)
        prefix = 1 + self.max_prompt_text_tokens
        need = max(prefill_bucket(total), prefill_bucket(prefix) + prefill_bucket(total - prefix))
        need += self.output_tokens(token_rate)
        return -(-need // CACHE_MULTIPLE) * CACHE_MULTIPLE


__all__ = ["Limits"]
