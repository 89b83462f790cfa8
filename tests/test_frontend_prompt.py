"""ONNX speech tokenizer / speaker encoder wrappers, prompt extraction + alignment + cache, and the
committed tiny release (``tools/make_tiny_release.py``).

The tiny ONNX graphs compute simple known functions (see the script's docstring); the wrapper tests
recompute those functions in numpy from the graphs' own initializers, so they check that the wrappers
feed the right features, layouts and lengths. All audio is synthesised here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os

import numpy as np
import pytest
import soundfile

from cosyjax.config import load_model_config
from cosyjax.frontend import (
    AudioError, OnnxModelError, PromptError, PromptFeatures, SpeakerEncoderONNX, SpeechTokenizerONNX,
    align_prompt, extract_prompt, load_audio, prompt_mel, resample, spk_fbank, whisper_log_mel,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(REPO, "tests", "data", "tiny-release")
SPEECH_ONNX = os.path.join(RELEASE, "speech_tokenizer_v3.onnx")
CAMPPLUS_ONNX = os.path.join(RELEASE, "campplus.onnx")

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402


@pytest.fixture(scope="module")
def cfg():
    return load_model_config(RELEASE)


@pytest.fixture(scope="module")
def speech_tokenizer():
    return SpeechTokenizerONNX(SPEECH_ONNX)


@pytest.fixture(scope="module")
def speaker_encoder():
    return SpeakerEncoderONNX(CAMPPLUS_ONNX)


def speech_like(sr: int, seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced-speech-like test signal: gliding harmonics with a syllable envelope, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    f0 = 120 + 40 * np.sin(2 * np.pi * 2.3 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t) ** 2
    return (0.2 * voiced * envelope + 0.005 * rng.standard_normal(t.size)).astype(np.float32)


def write_wav(path, wav: np.ndarray, sr: int, subtype: str = "PCM_16") -> str:
    soundfile.write(str(path), wav, sr, subtype=subtype)
    return str(path)


def initializers(path: str) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def numpy_logits(feats: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """The tiny speech tokenizer's function before its argmax, in float64: remove the utterance mean,
    4-frame mean (ceil mode), projection -> [ceil(T/4), V]."""
    num_mels, frames = feats.shape
    feats = feats.astype(np.float64) - feats.mean(axis=1, keepdims=True, dtype=np.float64)
    pooled = np.stack([feats[:, i:i + 4].mean(axis=1) for i in range(0, frames, 4)])  # [ceil(T/4), M]
    return pooled @ proj.astype(np.float64)


def tokenizer_logit_error_bound(feats: np.ndarray, proj: np.ndarray, u: float = 2.0 ** -24) -> np.ndarray:
    """Per-logit bound [ceil(T/4), V] on the tiny tokenizer graph's float32 logits minus the exact ones.

    The graph (tools/make_tiny_release.py) sums T frames and divides (the mean is off by gamma(T)
    mean|f| + u |mean|), subtracts (u |c|), averages 4 frames (gamma(6) mean|c| with the division),
    and takes a 128-term dot product (gamma(128) sum |p| |W|, plus the pooled errors times |W|);
    gamma(n) = n u / (1 - n u), valid for any summation order.
    """
    def gamma(n):
        return n * u / (1 - n * u)

    f = feats.astype(np.float64)
    num_mels, frames = f.shape
    mean = f.mean(axis=1, keepdims=True)
    centered = np.abs(f - mean)  # [M, T]
    mean_err = gamma(frames) * np.abs(f).mean(axis=1) + u * np.abs(mean[:, 0])  # [M]
    window_abs = np.stack([centered[:, i:i + 4].mean(axis=1) for i in range(0, frames, 4)])  # [T4, M]
    pooled_err = mean_err[None, :] + gamma(6) * window_abs
    w = np.abs(proj.astype(np.float64))
    return pooled_err @ w + gamma(num_mels) * window_abs @ w


# ------------------------------------------------------------------------------------------------
# ONNX wrappers
# ------------------------------------------------------------------------------------------------
def test_speech_tokenizer_wrapper(speech_tokenizer, cfg):
    wav = speech_like(16000, 1.37)
    tokens = speech_tokenizer(wav)
    feats = whisper_log_mel(wav)
    assert tokens.dtype == np.int64 and tokens.shape == (math.ceil(feats.shape[1] / 4),)
    assert 0 <= tokens.min() and tokens.max() < cfg.flow.vocab_size
    assert len(set(tokens.tolist())) > 3  # not a constant
    proj = initializers(SPEECH_ONNX)["proj"]
    logits = numpy_logits(feats, proj)
    expected = np.argmax(logits, axis=-1)
    # float32 ORT vs float64 numpy may only differ where two logits tie within the graph's float32
    # error: ORT's pick a beats the exact argmax b only if logit_b - logit_a <= err_a + err_b.
    bound = tokenizer_logit_error_bound(feats, proj)
    frames = np.flatnonzero(tokens != expected)
    gaps = [(int(t), logits[t, expected[t]] - logits[t, tokens[t]], bound[t, expected[t]] + bound[t, tokens[t]])
            for t in frames]
    assert all(gap <= allowed for _, gap, allowed in gaps), gaps
    np.testing.assert_array_equal(speech_tokenizer(wav), tokens)  # deterministic


def test_speech_tokenizer_uses_lengths(speech_tokenizer):
    """The wrapper passes T as the length: a shorter length masks frames and changes the tokens."""
    feats = whisper_log_mel(speech_like(16000, 1.0))
    session = speech_tokenizer._session
    names = [i.name for i in session.get_inputs()]
    full = session.run(None, {names[0]: feats[None], names[1]: np.array([feats.shape[1]], np.int32)})[0]
    short = session.run(None, {names[0]: feats[None], names[1]: np.array([feats.shape[1] // 2], np.int32)})[0]
    np.testing.assert_array_equal(speech_tokenizer.tokens_from_features(feats), full.reshape(-1))
    assert not np.array_equal(full, short)


def test_speaker_encoder_wrapper(speaker_encoder, cfg):
    wav = speech_like(16000, 1.1, seed=3)
    embedding = speaker_encoder(wav)
    assert embedding.dtype == np.float32 and embedding.shape == (cfg.flow.spk_embed_dim,)
    params = initializers(CAMPPLUS_ONNX)
    feats = spk_fbank(wav).astype(np.float64)
    expected = np.tanh(feats @ params["weight"] + params["bias"]).mean(axis=0)
    np.testing.assert_allclose(embedding, expected, atol=2e-6)
    other = speaker_encoder(speech_like(16000, 1.1, seed=4) * 0.5)
    assert not np.allclose(embedding, other)


def renamed_model(src: str, dst, rename: dict[str, str], output_int64: bool = False) -> str:
    """A copy of an ONNX graph with other input names (and optionally an int64 token output)."""
    model = onnx.load(src)
    for value in list(model.graph.input):
        if value.name in rename:
            value.name = rename[value.name]
    for node in model.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        if output_int64 and node.op_type == "Cast" and node.output[0] == model.graph.output[0].name:
            node.attribute[0].i = onnx.TensorProto.INT64
    if output_int64:
        model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.INT64
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return str(dst)


def test_input_names_come_from_the_session(tmp_path, speech_tokenizer, speaker_encoder):
    wav = speech_like(16000, 0.8, seed=5)
    other = SpeechTokenizerONNX(renamed_model(SPEECH_ONNX, tmp_path / "st.onnx",
                                              {"feats": "x", "feats_length": "x_len"}, output_int64=True))
    np.testing.assert_array_equal(other(wav), speech_tokenizer(wav))
    other = SpeakerEncoderONNX(renamed_model(CAMPPLUS_ONNX, tmp_path / "cp.onnx", {"feats": "speech"}))
    np.testing.assert_array_equal(other(wav), speaker_encoder(wav))


def test_onnx_bad_inputs(tmp_path, speech_tokenizer, speaker_encoder):
    with pytest.raises(OnnxModelError, match="not found"):
        SpeechTokenizerONNX(tmp_path / "missing.onnx")
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(OnnxModelError, match="cannot load"):
        SpeakerEncoderONNX(tmp_path / "corrupt.onnx")
    with pytest.raises(OnnxModelError, match="expected 2 input"):
        SpeechTokenizerONNX(CAMPPLUS_ONNX)  # the speaker encoder has one input
    with pytest.raises(OnnxModelError, match="not available"):
        SpeechTokenizerONNX(SPEECH_ONNX, providers=["NoSuchExecutionProvider"])
    with pytest.raises(ValueError, match="longer than the 30 s"):
        speech_tokenizer(np.zeros(16000 * 30 + 16, np.float32))
    with pytest.raises(ValueError, match="mono"):
        speech_tokenizer(np.zeros((2, 16000), np.float32))
    with pytest.raises(ValueError, match="no 10 ms frame"):
        speech_tokenizer(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="mono"):
        speaker_encoder(np.zeros((16000, 1), np.float32))
    with pytest.raises(ValueError, match="features"):
        speaker_encoder.embedding_from_features(np.zeros((0, 80), np.float32))


# ------------------------------------------------------------------------------------------------
# prompt extraction
# ------------------------------------------------------------------------------------------------
def extract(source, cfg, speech_tokenizer, speaker_encoder, **kwargs) -> PromptFeatures:
    kwargs.setdefault("token_mel_ratio", cfg.flow.token_mel_ratio)
    return extract_prompt(source, speech_tokenizer=speech_tokenizer, speaker_encoder=speaker_encoder,
                          mel_cfg=cfg.mel, **kwargs)


def test_extract_prompt_separate_loads_and_alignment(tmp_path, cfg, speech_tokenizer, speaker_encoder):
    path = write_wav(tmp_path / "prompt.wav", speech_like(22050, 2.3), 22050)
    raw = extract(path, cfg, speech_tokenizer, speaker_encoder, align=False)
    wav16k, wav24k = load_audio(path, 16000), load_audio(path, cfg.mel.sampling_rate)
    np.testing.assert_array_equal(raw.speech_tokens, speech_tokenizer(wav16k))
    np.testing.assert_array_equal(raw.embedding, speaker_encoder(wav16k))
    np.testing.assert_array_equal(raw.prompt_mel, prompt_mel(wav24k, cfg.mel))
    # The 24 kHz mel comes from the file, not from the 16 kHz signal (SPEC §10.12).
    from_16k = prompt_mel(resample(wav16k, 16000, cfg.mel.sampling_rate), cfg.mel)
    assert np.abs(from_16k[: len(raw.prompt_mel)] - raw.prompt_mel).max() > 1e-2
    assert raw.sample_rate == cfg.mel.sampling_rate and not raw.aligned

    ratio = cfg.flow.token_mel_ratio
    aligned = extract(path, cfg, speech_tokenizer, speaker_encoder)
    n = min(raw.prompt_mel.shape[0] // ratio, raw.speech_tokens.shape[0])
    assert aligned.aligned and aligned.speech_tokens.shape == (n,)
    assert aligned.prompt_mel.shape == (ratio * n, cfg.mel.num_mels)
    np.testing.assert_array_equal(aligned.speech_tokens, raw.speech_tokens[:n])
    np.testing.assert_array_equal(aligned.prompt_mel, raw.prompt_mel[: ratio * n])
    np.testing.assert_array_equal(aligned.embedding, raw.embedding)
    # This prompt really needs trimming (ceil(T/4) tokens vs T/2 mel frames at the two rates).
    assert raw.speech_tokens.shape[0] * ratio != raw.prompt_mel.shape[0]


def test_alignment_ratio_from_config():
    tokens = np.arange(10)
    mel = np.zeros((25, 80), np.float32)
    t3, m3 = align_prompt(tokens, mel, 3)
    assert t3.shape == (8,) and m3.shape == (24, 80)
    t2, m2 = align_prompt(tokens, mel, 2)
    assert t2.shape == (10,) and m2.shape == (20, 80)
    with pytest.raises(PromptError, match="too short"):
        align_prompt(tokens, mel[:1], 2)


def test_extract_prompt_sources_agree(tmp_path, cfg, speech_tokenizer, speaker_encoder):
    wav = speech_like(24000, 1.2, seed=7)
    path = write_wav(tmp_path / "p.wav", wav, 24000, subtype="FLOAT")
    from_path = extract(path, cfg, speech_tokenizer, speaker_encoder)
    with open(path, "rb") as f:
        data = f.read()
    from_bytes = extract(data, cfg, speech_tokenizer, speaker_encoder)
    from_file = extract(io.BytesIO(data), cfg, speech_tokenizer, speaker_encoder)
    from_array = extract((wav, 24000), cfg, speech_tokenizer, speaker_encoder)
    for other in (from_bytes, from_file, from_array):
        np.testing.assert_array_equal(other.speech_tokens, from_path.speech_tokens)
        np.testing.assert_array_equal(other.embedding, from_path.embedding)
        np.testing.assert_array_equal(other.prompt_mel, from_path.prompt_mel)


def test_prompt_cache_round_trip(tmp_path, cfg, speech_tokenizer, speaker_encoder):
    features = extract((speech_like(16000, 1.5, seed=2), 16000), cfg, speech_tokenizer, speaker_encoder)
    path = tmp_path / "voice.npz"
    features.save(path)
    features.save(path)  # overwriting is fine
    assert sorted(os.listdir(tmp_path)) == ["voice.npz"]  # no temp file left behind
    loaded = PromptFeatures.load(path)
    for name in ("speech_tokens", "embedding", "prompt_mel"):
        a, b = getattr(loaded, name), getattr(features, name)
        assert a.dtype == b.dtype and not a.flags.writeable
        np.testing.assert_array_equal(a, b)
    assert (loaded.sample_rate, loaded.token_mel_ratio, loaded.aligned) == (
        features.sample_rate, features.token_mel_ratio, True)
    with pytest.raises(PromptError, match="not found"):
        PromptFeatures.load(tmp_path / "missing.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PromptError, match="cannot read"):
        PromptFeatures.load(tmp_path / "corrupt.npz")
    np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
    with pytest.raises(PromptError, match="missing"):
        PromptFeatures.load(tmp_path / "foreign.npz")


def test_prompt_features_validation():
    good = dict(speech_tokens=np.arange(4), embedding=np.ones(8), prompt_mel=np.zeros((8, 80)),
                sample_rate=24000, token_mel_ratio=2, aligned=True)
    PromptFeatures(**good)
    for change, match in ((dict(prompt_mel=np.zeros((7, 80))), "aligned"),
                          (dict(speech_tokens=np.array([], np.int64)), "speech_tokens"),
                          (dict(speech_tokens=np.array([-1, 2, 3, 4])), "negative"),
                          (dict(embedding=np.full(8, np.nan)), "embedding"),
                          (dict(prompt_mel=np.zeros(8)), "prompt_mel")):
        with pytest.raises(PromptError, match=match):
            PromptFeatures(**{**good, **change})


def test_extract_prompt_bad_audio(tmp_path, cfg, speech_tokenizer, speaker_encoder):
    def run(source, **kwargs):
        return extract(source, cfg, speech_tokenizer, speaker_encoder, **kwargs)

    with pytest.raises(AudioError, match="no such audio file"):
        run(str(tmp_path / "missing.wav"))
    with pytest.raises(AudioError, match="silent"):
        run(write_wav(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000))
    with pytest.raises(AudioError, match="shorter"):
        run(write_wav(tmp_path / "short.wav", speech_like(16000, 0.05), 16000))
    with pytest.raises(AudioError, match="longer"):
        run((speech_like(16000, 30.5), 16000))
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    with pytest.raises(AudioError, match="cannot decode"):
        run(str(corrupt))
    with pytest.raises(PromptError, match="mono"):
        run((np.zeros((2, 16000), np.float32), 16000))
    with pytest.raises(PromptError, match="sample rate"):
        run((speech_like(16000, 1.0), 0))
    with pytest.raises(PromptError, match="token_mel_ratio"):
        run((speech_like(16000, 1.0), 16000), token_mel_ratio=0)
    with pytest.raises(PromptError, match="mel_cfg"):
        extract_prompt((speech_like(16000, 1.0), 16000), speech_tokenizer=speech_tokenizer,
                       speaker_encoder=speaker_encoder, mel_cfg=None, token_mel_ratio=2)


# ------------------------------------------------------------------------------------------------
# the committed tiny release
# ------------------------------------------------------------------------------------------------
def _script():
    path = os.path.join(REPO, "tools", "make_tiny_release.py")
    spec = importlib.util.spec_from_file_location("make_tiny_release", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digests(root: str) -> dict[str, str]:
    out = {}
    for directory, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".cosyjax"]  # a conversion cache made by using the release
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_tiny_release_is_reproducible(tmp_path):
    """Rerunning the script reproduces the committed directory byte for byte."""
    for module in ("torch", "transformers", "safetensors", "tokenizers"):
        pytest.importorskip(module)
    script = _script()
    summary = script.build(os.path.join(REPO, "tests", "data", "tiny-a", "model"), str(tmp_path / "release"), seed=0)
    assert _digests(str(tmp_path / "release")) == _digests(RELEASE)
    assert sum(os.path.getsize(os.path.join(RELEASE, p)) for p in _digests(RELEASE)) < 3_000_000
    assert summary["tokenizer_size"] <= summary["text_vocab_size"]["release"]


def test_tiny_release_consistency(cfg):
    """Unchanged stage files; grown text embedding keeps the source rows; tokenizer fits the LLM."""
    pytest.importorskip("torch")
    from cosyjax.convert.common import load_state_dict
    from cosyjax.frontend import CosyVoice3Tokenizer

    source = os.path.join(REPO, "tests", "data", "tiny-a", "model")
    for name in ("flow.pt", "hift.pt", "cosyvoice3.yaml"):
        with open(os.path.join(source, name), "rb") as a, open(os.path.join(RELEASE, name), "rb") as b:
            assert a.read() == b.read(), name
    old, new = load_state_dict(os.path.join(source, "llm.pt")), load_state_dict(os.path.join(RELEASE, "llm.pt"))
    assert list(old) == list(new)
    tool = _script()
    for key in old:
        if key == "llm_decoder.weight":
            np.testing.assert_array_equal(new[key], tool.speaking_decoder(old[key], cfg.llm.speech_token_size))
        elif key.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert new[key].shape == (cfg.llm.vocab_size, old[key].shape[1])
            np.testing.assert_array_equal(new[key][: old[key].shape[0]], old[key])
        else:
            np.testing.assert_array_equal(new[key], old[key])
    tokenizer = CosyVoice3Tokenizer(os.path.join(RELEASE, "CosyVoice-BlankEN"))
    tokenizer.check_release(cfg.llm.vocab_size)
    assert tokenizer.endofprompt_id == tokenizer.base_vocab_size
