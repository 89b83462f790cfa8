"""``cosyjax.AutoModel``: upstream's ``AutoModel`` for CosyVoice3 releases, and the CosyVoice3 section of
upstream's ``example.py`` run through it on the committed tiny release (a copy of its calls; the prompt
is the synthetic voice of tests/conftest.py instead of ``./asset/zero_shot_prompt.wav``)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cosyjax.model import Trace
from cosyjax.pipeline import CosyVoice3

from conftest import TINY_RELEASE as RELEASE, voice_wav_bytes
from test_pipeline import FORCED_TOKENS, record_llm_inputs

SYSTEM = "You are a helpful assistant."
MARK = "<|endofprompt|>"
ZERO_SHOT_PROMPT = SYSTEM + MARK + "希望你以后能够做的比我还好呦。"


@pytest.fixture(scope="module")
def cosyvoice(tiny_converted):
    from cosyjax import AutoModel

    return AutoModel(model_dir=RELEASE, converted_dir=tiny_converted, progress=False)


@pytest.fixture(scope="module")
def asset_prompt(tmp_path_factory):
    path = tmp_path_factory.mktemp("asset") / "zero_shot_prompt.wav"
    path.write_bytes(voice_wav_bytes())
    return str(path)


def example_calls(cosyvoice, wav):
    """upstream example.py, cosyvoice3_example(): every inference call, in order, with its arguments."""
    return [
        lambda: cosyvoice.inference_zero_shot('八百标兵奔北坡，北坡炮兵并排跑，炮兵怕把标兵碰，标兵怕碰炮兵炮。',
                                              'You are a helpful assistant.<|endofprompt|>希望你以后能够做的比我还好呦。',
                                              wav, stream=False),
        lambda: cosyvoice.inference_cross_lingual('You are a helpful assistant.<|endofprompt|>[breath]因为他们那一辈人'
                                                  '[breath]在乡里面住的要习惯一点，[breath]邻居都很活络，[breath]嗯，都很熟悉。'
                                                  '[breath]', wav, stream=False),
        lambda: cosyvoice.inference_instruct2('好少咯，一般系放嗰啲国庆啊，中秋嗰啲可能会咯。',
                                              'You are a helpful assistant. 请用广东话表达。<|endofprompt|>', wav,
                                              stream=False),
        lambda: cosyvoice.inference_instruct2('收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐，'
                                              '笑容如花儿般绽放。',
                                              'You are a helpful assistant. 请用尽可能快地语速说一句话。<|endofprompt|>', wav,
                                              stream=False),
        lambda: cosyvoice.inference_zero_shot('高管也通过电话、短信、微信等方式对报道[j][ǐ]予好评。',
                                              'You are a helpful assistant.<|endofprompt|>希望你以后能够做的比我还好呦。',
                                              wav, stream=False),
        lambda: cosyvoice.inference_cross_lingual('You are a helpful assistant.<|endofprompt|>レキシ テキ セカイ ニ オイ テ ワ、'
                                                  'カコ ワ タンニ スギサッ タ モノ デ ワ ナイ、プラトン ノ イウ ゴトク ヒ ユー ガ '
                                                  'ユー デ アル。', wav, stream=False),
    ]


# What upstream's frontend hands its LLM for each call: the zero-shot/instruct2 tts texts are Chinese
# with no blank, digit, "." or bracket, so its zh normalisation leaves them as they are and each is one
# segment (<= 80 characters); texts holding <|endofprompt|> skip the frontend; instruct_text is never
# normalised; prompt_text holds the marker, so it is not normalised either.
EXPECTED = [
    ("八百标兵奔北坡，北坡炮兵并排跑，炮兵怕把标兵碰，标兵怕碰炮兵炮。", ZERO_SHOT_PROMPT),
    ("You are a helpful assistant.<|endofprompt|>[breath]因为他们那一辈人[breath]在乡里面住的要习惯一点，[breath]邻居都很活络，"
     "[breath]嗯，都很熟悉。[breath]", None),
    ("好少咯，一般系放嗰啲国庆啊，中秋嗰啲可能会咯。", "You are a helpful assistant. 请用广东话表达。<|endofprompt|>"),
    ("收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐，笑容如花儿般绽放。",
     "You are a helpful assistant. 请用尽可能快地语速说一句话。<|endofprompt|>"),
    ("高管也通过电话、短信、微信等方式对报道[j][ǐ]予好评。", ZERO_SHOT_PROMPT),
    ("You are a helpful assistant.<|endofprompt|>レキシ テキ セカイ ニ オイ テ ワ、カコ ワ タンニ スギサッ タ モノ デ ワ ナイ、"
     "プラトン ノ イウ ゴトク ヒ ユー ガ ユー デ アル。", None),
]


def test_automodel_returns_cosyvoice3(cosyvoice):
    assert isinstance(cosyvoice, CosyVoice3)
    assert cosyvoice.sample_rate == 24000 and cosyvoice.list_available_spks() == []


def test_upstream_example_cosyvoice3_section(cosyvoice, asset_prompt, monkeypatch):
    """Each call of the example gives its LLM upstream's inputs and yields float32 [1, T] audio.

    The LLM decode is replaced by fixed tokens (see ``record_llm_inputs``: the tiny random LLM decodes
    20x the text length, 230 s for these six calls on CPU); ``test_upstream_example_full_decode`` runs
    two of them through the real decode.
    """
    calls = record_llm_inputs(cosyvoice, monkeypatch)
    tok = cosyvoice.tokenizer
    samples_per_token = cosyvoice.sample_rate // cosyvoice.config.token_frame_rate
    for i, (call, (text, prompt)) in enumerate(zip(example_calls(cosyvoice, asset_prompt), EXPECTED)):
        outs = [j["tts_speech"] for j in call()]
        assert len(calls) == i + 1, "one segment per example text"
        assert calls[i]["text_ids"] == tok.encode(text), i
        if prompt is None:  # cross-lingual: no prompt text, no LLM prompt speech
            assert "prompt_text_ids" not in calls[i] and "llm_prompt_speech_tokens" not in calls[i]
        else:
            assert list(calls[i]["prompt_text_ids"]) == tok.encode(prompt), i
        assert len(outs) == 1 and isinstance(outs[0], np.ndarray) and outs[0].dtype == np.float32
        assert outs[0].shape == (1, FORCED_TOKENS.size * samples_per_token) and np.isfinite(outs[0]).all()
    # The fine-grained control and pinyin tokens reach the LLM as single special-token ids.
    assert calls[1]["text_ids"].count(tok.token_id("[breath]")) == 5
    assert tok.token_id("[j]") in calls[4]["text_ids"] and tok.token_id("[ǐ]") in calls[4]["text_ids"]


@pytest.mark.slow
def test_upstream_example_full_decode(cosyvoice, asset_prompt):
    """The pinyin hotfix and the Cantonese instruct2 calls through the real LLM decode (about 20 s)."""
    calls = example_calls(cosyvoice, asset_prompt)
    for call in (calls[2], calls[4]):
        seen = []
        original = cosyvoice.model.tts

        def traced(**kwargs):  # keep each segment's trace (the model holds none)
            seen.append(kwargs.setdefault("trace", Trace()))
            return original(**kwargs)

        cosyvoice.model.tts = traced
        try:
            audio = np.concatenate([j["tts_speech"] for j in call()], axis=1)
        finally:
            del cosyvoice.model.tts
        tokens = np.concatenate([t.flow_tokens for t in seen])
        assert tokens.size > 0
        assert audio.shape == (1, tokens.size * cosyvoice.sample_rate // cosyvoice.config.token_frame_rate)
        assert np.isfinite(audio).all() and np.abs(audio).max() <= 0.99 + 1e-6


def test_automodel_refuses_other_releases(tmp_path):
    from cosyjax import AutoModel

    for name, kind in (("cosyvoice.yaml", "CosyVoice \\(v1\\)"), ("cosyvoice2.yaml", "CosyVoice2")):
        d = tmp_path / name.split(".")[0]
        d.mkdir()
        (d / name).write_text("{}")
        with pytest.raises(TypeError, match=f"is a {kind} release"):
            AutoModel(model_dir=str(d))
    with pytest.raises(TypeError, match="no valid model type"):
        AutoModel(model_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        AutoModel(model_dir=str(tmp_path / "missing"))
    with pytest.raises(TypeError):
        AutoModel(RELEASE)  # upstream's AutoModel takes keywords only


def test_automodel_upstream_options(tiny_converted, caplog):
    from cosyjax import AutoModel

    with caplog.at_level("WARNING", logger="cosyjax.automodel"):
        model = AutoModel(model_dir=RELEASE, converted_dir=tiny_converted, progress=False, load_trt=True,
                          load_vllm=True, fp16=True, trt_concurrent=2)
    assert "load_trt=True) is ignored" in caplog.text and "load_vllm=True) is ignored" in caplog.text
    assert "fp16=True) is ignored on CPU" in caplog.text and model.model.dtype == "float32"


def test_import_cosyjax_stays_light():
    """``import cosyjax`` loads no JAX or torch; the lazily exported names load JAX but never torch."""
    code = ("import sys, cosyjax\n"
            "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'torch', 'transformers'})\n"
            "assert heavy() == [], heavy()\n"
            "from cosyjax import AutoModel, CosyVoice3, HubError, TextError\n"
            "assert heavy() == ['jax'], heavy()\n"
            "assert CosyVoice3.__module__ == 'cosyjax.pipeline' and 'CosyVoice3' in dir(cosyjax)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    import cosyjax

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        cosyjax.Nope  # noqa: B018
