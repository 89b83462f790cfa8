"""The training data path (cosyjax.train.data) and the synthetic dataset tool, against upstream's rules.

Upstream's format is what tools/make_parquet_list.py writes (parquet shards named in data.list; the
columns and the arrow types pandas gives its lists); its processing order and rules are
cosyvoice/dataset/processor.py's (filter, resample, compute_fbank, parse_embedding, shuffle, sort,
dynamic_batch, padding).  The expected values below are written from those rules by hand.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os

import numpy as np
import pytest

from conftest import TINY_RELEASE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    spec = importlib.util.spec_from_file_location("make_synthetic_dataset",
                                                  os.path.join(REPO, "tools", "make_synthetic_dataset.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def release():
    from cosyjax.config import load_model_config
    from cosyjax.frontend.tokenizer import CosyVoice3Tokenizer

    return load_model_config(TINY_RELEASE), CosyVoice3Tokenizer(os.path.join(TINY_RELEASE, "CosyVoice-BlankEN"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, release):
    cfg, _ = release
    tool = _tool()
    rows = tool.make_rows(12, speech_token_size=cfg.llm.speech_token_size, spk_embed_dim=cfg.flow.spk_embed_dim,
                          seed=0, language_seed=0, dpo=True, instruct=True)
    return tool.write_dataset(str(tmp_path_factory.mktemp("data") / "train"), rows, 3)


def _pipeline(dataset, release, model, **kwargs):
    from cosyjax.train.data import DataConfig, Pipeline, read_data_list

    cfg, tokenizer = release
    conf = DataConfig(max_frames_in_batch=kwargs.pop("max_frames", 300), shuffle_size=8, sort_size=4)
    return Pipeline(read_data_list(dataset), model, conf, tokenizer, cfg.mel, cfg.flow.token_mel_ratio, **kwargs)


# ---------------------------------------------------------------------------------------------
# the dataset tool writes upstream's format
# ---------------------------------------------------------------------------------------------
def test_synthetic_dataset_has_make_parquet_lists_layout_and_types(dataset, release):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile

    cfg, _ = release
    root = os.path.dirname(dataset)
    assert sorted(os.listdir(root)) == sorted(
        ["data.list", "utt2data.list", "spk2data.list"] + [f"{p}_{i:09d}.{e}" for i in range(3) for p, e in (
            ("parquet", "tar"), ("utt2parquet", "json"), ("spk2parquet", "json"))])
    with open(dataset, encoding="utf-8") as f:
        shards = f.read().splitlines()
    assert shards == [os.path.join(root, f"parquet_{i:09d}.tar") for i in range(3)]
    table = pq.read_table(shards[0])
    assert dict(zip(table.schema.names, table.schema.types)) == {
        "utt": pa.string(), "audio_data": pa.binary(), "wav": pa.string(), "text": pa.string(), "spk": pa.string(),
        "utt_embedding": pa.list_(pa.float64()), "spk_embedding": pa.list_(pa.float64()),
        "speech_token": pa.list_(pa.int64()), "instruct": pa.string(), "reject_speech_token": pa.list_(pa.int64())}
    row = table.slice(0, 1).to_pylist()[0]
    audio, rate = soundfile.read(io.BytesIO(row["audio_data"]))
    assert rate == 24000 and audio.shape == (960 * len(row["speech_token"]),)  # 40 ms per 25 Hz token
    assert len(row["speech_token"]) >= 26 and max(row["speech_token"]) < cfg.llm.speech_token_size
    assert len(row["utt_embedding"]) == cfg.flow.spk_embed_dim
    assert len(row["reject_speech_token"]) == len(row["speech_token"]) != 0
    with open(os.path.join(root, "utt2parquet_000000000.json"), encoding="utf-8") as f:
        assert json.load(f)[row["utt"]] == shards[0]


def test_missing_column_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cosyjax.train.data import DataError, read_shard

    path = str(tmp_path / "parquet_000000000.tar")
    pq.write_table(pa.table({"utt": ["a"], "text": ["hi"]}), path)
    with pytest.raises(DataError, match=r"parquet_000000000.tar: missing column\(s\) audio_data, speech_token"):
        next(read_shard(path))


# ---------------------------------------------------------------------------------------------
# upstream's processors
# ---------------------------------------------------------------------------------------------
def test_shards_are_split_over_ranks_as_upstreams_sampler():
    from cosyjax.train.data import shard_indices

    for epoch in range(3):
        parts = [shard_indices(7, r, 3, epoch=epoch, seed=0) for r in range(3)]
        assert sorted(sum(parts, [])) == list(range(7)) and [len(p) for p in parts] == [3, 2, 2]
    assert shard_indices(7, 0, 3, epoch=0, seed=0) != shard_indices(7, 0, 3, epoch=1, seed=0)  # reshuffled per epoch
    assert shard_indices(5, 0, 1, epoch=4, seed=0, shuffle=False) == [0, 1, 2, 3, 4]
    assert [shard_indices(2, r, 3, epoch=0, seed=0, shuffle=False) for r in range(3)] == [[0], [1], [0]]  # repeated
    with pytest.raises(ValueError, match="rank 3"):
        shard_indices(2, 3, 3, epoch=0, seed=0)


def _wav(seconds: float, rate: int = 24000) -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, 0.1 * np.sin(np.arange(int(seconds * rate)) * 0.05), rate, format="WAV")
    return buf.getvalue()


def test_filter_applies_upstreams_length_rules():
    from cosyjax.train.data import DataConfig, filter_rows

    conf = DataConfig()  # upstream's: 100..6000 frames of 10 ms, 1..200 text tokens, ratio in [5e-4, 1]
    rows = {"ok": (1.5, 10, [1] * 38), "short": (0.9, 10, [1] * 23), "no_text": (1.5, 0, [1] * 38),
            "long_text": (3.0, 201, [1] * 75), "no_speech": (1.5, 10, []), "dense_text": (1.2, 150, [1] * 30),
            "no_reject": (1.5, 10, [1] * 38)}
    stats: dict = {}
    kept = list(filter_rows([{"utt": k, "audio_data": _wav(s), "text_token": [5] * n, "speech_token": t,
                              "reject_speech_token": [] if k == "no_reject" else [2]}
                             for k, (s, n, t) in rows.items()], conf, dpo=True, stats=stats))
    assert [r["utt"] for r in kept] == ["ok"]
    assert stats == {"duration": 1, "text_tokens": 2, "no_speech_token": 1, "text_per_frame": 1,
                     "no_reject_speech_token": 1}


def test_dynamic_batch_is_upstreams_rule():
    """rows are added while longest * (rows + 1) <= max_frames_in_batch (processor.dynamic_batch)."""
    from cosyjax.train.data import DataConfig, batch_rows

    rows = [{"feat_frames": n} for n in (50, 60, 100, 30, 200, 10)]
    batches = list(batch_rows(rows, DataConfig(max_frames_in_batch=200)))
    assert [[r["feat_frames"] for r in b] for b in batches] == [[50, 60], [100, 30], [200], [10]]
    static = list(batch_rows(rows, DataConfig(batch_type="static", batch_size=4)))
    assert [len(b) for b in static] == [4, 2]


def test_shuffle_and_sort_buffers():
    from cosyjax.train.data import shuffle_rows, sort_rows

    out = list(shuffle_rows(list(range(10)), 4, np.random.default_rng(0)))
    assert sorted(out) == list(range(10)) and out != list(range(10))
    assert set(out[:2]) <= {0, 1, 2, 3}  # the first yield is half of the first full buffer
    rows = [{"feat_frames": n} for n in (5, 3, 9, 1, 7, 2)]
    assert [r["feat_frames"] for r in sort_rows(rows, 4)] == [1, 3, 5, 9, 2, 7]


def test_config_reads_the_yamls_processors_and_lists_the_rest():
    from cosyjax.train.data import UPSTREAM_DATA_CONF, DataConfig

    conf = DataConfig.from_yaml(os.path.join(REPO, "examples", "conf", "tiny_train.yaml"))
    assert (conf.max_frames_in_batch, conf.shuffle_size, conf.sort_size, conf.use_spk_embedding) == (600, 64, 32, True)
    assert conf.resample_rate == UPSTREAM_DATA_CONF[("resample", "resample_rate")]
    assert set(conf.defaulted) == {"filter.min_output_input_ratio", "filter.max_output_input_ratio",
                                   "resample.resample_rate", "resample.min_sample_rate", "compute_fbank.num_frames",
                                   "parse_embedding.normalize", "batch.batch_size"}
    release = DataConfig.from_yaml(os.path.join(TINY_RELEASE, "cosyvoice3.yaml"))  # an inference yaml: all upstream's
    assert len(release.defaulted) == len(UPSTREAM_DATA_CONF) and release.max_frames_in_batch == 2000


# ---------------------------------------------------------------------------------------------
# the pipeline: deterministic, bucketed, upstream's padding
# ---------------------------------------------------------------------------------------------
def _epoch(pipeline, cfg, epoch=0):
    return [(shape, pipeline.pad(item, shape, cfg)) for shape, item in pipeline.batches(epoch, cfg)]


def test_pipeline_is_deterministic_given_its_seed(dataset, release):
    cfg, _ = release
    a = _epoch(_pipeline(dataset, release, "llm", seed=3), cfg.llm)
    b = _epoch(_pipeline(dataset, release, "llm", seed=3), cfg.llm)
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    other = _epoch(_pipeline(dataset, release, "llm", seed=4), cfg.llm)
    assert any(not np.array_equal(x["ids"], y["ids"]) for (_, x), (_, y) in zip(a, other)) or len(a) != len(other)


def test_llm_batches_are_bucketed_with_inert_padding_rows(dataset, release):
    from cosyjax.train.losses import IGNORE_ID

    cfg, _ = release
    batches = _epoch(_pipeline(dataset, release, "llm"), cfg.llm)
    assert sum(int((b["targets"] != IGNORE_ID).any(axis=1).sum()) for _, b in batches) == 12  # every utterance once
    for shape, b in batches:
        assert shape.rows & (shape.rows - 1) == 0 and shape.length & (shape.length - 1) == 0  # powers of two
        assert b["ids"].shape == (shape.rows, shape.length) and int(b["lengths"].max()) <= shape.length
        real = (b["targets"] != IGNORE_ID).any(axis=1)
        pad = ~real
        assert (b["lengths"][pad] == 1).all() and (b["ids"][pad, 0] == cfg.llm.sos).all()
        speech = [int((b["targets"][i] != IGNORE_ID).sum()) for i in np.flatnonzero(real)]
        assert speech == sorted(speech, reverse=True)  # upstream's padding orders rows longest first


def test_flow_features_are_our_mel_aligned_to_the_tokens(dataset, release):
    from cosyjax.frontend.audio import read_audio
    from cosyjax.frontend.features import prompt_mel
    from cosyjax.train.data import read_data_list, read_shard

    cfg, _ = release
    pipeline = _pipeline(dataset, release, "flow")
    rows = [r for batch in pipeline.rows(0) for r in batch]
    assert len(rows) == 12
    for r in rows:
        assert r["speech_feat"].shape == (2 * len(r["speech_token"]), 80)
        assert r["feat_frames"] == r["speech_feat"].shape[0]
    raw = {row["utt"]: row for path in read_data_list(dataset) for row in read_shard(path)}
    first = rows[0]
    wav, _ = read_audio(raw[first["utt"]]["audio_data"])  # already 24 kHz and a multiple of 960 samples
    np.testing.assert_array_equal(first["speech_feat"], prompt_mel(wav, cfg.mel))
    emb = np.asarray(raw[first["utt"]]["utt_embedding"], np.float32)
    np.testing.assert_allclose(first["embedding"], emb / np.linalg.norm(emb), rtol=1e-6)  # padding: utt embedding
    for shape, b in _epoch(pipeline, cfg.flow):
        assert b["speech_feat"].shape == (shape.rows, 2 * shape.length, 80)
        valid = b["row_valid"]
        assert not b["speech_feat"][~valid].any()
        for i in np.flatnonzero(valid):
            n = int(b["speech_feat_len"][i])
            assert n == 2 * int(b["speech_token_len"][i]) and not b["speech_feat"][i, n:].any()


def test_dpo_batches_pair_chosen_and_rejected(dataset, release):
    from cosyjax.train.losses import IGNORE_ID

    cfg, _ = release
    for shape, b in _epoch(_pipeline(dataset, release, "llm", dpo=True), cfg.llm):
        for prefix in ("", "ref_"):
            assert b[prefix + "ids"].shape == (shape.rows, 2, shape.length)
            assert b[prefix + "lengths"].shape == (shape.rows, 2)
        real = (b["targets"][:, 0] != IGNORE_ID).any(axis=1)
        assert ((b["targets"][:, 1] != IGNORE_ID).any(axis=1) == real).all()
        for i in np.flatnonzero(real):  # same text before the task id / first speech chunk in both
            assert b["ids"][i, 0, 1] == b["ids"][i, 1, 1]


def test_features_are_cached_across_epochs(dataset, release):
    cfg, _ = release
    pipeline = _pipeline(dataset, release, "flow")
    first = [r["utt"] for b in pipeline.rows(0) for r in b]
    assert sum(len(v) for v in pipeline._cache.values()) == 12
    again = _pipeline(dataset, release, "flow")
    assert [r["utt"] for b in again.rows(0) for r in b] == first  # a fresh pipeline draws the same epoch
