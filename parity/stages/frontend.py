"""Parity of the two prompt-frontend models against onnxruntime: groups ``frontend_tokenizer`` and
``frontend_campplus`` of a case whose ``model/`` holds ``speech_tokenizer_v3.onnx`` / ``campplus.onnx``
(``tools/make_frontend_cases.py`` builds them with the released structure and random weights).

Each group converts its ONNX file with ``cosyjax.convert.frontend`` (so the converter is under test
too), draws the features from the group's ``seed`` and ``frame_lengths`` (:func:`tokenizer_inputs`,
:func:`campplus_inputs`), runs them through the Flax model in **one padded batch**, and compares with
onnxruntime run on every utterance alone as upstream does (``SpeechTokenizerONNX`` /
``SpeakerEncoderONNX``: full graph optimisation, one thread): its outputs recorded in the case by
``tools/make_frontend_cases.py`` (``tokens``/``token_lengths``, ``embedding``) and, where onnxruntime
is installed, run again now (``*_onnxruntime_now``).

Error model (float32, unit roundoff ``u = 2**-24``).  Two float32 evaluations of the same network in
different summation orders differ, to first order, by a relative ``u * sqrt(K)`` per K-term
reduction (rounding errors add like a random walk), accumulated over the ``n`` reductions in
sequence on the path to the output: ``rel = u * n * sqrt(K_max)``.

* tokens: FSQ digit ``j`` rounds ``0.999 * tanh(z_j)``, so the two runtimes can round differently
  only where ``|z_j|`` is within ``rel * z_scale_j`` of the boundary ``z* = atanh(0.5 / 0.999)``
  (``z_scale = |h| @ |W| + |b|``: the size of the terms summed into ``z``; tanh itself adds a few
  ulp).  Such a digit is a **tie**.  The group passes when token agreement is >= 99.9 % and every
  differing token has a tie in a digit that differs; ties are reported either way.
* embeddings: max |ours - ref| <= rel * max |ref| per utterance, and cosine >= 0.9999 (the issue's bar).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from cosyjax.parity.case import Case
from cosyjax.parity.compare import Comparison, compare_close
from cosyjax.parity.stages import GroupResult

USES_RELEASE = False  # the groups read model/*.onnx; check() need not convert a torch release
UNIT_ROUNDOFF = 2.0 ** -24
MIN_TOKEN_AGREEMENT = 0.999
MIN_COSINE = 0.9999
TANH_ULPS = 4  # float32 tanh of either runtime, in ulp of 1
FSQ_BOUNDARY = math.atanh(0.5 / 0.9990000128746033)


def tokenizer_inputs(seed: int, frame_lengths, n_mels: int) -> list[np.ndarray]:
    """Whisper-log-mel-sized features [n_mels, T_i] (float32, about the scale of (log10 + 4) / 4)."""
    rng = np.random.default_rng(int(seed))
    return [(0.25 + 0.5 * rng.standard_normal((n_mels, int(n)))).astype(np.float32) for n in frame_lengths]


def campplus_inputs(seed: int, frame_lengths, feat_dim: int) -> list[np.ndarray]:
    """Mean-normalised-fbank-like features [T_i, feat_dim] (zero mean over time, as ``spk_fbank``)."""
    rng = np.random.default_rng(int(seed))
    out = []
    for n in frame_lengths:
        x = 3.0 * rng.standard_normal((int(n), feat_dim))
        out.append((x - x.mean(axis=0, keepdims=True)).astype(np.float32))
    return out


def tokenizer_rel_error(cfg, max_tokens: int) -> float:
    """``u * n * sqrt(K_max)`` for the tokenizer: 2 convs, 11 reductions per block (2 LayerNorms,
    q/k/v, scores, softmax, weighted sum, out, FSMN, 2 MLP), the FSQ projection."""
    reductions = 3 + 11 * cfg.n_layer
    k_max = max(3 * cfg.n_mels, 3 * cfg.n_state, 4 * cfg.n_state, cfg.fsmn_kernel, max_tokens)
    return UNIT_ROUNDOFF * reductions * math.sqrt(k_max)


def campplus_rel_error(cfg, max_frames: int) -> float:
    """``u * n * sqrt(K_max)`` for CAM++: 12 head convs, the tdnn, per dense layer 2 convs + 2 context
    means + 2 context convs + 1 BatchNorm, per transit 2, the statistics and the dense layer."""
    reductions = 12 + 1 + 7 * sum(cfg.block_layers) + 2 * len(cfg.block_layers) + 2 + 1
    widest = max(c_in + n * cfg.growth_rate for (c_in, _), n in zip(cfg.block_channels(), cfg.block_layers))
    k_max = max(9 * cfg.m_channels, 5 * cfg.m_channels * cfg.feat_dim // 8, widest, max_frames)
    return UNIT_ROUNDOFF * reductions * math.sqrt(k_max)


def token_ties(z: np.ndarray, z_scale: np.ndarray, rel: float) -> np.ndarray:
    """[S, 8] bool: digits whose rounding either runtime could take the other way."""
    margin = rel * z_scale + TANH_ULPS * 2.0 ** -23
    return np.abs(np.abs(z) - FSQ_BOUNDARY) <= margin


def _digits(tokens: np.ndarray, levels: int, dim: int) -> np.ndarray:
    return (tokens[..., None] // levels ** np.arange(dim)) % levels


def compare_tokens(key: str, ours: list[np.ndarray], ref: list[np.ndarray], z: list[np.ndarray],
                   z_scale: list[np.ndarray], rel: float, *, levels: int, dim: int) -> Comparison:
    """Token agreement with FSQ ties (see the module doc): passes when agreement >= 99.9 % and every
    differing digit of every differing token is a tie.

    Args:
      ours, ref: per utterance [S_i] tokens.
      z, z_scale: per utterance [S_i, dim] FSQ inputs and their term sizes (ours).
      rel: the error model's relative error.
    """
    bad = [i for i, (o, r) in enumerate(zip(ours, ref)) if o.shape != r.shape]
    if bad or len(ours) != len(ref):
        return Comparison(key, False, message=f"token counts differ for utterances {bad or 'all'}")
    o, r = np.concatenate(ours), np.concatenate(ref)
    ties = token_ties(np.concatenate(z), np.concatenate(z_scale), rel)
    differ = o != r
    digit_differ = _digits(o, levels, dim) != _digits(r, levels, dim)
    unexplained = differ & ~np.all(~digit_differ | ties, axis=-1)
    agreement = 1.0 - float(differ.mean())
    passed = agreement >= MIN_TOKEN_AGREEMENT and not unexplained.any()
    first = int(np.argmax(unexplained if unexplained.any() else differ)) if differ.any() else None
    return Comparison(
        key, bool(passed), atol=1.0 - MIN_TOKEN_AGREEMENT, max_abs=float(differ.mean()), rel=float(differ.mean()),
        index=None if first is None else [first], ours_at=None if first is None else float(o[first]),
        ref_at=None if first is None else float(r[first]), shape=list(r.shape),
        message=(f"agreement {100 * agreement:.3f}% ({int(differ.sum())} of {r.size} tokens differ, "
                 f"{int(unexplained.sum())} not at an FSQ tie); {int(ties.any(axis=-1).sum())} tokens have a "
                 f"digit within the float32 tie margin (rel {rel:.2g} of |h||W|)"))


def _model_path(case: Case, name: str) -> str:
    return os.path.join(case.model_dir, name)


def _live(session_cls, path: str):
    """The onnxruntime wrapper of ``path``, or None where onnxruntime is not installed."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    return session_cls(path)


