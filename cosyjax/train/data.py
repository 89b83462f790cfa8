"""Upstream's prepared training data, read as it is, processed on the host into fixed-shape batches.

Format (``tools/make_parquet_list.py`` upstream): ``data.list`` names parquet shards, one a line;
each shard has one row per utterance with the columns

    utt (str), audio_data (bytes of the audio file), wav (str, its original path), text (str),
    spk (str), utt_embedding (list[float]), spk_embedding (list[float]),
    speech_token (list[int]), optional instruct (str), optional reject_speech_token (list[int], DPO)

Processing, in upstream's order (``data_pipeline`` of ``examples/libritts/cosyvoice3/conf/cosyvoice3.yaml``,
``cosyvoice/dataset/processor.py``):

1. shards: the list is shuffled per epoch and split over data ranks ``shards[rank::world]`` (upstream's
   ``DistributedSampler``; repeated when there are fewer shards than ranks);
2. tokenize ``text`` (and ``instruct``) with the release's tokenizer;
3. filter: decode ``audio_data`` (channels averaged), drop rows whose duration in 10 ms frames is
   outside ``[min_length, max_length]``, whose text has outside ``[token_min_length,
   token_max_length]`` tokens, with no speech tokens (or, for DPO, no rejected ones), or whose
   text-tokens-per-frame ratio is outside ``[min_output_input_ratio, max_output_input_ratio]``;
4. resample to ``resample_rate`` (rows below ``min_sample_rate`` dropped) and scale to peak 1 when
   louder;
5. speech features: the waveform padded with zeros to a multiple of ``num_frames`` samples (960, one
   25 Hz token at 24 kHz), then our mel extractor (``cosyjax.frontend.features.prompt_mel``, upstream's
   ``feat_extractor``).  Upstream's flow loss needs ``speech_feat`` frames = token_mel_ratio x tokens
   and does not enforce it; as CosyVoice2's ``compute_fbank(token_mel_ratio=2)`` did, both are cut to
   the common length (``align_prompt``).  The LLM needs no features: only their frame count is used;
6. embeddings L2-normalised (``parse_embedding(normalize=True)``); ``embedding`` is the utterance's
   or, with ``use_spk_embedding``, the speaker's;
7. shuffle (buffer of ``shuffle_size``, half yielded each time it fills), sort (buffers of
   ``sort_size`` by feature frames), dynamic batches (rows added while ``longest * rows <=
   max_frames_in_batch``) or static ones (``batch_size`` rows);
8. padding, ours: each batch is padded to a fixed shape from a small set of buckets (rows and length
   rounded up to powers of two), so the jitted step compiles at most ``#row buckets x #length buckets``
   times.  Padding rows carry no loss (LLM: no targets; flow: ``row_valid`` False).

Every random choice (shard order, shuffle, LLM bistream layouts) comes from ``numpy`` generators seeded
with (seed, epoch, rank[, batch]), so a run is deterministic given its seed, and the batches of an
epoch can be regenerated to resume mid-epoch.  ``DataConfig.from_yaml`` reads the processor arguments
from a training yaml; what the yaml does not give takes upstream's cosyvoice3.yaml values and is listed
in ``DataConfig.defaulted``.

Legend: B rows, N speech tokens, T layout length (LLM) or mel frames (flow), C mel bins.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from cosyjax.config import LLMConfig, MelConfig, Tagged, read_yaml
from cosyjax.frontend.audio import AudioError, read_audio, resample
from cosyjax.frontend.features import prompt_mel
from cosyjax.frontend.prompt import align_prompt
from cosyjax.train.losses import IGNORE_ID, prepare_llm_batch

REQUIRED_COLUMNS = ("utt", "audio_data", "text", "speech_token", "utt_embedding", "spk_embedding")
OPTIONAL_COLUMNS = ("wav", "spk", "instruct", "reject_speech_token")
MODELS = ("llm", "flow")


class DataError(ValueError):
    """Training data that cannot be read: the message names the file, row or field."""


# --------------------------------------------------------------------------------------------
# Processor arguments (upstream's yaml data pipeline)
# --------------------------------------------------------------------------------------------
# (yaml node, argument) -> upstream's examples/libritts/cosyvoice3/conf/cosyvoice3.yaml value.
UPSTREAM_DATA_CONF: dict[tuple[str, str], Any] = {
    ("filter", "max_length"): 6000, ("filter", "min_length"): 100,
    ("filter", "token_max_length"): 200, ("filter", "token_min_length"): 1,
    ("filter", "min_output_input_ratio"): 0.0005, ("filter", "max_output_input_ratio"): 1.0,
    ("resample", "resample_rate"): 24000, ("resample", "min_sample_rate"): 16000,
    ("compute_fbank", "num_frames"): 960,
    ("parse_embedding", "normalize"): True,
    ("shuffle", "shuffle_size"): 1000, ("sort", "sort_size"): 500,
    ("batch", "batch_type"): "dynamic", ("batch", "max_frames_in_batch"): 2000, ("batch", "batch_size"): 16,
    ("padding", "use_spk_embedding"): False,
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Arguments of upstream's processors (see the module docstring), plus our bucket floors.

    ``defaulted`` lists the ``node.argument`` names the yaml did not give (upstream's values used).
    """

    max_length: float = 6000
    min_length: float = 100
    token_max_length: int = 200
    token_min_length: int = 1
    min_output_input_ratio: float = 0.0005
    max_output_input_ratio: float = 1.0
    resample_rate: int = 24000
    min_sample_rate: int = 16000
    num_frames: int = 960
    normalize_embedding: bool = True
    shuffle_size: int = 1000
    sort_size: int = 500
    batch_type: str = "dynamic"
    max_frames_in_batch: int = 2000
    batch_size: int = 16
    use_spk_embedding: bool = False
    min_rows_bucket: int = 1
    min_length_bucket: int = 16
    defaulted: tuple[str, ...] = ()

    def __post_init__(self):
        if self.batch_type not in ("dynamic", "static"):
            raise DataError(f"batch.batch_type={self.batch_type!r}: expected 'dynamic' or 'static'")
        for name in ("shuffle_size", "sort_size", "max_frames_in_batch", "batch_size", "num_frames",
                     "resample_rate", "min_rows_bucket", "min_length_bucket"):
            if int(getattr(self, name)) < 1:
                raise DataError(f"{name}={getattr(self, name)!r}: expected a positive integer")

    @classmethod
    def from_yaml(cls, path: str, **overrides: Any) -> "DataConfig":
        """Read the processor nodes (``filter``, ``resample``, ...) of a training yaml; see ``defaulted``."""
        tree = read_yaml(path)
        fields = {
            ("filter", "max_length"): "max_length", ("filter", "min_length"): "min_length",
            ("filter", "token_max_length"): "token_max_length", ("filter", "token_min_length"): "token_min_length",
            ("filter", "min_output_input_ratio"): "min_output_input_ratio",
            ("filter", "max_output_input_ratio"): "max_output_input_ratio",
            ("resample", "resample_rate"): "resample_rate", ("resample", "min_sample_rate"): "min_sample_rate",
            ("compute_fbank", "num_frames"): "num_frames", ("parse_embedding", "normalize"): "normalize_embedding",
            ("shuffle", "shuffle_size"): "shuffle_size", ("sort", "sort_size"): "sort_size",
            ("batch", "batch_type"): "batch_type", ("batch", "max_frames_in_batch"): "max_frames_in_batch",
            ("batch", "batch_size"): "batch_size", ("padding", "use_spk_embedding"): "use_spk_embedding",
        }
        values, defaulted = {}, []
        for (node, arg), field in fields.items():
            given = tree.get(node)
            args = given.value if isinstance(given, Tagged) and isinstance(given.value, Mapping) else {}
            if arg in args and args[arg] is not None:
                values[field] = args[arg]
            else:
                values[field] = UPSTREAM_DATA_CONF[(node, arg)]
                defaulted.append(f"{node}.{arg}")
        values.update(overrides)
        return cls(**values, defaulted=tuple(defaulted))


