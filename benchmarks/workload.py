"""What the benchmarks run: the configs (release dims or tiny), the request sizes and the random inputs.

Sizes follow ``--seconds`` S (default 10):

- flow: S seconds of speech, S * token_rate tokens (250), after a 1 s prompt (25 tokens, 50 frames);
- HiFT: S * mel_rate mel frames (500 -> 10 s of audio);
- e2e and stream: one zero-shot request whose text has floor(S * token_rate / 20) tokens (12), so the
  LLM runs exactly max_len = 20 * text tokens (240 -> 9.6 s) steps: the random LLM's stop logits are
  zeroed against O(6)-sized speech logits (``models.random_llm_state_dict``), so no stop id is ever
  drawn, on either side, and both generate max_len tokens;
- LLM rows: that request (and ``batch - 1`` more of the same lengths), one decode chunk of
  ``llm_steps`` = the model's stream hop (static_chunk_size / token_mel_ratio = 25) steps.

Precision (``--dtypes``): the llm, flow, hift and e2e stages run one cosyjax row per dtype of
``Workload.dtypes`` ("float32", the default, and/or "bfloat16": ``PrecisionPolicy.resolve(dtype)``), on the
same random weights (a bf16 row's params are the float32 ones cast, as ``CosyVoice3Model`` casts them) and
the same inputs; upstream runs float32 once per workload and every row's ratio is against that timing.

With these sizes the e2e request hits the same padded shapes as the flow row (token bucket 288)
and the HiFT row (mel bucket 512); its LLM decodes in the model's own KV cache (sized by its
``Limits``), not the LLM rows' 512 slots, so the e2e row still makes one warm-up call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

from cosyjax.config import FlowConfig, HiftConfig, LLMConfig, ModelConfig
from cosyjax.llm.lm import ENDOFPROMPT_ID, MAX_TOKEN_TEXT_RATIO

STAGES = ("llm", "flow", "hift", "e2e", "stream")  # --all
EXTRA_STAGES = ("hift_stream", "flow_stream", "batch", "first_chunk", "serve")  # only when named in --stages
DEFAULT_BATCH_SIZES = {"cpu": (1, 8, 32), "gpu": (1, 16, 64)}
QUICK_BATCH_SIZES = (1, 2)
# 2.4 s: the e2e request (60 tokens, 120 frames) pads to the flow and HiFT rows' buckets, as at full size
QUICK_SECONDS = 2.4
# Timed repeats after the warm-up.  The flow row takes ~55 s per side on the 2-core CPU: one repeat.
DEFAULT_REPEATS = {"cpu": {"llm": 1, "flow": 1, "hift": 3, "e2e": 1, "stream": 1},
                   "gpu": {"llm": 3, "flow": 3, "hift": 3, "e2e": 3, "stream": 3}}
PROMPT_SECONDS = 1.0  # zero-shot prompt speech (LLM and flow prompt tokens; flow prompt mel)
PROMPT_TEXT_LEN = 8  # prompt transcript tokens, the last one <|endofprompt|>
DTYPE_STAGES = ("llm", "flow", "hift", "e2e")  # the stages with a row per --dtypes entry (the rest: float32)


def parse_dtypes(text: str) -> tuple[str, ...]:
    """``--dtypes``: comma-separated precision policies ("float32", "bfloat16"), each once, in the order
    given.  ValueError naming the value otherwise ("auto" is not a row: what it picks is recorded)."""
    from cosyjax.precision import DTYPES

    names = [d.strip() for d in str(text).split(",") if d.strip()]
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        raise ValueError(f"--dtypes {text!r}: unknown dtype(s) {bad}; choose from {','.join(DTYPES)} "
                         "(what 'auto' picks is recorded in every run)")
    dup = sorted({d for d in names if names.count(d) > 1})
    if dup:
        raise ValueError(f"--dtypes {text!r}: {','.join(dup)} given twice")
    return tuple(names)


def release_config() -> ModelConfig:
    """The release's ModelConfig (the full-size manifest, read through the yaml path)."""
    from cosyjax.parity.manifest import release_config as model_config

    return model_config()


def quick_config() -> ModelConfig:
    """Tiny stage configs for a smoke run.  The text vocabulary keeps ``<|endofprompt|>``
    (upstream's CosyVoice3LM asserts it is in the text), and the speech vocabulary is the flow's."""
    flow = FlowConfig.tiny()
    llm = dataclasses.replace(LLMConfig.tiny(), vocab_size=ENDOFPROMPT_ID + 1, speech_token_size=flow.vocab_size)
    hift = HiftConfig.tiny()
    return ModelConfig(llm=llm, flow=flow, hift=hift, sample_rate=hift.sampling_rate,
                       token_frame_rate=flow.input_frame_rate)