def run_tokenizer(case: Case, group: str, model: Any = None) -> GroupResult:
    """Tokens of the group's utterances (one padded batch) against onnxruntime's, recorded in the case
    (``tokens``) and, where onnxruntime is installed, run now."""
    from cosyjax.convert.frontend import SPEECH_TOKENIZER, convert_speech_tokenizer
    from cosyjax.frontend.onnx_models import SpeechTokenizerONNX
    from cosyjax.frontend.s3tokenizer import tokenize_batch

    ref_group = case.group(group)
    path = _model_path(case, SPEECH_TOKENIZER)
    cfg, params = convert_speech_tokenizer(path, n_head=int(case.meta["speech_tokenizer"]["n_head"]))
    feats = tokenizer_inputs(ref_group["seed"], ref_group["frame_lengths"], cfg.n_mels)
    ours, z, z_scale = tokenize_batch(params, feats, cfg=cfg, diagnostics=True)
    recorded = np.split(np.asarray(ref_group["tokens"]), np.cumsum(ref_group["token_lengths"])[:-1])
    rel = tokenizer_rel_error(cfg, max(len(r) for r in recorded))
    comparisons = [compare_tokens(f"{group}/tokens", ours, recorded, z, z_scale, rel, levels=cfg.fsq_levels,
                                  dim=cfg.fsq_dim)]
    live = _live(SpeechTokenizerONNX, path)
    if live is not None:
        comparisons.append(compare_tokens(f"{group}/tokens_onnxruntime_now", ours,
                                          [live.tokens_from_features(f) for f in feats], z, z_scale, rel,
                                          levels=cfg.fsq_levels, dim=cfg.fsq_dim))
    return GroupResult(outputs={f"{group}/tokens": np.concatenate(ours)}, comparisons=comparisons,
                       plots=[(f"{group} tokens", f"{group}/tokens")])