# --------------------------------------------------------------------------------------------
# The list and its shards
# --------------------------------------------------------------------------------------------
def read_data_list(path: str) -> list[str]:
    """Shard paths of a ``data.list`` (relative paths are taken from the list's directory)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: data list not found")
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise DataError(f"{path}: the data list names no shard")
    shards = [n if os.path.isabs(n) else os.path.join(base, n) for n in names]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise DataError(f"{path}: {len(missing)} shard(s) not found, first {missing[0]}")
    return shards


def shard_indices(num_shards: int, rank: int, world: int, *, epoch: int, seed: int, shuffle: bool = True
                  ) -> list[int]:
    """Upstream ``DistributedSampler.sample``: shuffled per epoch, repeated to >= world, then [rank::world]."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
    order = list(range(num_shards))
    if shuffle:
        np.random.default_rng([seed, epoch, 0x5A]).shuffle(order)
    if len(order) < world:
        order = (order * math.ceil(world / len(order)))[:world]
    return order[rank::world]


def read_shard(path: str) -> Iterator[dict[str, Any]]:
    """Rows of one parquet shard as dicts (columns checked once per shard)."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for corrupt or foreign files
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
    names = set(table.schema_arrow.names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (upstream's make_parquet_list.py "
                        f"writes {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)})")
    for batch in table.iter_batches(batch_size=64):
        for row in batch.to_pylist():
            yield row


# --------------------------------------------------------------------------------------------
# Processors (upstream's order)
# --------------------------------------------------------------------------------------------
def tokenize(rows: Iterable[dict[str, Any]], tokenizer: Any) -> Iterator[dict[str, Any]]:
    """``text_token`` (and ``instruct_token``) from the release tokenizer (``encode``)."""
    for row in rows:
        row["text_token"] = tokenizer.encode(row["text"])
        if row.get("instruct") is not None:
            row["instruct_token"] = tokenizer.encode(row["instruct"])
        yield row


def filter_rows(rows: Iterable[dict[str, Any]], conf: DataConfig, *, dpo: bool = False,
                stats: dict[str, int] | None = None) -> Iterator[dict[str, Any]]:
    """Decode audio and apply upstream's length filters; ``stats`` counts the drops by reason."""
    stats = {} if stats is None else stats

    def drop(reason: str) -> None:
        stats[reason] = stats.get(reason, 0) + 1

    for row in rows:
        try:
            speech, rate = read_audio(row["audio_data"])
        except AudioError as e:
            raise DataError(f"utt {row.get('utt')!r}: audio_data: {e}") from None
        row["speech"], row["sample_rate"] = speech, rate
        del row["audio_data"]
        frames = speech.shape[0] / rate * 100  # 10 ms frames, as upstream
        text_len = len(row["text_token"])
        if frames < conf.min_length or frames > conf.max_length:
            drop("duration")
        elif text_len < conf.token_min_length or text_len > conf.token_max_length:
            drop("text_tokens")
        elif not row.get("speech_token"):
            drop("no_speech_token")
        elif dpo and not row.get("reject_speech_token"):
            drop("no_reject_speech_token")
        elif frames and not conf.min_output_input_ratio <= text_len / frames <= conf.max_output_input_ratio:
            drop("text_per_frame")
        else:
            yield row