@dataclasses.dataclass(frozen=True)
class Workload:
    """Sizes and seeds of one benchmark run (see the module docstring)."""

    config: ModelConfig
    quick: bool
    seconds: float
    batch_sizes: tuple[int, ...]
    repeats: Mapping[str, int]
    seed: int = 0
    dtypes: tuple[str, ...] = ("float32",)  # cosyjax rows of the DTYPE_STAGES, one per dtype

    # ------------------------------------------------------------------ derived sizes
    @property
    def mel_rate(self) -> float:
        """Mel frames per second of audio."""
        return self.config.hift.sampling_rate / self.config.hift.upsample_scale

    @property
    def token_rate(self) -> float:
        """Speech tokens per second of audio."""
        return self.mel_rate / self.config.flow.token_mel_ratio

    @property
    def hop(self) -> int:
        """The model's stream hop in tokens (one DiT attention chunk); also the LLM decode chunk."""
        flow = self.config.flow
        return flow.static_chunk_size // flow.token_mel_ratio

    @property
    def llm_steps(self) -> int:
        return self.hop

    @property
    def prompt_tokens(self) -> int:
        """Prompt speech tokens: PROMPT_SECONDS of speech rounded up to whole stream hops (no pad)."""
        tokens = max(1, round(PROMPT_SECONDS * self.token_rate))
        return int(math.ceil(tokens / self.hop) * self.hop)

    @property
    def prompt_text_len(self) -> int:
        return PROMPT_TEXT_LEN

    @property
    def flow_tokens(self) -> int:
        return max(1, round(self.seconds * self.token_rate))

    @property
    def hift_frames(self) -> int:
        return max(1, round(self.seconds * self.mel_rate))

    @property
    def e2e_text_len(self) -> int:
        return max(1, int(self.flow_tokens // MAX_TOKEN_TEXT_RATIO))

    @property
    def e2e_tokens(self) -> int:
        return int(self.e2e_text_len * MAX_TOKEN_TEXT_RATIO)

    def audio_seconds(self, tokens: int) -> float:
        return tokens / self.token_rate

    # ------------------------------------------------------------------ random inputs
    def llm_request(self, row: int = 0) -> dict[str, np.ndarray]:
        """Row ``row`` of the LLM/e2e zero-shot requests: text, prompt_text (ends in <|endofprompt|>),
        prompt_speech; every row has the same lengths (row 0 is the e2e request)."""
        cfg = self.config.llm
        rng = np.random.default_rng([self.seed, 1, row])
        text_hi = min(cfg.vocab_size, ENDOFPROMPT_ID)  # plain text ids, below the special ones
        prompt_text = rng.integers(0, text_hi, self.prompt_text_len)
        prompt_text[-1] = ENDOFPROMPT_ID
        return {"text": rng.integers(0, text_hi, self.e2e_text_len),
                "prompt_text": prompt_text,
                "prompt_speech": rng.integers(0, cfg.speech_token_size, self.prompt_tokens)}

    def flow_inputs(self) -> dict[str, np.ndarray]:
        """Flow row / e2e prompt: token [1, flow_tokens], prompt_token [1, P], prompt_feat [1, ratio*P, C],
        embedding [1, E] (the prompt tokens are the e2e request's LLM prompt speech)."""
        cfg = self.config.flow
        rng = np.random.default_rng([self.seed, 2])
        prompt = self.llm_request(0)["prompt_speech"][None]
        return {"token": rng.integers(0, cfg.vocab_size, (1, self.flow_tokens)),
                "prompt_token": prompt,
                "prompt_feat": rng.standard_normal((1, cfg.token_mel_ratio * prompt.shape[1], cfg.output_size)
                                                   ).astype(np.float32),
                "embedding": rng.standard_normal((1, cfg.spk_embed_dim)).astype(np.float32)}

    def hift_mel(self) -> np.ndarray:
        """[1, hift_frames, C] log-mel-like input."""
        rng = np.random.default_rng([self.seed, 3])
        c = self.config.hift.in_channels
        return (rng.standard_normal((1, self.hift_frames, c)) * 2.0 - 5.0).astype(np.float32)


def make_workload(*, quick: bool, seconds: float | None, batch_sizes: tuple[int, ...] | None,
                  repeats: int | None, backend: str, seed: int = 0,
                  dtypes: tuple[str, ...] | str | None = None) -> Workload:
    """The run's Workload; defaults depend on ``quick`` and the backend ("cpu" or a GPU platform)."""
    kind = "cpu" if backend == "cpu" else "gpu"
    dtypes = ("float32",) if dtypes is None else parse_dtypes(dtypes if isinstance(dtypes, str) else ",".join(dtypes))
    if seconds is None:
        seconds = QUICK_SECONDS if quick else 10.0
    if seconds <= 0:
        raise ValueError(f"--seconds {seconds}: must be > 0")
    if batch_sizes is None:
        batch_sizes = QUICK_BATCH_SIZES if quick else DEFAULT_BATCH_SIZES[kind]
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"--batch-sizes {batch_sizes}: expected positive integers")
    if repeats is not None and repeats < 1:
        raise ValueError(f"--repeats {repeats}: must be >= 1")
    per_stage = {s: (repeats if repeats is not None else (1 if quick else DEFAULT_REPEATS[kind][s])) for s in STAGES}
    wl = Workload(config=quick_config() if quick else release_config(), quick=quick, seconds=float(seconds),
                  batch_sizes=tuple(int(b) for b in batch_sizes), repeats=per_stage, seed=seed,
                  dtypes=dtypes)
    need = wl.hop + wl.config.flow.pre_lookahead_len
    if wl.e2e_tokens < need:
        raise ValueError(f"--seconds {seconds}: the e2e request gives {wl.e2e_tokens} tokens, fewer than the "
                         f"{need} the first stream chunk needs")
    return wl