def compare_embeddings(key: str, ours: np.ndarray, ref: np.ndarray, rel: float) -> list[Comparison]:
    """[N, E] embeddings: max error within ``rel * max |ref|`` and every cosine >= 0.9999."""
    comparisons = [compare_close(key, ours, ref, rel * float(np.max(np.abs(ref))))]
    cosine = np.sum(ours * ref, axis=-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    worst = int(np.argmin(cosine))
    comparisons.append(Comparison(
        f"{key}_cosine", bool(cosine.min() >= MIN_COSINE), atol=1.0 - MIN_COSINE,
        max_abs=float(1.0 - cosine.min()), index=[worst], ours_at=float(cosine[worst]), ref_at=1.0,
        shape=[len(cosine)], message=f"min cosine {cosine.min():.9f} over {len(cosine)} utterances"))
    return comparisons


def run_campplus(case: Case, group: str, model: Any = None) -> GroupResult:
    """Embeddings of the group's utterances (one padded batch) against onnxruntime's, recorded in the
    case (``embedding``) and, where onnxruntime is installed, run now."""
    from cosyjax.convert.frontend import SPEAKER_ENCODER, convert_campplus
    from cosyjax.frontend.campplus import embed_batch
    from cosyjax.frontend.onnx_models import SpeakerEncoderONNX

    ref_group = case.group(group)
    path = _model_path(case, SPEAKER_ENCODER)
    cfg, params = convert_campplus(path)
    feats = campplus_inputs(ref_group["seed"], ref_group["frame_lengths"], cfg.feat_dim)
    ours = np.stack(embed_batch(params, feats, cfg=cfg))
    rel = campplus_rel_error(cfg, max(f.shape[0] for f in feats))
    comparisons = compare_embeddings(f"{group}/embedding", ours, np.asarray(ref_group["embedding"]), rel)
    live = _live(SpeakerEncoderONNX, path)
    if live is not None:
        now = np.stack([live.embedding_from_features(f) for f in feats])
        comparisons += compare_embeddings(f"{group}/embedding_onnxruntime_now", ours, now, rel)
    return GroupResult(outputs={f"{group}/embedding": ours}, comparisons=comparisons,
                       plots=[(f"{group} embeddings", f"{group}/embedding")])


RUNNERS = {"frontend_tokenizer": run_tokenizer, "frontend_campplus": run_campplus}