def resample_rows(rows: Iterable[dict[str, Any]], conf: DataConfig, stats: dict[str, int] | None = None
                  ) -> Iterator[dict[str, Any]]:
    """To ``resample_rate`` (rows below ``min_sample_rate`` dropped), peak-normalised when > 1."""
    stats = {} if stats is None else stats
    for row in rows:
        if row["sample_rate"] != conf.resample_rate:
            if row["sample_rate"] < conf.min_sample_rate:
                stats["sample_rate"] = stats.get("sample_rate", 0) + 1
                continue
            row["speech"] = resample(row["speech"], row["sample_rate"], conf.resample_rate)
            row["sample_rate"] = conf.resample_rate
        peak = float(np.max(np.abs(row["speech"]))) if row["speech"].size else 0.0
        if peak > 1:
            row["speech"] = row["speech"] / peak
        yield row


def compute_features(rows: Iterable[dict[str, Any]], conf: DataConfig, mel: MelConfig, *, token_mel_ratio: int,
                     need_mel: bool) -> Iterator[dict[str, Any]]:
    """``speech_feat`` [T, C] (or, without ``need_mel``, only its frame count ``feat_frames``)."""
    for row in rows:
        speech = row["speech"]
        padded = -(-speech.shape[0] // conf.num_frames) * conf.num_frames
        row["speech"] = np.pad(speech, (0, padded - speech.shape[0]))
        tokens = np.asarray(row["speech_token"], np.int64)
        frames = padded // mel.hop_size
        if need_mel:
            tokens, feat = align_prompt(tokens, prompt_mel(row["speech"], mel), token_mel_ratio)
            row["speech_feat"] = feat
            frames = feat.shape[0]
        row["speech_token"] = tokens
        row["feat_frames"] = int(frames)
        yield row


def parse_embedding(rows: Iterable[dict[str, Any]], conf: DataConfig) -> Iterator[dict[str, Any]]:
    """Float32 embeddings, L2-normalised when ``normalize_embedding``; ``embedding`` is the utterance's or,
    with ``use_spk_embedding``, the speaker's."""
    for row in rows:
        for key in ("utt_embedding", "spk_embedding"):
            v = np.asarray(row[key], np.float32)
            if v.ndim != 1 or not v.size or not np.isfinite(v).all():
                raise DataError(f"utt {row.get('utt')!r}: {key} must be a non-empty finite vector")
            if conf.normalize_embedding:
                v = v / max(float(np.linalg.norm(v)), 1e-12)  # F.normalize's eps
            row[key] = v
        row["embedding"] = row["spk_embedding" if conf.use_spk_embedding else "utt_embedding"]
        yield row


def shuffle_rows(rows: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Upstream ``shuffle``: fill a buffer of ``size``, shuffle, yield its first half; the rest at the end."""
    buf: list[Any] = []
    for row in rows:
        buf.append(row)
        if len(buf) >= size:
            rng.shuffle(buf)
            yield from buf[:size // 2]
            buf = buf[size // 2:]
    rng.shuffle(buf)
    yield from buf


def sort_rows(rows: Iterable[dict[str, Any]], size: int) -> Iterator[dict[str, Any]]:
    """Upstream ``sort``: buffers of ``size`` sorted by feature frames (stable)."""
    buf: list[dict[str, Any]] = []
    for row in rows:
        buf.append(row)
        if len(buf) >= size:
            yield from sorted(buf, key=lambda r: r["feat_frames"])
            buf = []
    yield from sorted(buf, key=lambda r: r["feat_frames"])


def batch_rows(rows: Iterable[dict[str, Any]], conf: DataConfig) -> Iterator[list[dict[str, Any]]]:
    """Upstream ``dynamic_batch`` (by padded frames) or ``static_batch``."""
    buf: list[dict[str, Any]] = []
    longest = 0
    for row in rows:
        if conf.batch_type == "static":
            buf.append(row)
            if len(buf) >= conf.batch_size:
                yield buf
                buf = []
            continue
        longest = max(longest, row["feat_frames"])
        if longest * (len(buf) + 1) > conf.max_frames_in_batch and buf:
            yield buf
            buf, longest = [row], row["feat_frames"]
        else:
            buf.append(row)
    if buf:
        yield buf


# --------------------------------------------------------------------------------------------
# Padding into buckets
# --------------------------------------------------------------------------------------------
def bucket_size(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    size = 1
    while size < max(n, minimum):
        size *= 2
    return size


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """A padded batch's static shape: ``rows`` and ``length`` (LLM layout positions or flow tokens)."""

    rows: int
    length: int

    def union(self, other: "BatchShape") -> "BatchShape":
        return BatchShape(max(self.rows, other.rows), max(self.length, other.length))


def _order(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    # upstream's padding sorts each batch by waveform length, longest first
    return sorted(rows, key=lambda r: -r["speech"].shape[0])


def llm_layout(cfg: LLMConfig, rows: Sequence[dict[str, Any]], rng: np.random.Generator, *, dpo: bool = False
               ) -> dict[str, Any]:
    """Unpadded LLM layout of a batch: per-row ids etc. (``prepare_llm_batch`` rules), with its draws.

    With ``dpo`` the layout has 2B rows, chosen then rejected (``Qwen2LM.forward_dpo``: text repeated,
    no instruct tokens), and a second, independently drawn layout for the frozen reference model, as
    upstream's reference forward draws its own bistream flags.
    """
    rows = _order(rows)
    text = [np.asarray(r["text_token"], np.int64) for r in rows]
    speech = [np.asarray(r["speech_token"], np.int64) for r in rows]
    if not dpo:
        instruct = [np.asarray(r.get("instruct_token", []), np.int64) for r in rows]
        layout = prepare_llm_batch(cfg, text, speech, instruct, rng=rng)
        return {"layout": layout, "utts": [r["utt"] for r in rows]}
    rejected = [np.asarray(r["reject_speech_token"], np.int64) for r in rows]
    both_text, both_speech = text + text, speech + rejected
    policy = prepare_llm_batch(cfg, both_text, both_speech, rng=rng)
    reference = prepare_llm_batch(cfg, both_text, both_speech, rng=rng)
    return {"layout": policy, "ref_layout": reference, "utts": [r["utt"] for r in rows]}


def _pad_llm(layout: Mapping[str, np.ndarray], shape: BatchShape, cfg: LLMConfig) -> dict[str, np.ndarray]:
    b, t = layout["ids"].shape
    out = {"ids": np.zeros((shape.rows, shape.length), np.int32),
           "is_speech": np.zeros((shape.rows, shape.length), bool),
           "targets": np.full((shape.rows, shape.length), IGNORE_ID, np.int32),
           "lengths": np.ones((shape.rows,), np.int32)}
    out["ids"][:, 0], out["is_speech"][:, 0] = cfg.sos, True  # padding rows: [sos], no target
    for key in ("ids", "is_speech", "targets"):
        out[key][:b, :t] = layout[key]
    out["lengths"][:b] = layout["lengths"]
    return out


def pad_llm_batch(item: Mapping[str, Any], shape: BatchShape, cfg: LLMConfig) -> dict[str, np.ndarray]:
    """Pad an ``llm_layout`` to ``shape``.

    Returns {"ids", "is_speech", "targets": [R, T], "lengths": [R]}; for DPO [R, 2, T] / [R, 2] (axis 1:
    chosen, rejected, so a batch split along R keeps each pair) and the same with a ``ref_`` prefix.
    """
    if "ref_layout" not in item:
        return _pad_llm(item["layout"], shape, cfg)
    out = {}
    for prefix, key in (("", "layout"), ("ref_", "ref_layout")):
        layout = item[key]
        half = layout["ids"].shape[0] // 2
        chosen = _pad_llm({k: v[:half] for k, v in layout.items()}, shape, cfg)
        rejected = _pad_llm({k: v[half:] for k, v in layout.items()}, shape, cfg)
        for k in chosen:
            out[prefix + k] = np.stack([chosen[k], rejected[k]], axis=1)
    return out


def llm_shape(item: Mapping[str, Any], conf: DataConfig) -> BatchShape:
    layouts = [item["layout"]] + ([item["ref_layout"]] if "ref_layout" in item else [])
    rows = layouts[0]["ids"].shape[0] // (2 if "ref_layout" in item else 1)
    length = max(int(layout["lengths"].max()) for layout in layouts)
    return BatchShape(bucket_size(rows, conf.min_rows_bucket), bucket_size(length, conf.min_length_bucket))


def flow_shape(rows: Sequence[dict[str, Any]], conf: DataConfig) -> BatchShape:
    length = max(len(r["speech_token"]) for r in rows)
    return BatchShape(bucket_size(len(rows), conf.min_rows_bucket), bucket_size(length, conf.min_length_bucket))


def pad_flow_batch(rows: Sequence[dict[str, Any]], shape: BatchShape, *, token_mel_ratio: int,
                   spk_embed_dim: int) -> dict[str, np.ndarray]:
    """Upstream's ``padding`` for the flow, into ``shape``: speech_token [R, N], speech_feat [R, ratio N, C], ...

    Padding rows have ``row_valid`` False (one token, no loss frames).
    """
    rows = _order(rows)
    channels = rows[0]["speech_feat"].shape[1]
    n = shape.length
    out = {"speech_token": np.zeros((shape.rows, n), np.int32),
           "speech_token_len": np.ones((shape.rows,), np.int32),
           "speech_feat": np.zeros((shape.rows, token_mel_ratio * n, channels), np.float32),
           "speech_feat_len": np.zeros((shape.rows,), np.int32),
           "embedding": np.zeros((shape.rows, spk_embed_dim), np.float32),
           "row_valid": np.zeros((shape.rows,), bool)}
    for i, r in enumerate(rows):
        tok, feat = r["speech_token"], r["speech_feat"]
        out["speech_token"][i, :len(tok)] = tok
        out["speech_token_len"][i] = len(tok)
        out["speech_feat"][i, :feat.shape[0]] = feat
        out["speech_feat_len"][i] = feat.shape[0]
        if r["embedding"].shape != (spk_embed_dim,):
            raise DataError(f"utt {r['utt']!r}: embedding has {r['embedding'].shape[0]} values, the flow "
                            f"expects spk_embed_dim={spk_embed_dim}")
        out["embedding"][i] = r["embedding"]
        out["row_valid"][i] = True
    return out


# --------------------------------------------------------------------------------------------
# One data rank's stream of batches
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Pipeline:
    """Batches of one data rank for one epoch (see the module docstring).

    Args:
      shards: parquet shard paths (``read_data_list``).
      model: "llm" or "flow".
      conf: processor arguments.
      tokenizer: ``CosyVoice3Tokenizer`` (``encode``).
      mel: the release's feature extractor config; token_mel_ratio from the flow config.
      seed: run seed.  rank / world: this data rank.  train: shuffle shards and rows (False for eval).
      dpo: read ``reject_speech_token`` and lay out DPO batches (LLM only).
      cache_rows: keep up to this many processed rows (features included) in memory, by shard, so later
        epochs skip the decoding and the mel (the processing is deterministic, so the rows are the same).
    """

    shards: Sequence[str]
    model: str
    conf: DataConfig
    tokenizer: Any
    mel: MelConfig
    token_mel_ratio: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    train: bool = True
    dpo: bool = False
    cache_rows: int = 8192
    stats: dict[str, int] = dataclasses.field(default_factory=dict)
    _cache: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model not in MODELS:
            raise DataError(f"model={self.model!r}: expected one of {MODELS}")
        if self.dpo and self.model != "llm":
            raise DataError("DPO batches are for the LLM only")

    def rows(self, epoch: int) -> Iterator[list[dict[str, Any]]]:
        """Upstream's processors up to the batch: lists of processed rows."""
        shards = [self.shards[i] for i in shard_indices(len(self.shards), self.rank, self.world, epoch=epoch,
                                                        seed=self.seed, shuffle=self.train)]
        rows: Iterable[dict[str, Any]] = (row for path in shards for row in self._shard_rows(path))
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, self.rank, 1])
            rows = shuffle_rows(rows, self.conf.shuffle_size, rng)
        rows = sort_rows(rows, self.conf.sort_size)
        return batch_rows(rows, self.conf)

    def _shard_rows(self, path: str) -> Iterator[dict[str, Any]]:
        """One shard through tokenize ... parse_embedding (from the cache when it is there)."""
        if path in self._cache:
            yield from self._cache[path]
            return
        rows: Iterable[dict[str, Any]] = read_shard(path)
        rows = tokenize(rows, self.tokenizer)
        rows = filter_rows(rows, self.conf, dpo=self.dpo, stats=self.stats)
        rows = resample_rows(rows, self.conf, self.stats)
        rows = compute_features(rows, self.conf, self.mel, token_mel_ratio=self.token_mel_ratio,
                                need_mel=self.model == "flow")
        done = []
        for row in parse_embedding(rows, self.conf):
            done.append(row)
            yield row
        if sum(len(v) for v in self._cache.values()) + len(done) <= self.cache_rows:
            self._cache[path] = done

    def batches(self, epoch: int, cfg: Any) -> Iterator[tuple[BatchShape, Any]]:
        """(bucket shape, item) per batch; ``pad(item, shape)`` pads it (a shape agreed across ranks).

        ``cfg``: the LLMConfig or FlowConfig of the model.  LLM items hold the layout drawn from
        ``default_rng([seed, epoch, rank, 2, batch_index])``, so batch k is the same whatever came before.
        """
        for index, rows in enumerate(self.rows(epoch)):
            if self.model == "llm":
                rng = np.random.default_rng([self.seed, epoch, self.rank, 2, index])
                item = llm_layout(cfg, rows, rng, dpo=self.dpo)
                yield llm_shape(item, self.conf), item
            else:
                yield flow_shape(rows, self.conf), rows

    def pad(self, item: Any, shape: BatchShape, cfg: Any) -> dict[str, np.ndarray]:
        if self.model == "llm":
            return pad_llm_batch(item, shape, cfg)
        return pad_flow_batch(item, shape, token_mel_ratio=self.token_mel_ratio, spk_embed_dim=cfg.spk_embed_dim)


__all__ = ["BatchShape", "DataConfig", "DataError", "Pipeline", "UPSTREAM_DATA_CONF", "batch_rows", "bucket_size",
           "compute_features", "filter_rows", "llm_layout", "pad_flow_batch", "pad_llm_batch", "parse_embedding",
           "read_data_list", "read_shard", "resample_rows", "shard_indices", "shuffle_rows", "sort_rows", "tokenize"]
