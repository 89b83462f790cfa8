"""Text frontend: the CosyVoice3 tokenizer and upstream's text_normalize / split_paragraph rules.

References: transformers' ``AutoTokenizer`` + ``add_special_tokens`` (what upstream runs) for the token
ids, on the committed tiny release tokenizer in both file layouts; ``inflect`` itself for number
spelling; the rules of ``cosyvoice/utils/frontend_utils.py`` restated per test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata

import pytest

from cosyjax.frontend.text import (
    MAX_SEGMENT, MERGE_SEGMENT, MIN_SEGMENT, TextError, TextNormalizer, contains_chinese, has_markup,
    is_only_punctuation, remove_blanks, script_of, split_paragraph, split_sentences, wetext_available,
)
from cosyjax.frontend.tokenizer import (
    CV3_ADDITIONAL_SPECIAL_TOKENS, ENDOFPROMPT, QWEN_ENDOFPROMPT_ID, CosyVoice3Tokenizer, TokenizerError,
)

DATA = os.path.join(os.path.dirname(__file__), "data")
RELEASE = os.path.join(DATA, "tiny-release")
TOKENIZER_DIR = os.path.join(RELEASE, "CosyVoice-BlankEN")

SAMPLES = [
    "",
    "Hello world",
    "You are a helpful assistant.<|endofprompt|>希望你以后能够做得比我还好哟。",
    "You are a helpful assistant. 请用广东话表达。<|endofprompt|>",
    "[breath]Hello[laughter] there<strong>again</strong> [j][ǐ] [AA1][ZH]",
    "  leading and   trailing spaces  \n\nnew lines\tand tabs ",
    "Numbers 12345 and 3.14159, e-mail a@b.c, don't you'll",
    "混合 English 和中文，带标点！？……“引号”",
    "Ａｆｕｌｌｗｉｄｔｈ e\u0301 (combining accent, NFC) 🎉 emoji",
    "<|im_start|><|im_end|><|endoftext|><|endofsystem|>[vocalized-noise]",
]


@pytest.fixture(scope="module")
def tokenizer() -> CosyVoice3Tokenizer:
    return CosyVoice3Tokenizer(TOKENIZER_DIR)


def hf_reference(tokenizer_dir: str):
    """Upstream's construction: transformers AutoTokenizer + add_special_tokens (eos/pad + the list)."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                            "additional_special_tokens": list(CV3_ADDITIONAL_SPECIAL_TOKENS)})
    return tok


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------
def test_special_token_list():
    tokens = CV3_ADDITIONAL_SPECIAL_TOKENS
    assert len(tokens) == len(set(tokens)) == 280
    assert tokens[:3] == ("<|im_start|>", "<|im_end|>", ENDOFPROMPT)
    assert tokens[19] == "<|endofsystem|>" and tokens[20] == "[AA]" and tokens[-1] == "[ǜ]"


def test_special_tokens_added_in_order(tokenizer):
    base = tokenizer.base_vocab_size
    ids = [tokenizer.token_id(t) for t in CV3_ADDITIONAL_SPECIAL_TOKENS]
    old = [i for i in ids if i < base]  # <|im_start|>, <|im_end|> are already Qwen's added tokens
    new = [i for i in ids if i >= base]
    assert len(old) == 2 and new == list(range(base, base + len(new)))
    assert len(tokenizer) == base + len(new)
    assert tokenizer.endofprompt_id == base  # as 151646 follows Qwen2's 151643 + 3 added tokens
    for token in CV3_ADDITIONAL_SPECIAL_TOKENS:
        assert tokenizer.encode(token) == [tokenizer.token_id(token)], token


def test_encode_matches_transformers(tokenizer):
    reference = hf_reference(TOKENIZER_DIR)
    assert len(reference) == len(tokenizer)
    for text in SAMPLES:
        assert tokenizer.encode(text) == reference([text])["input_ids"][0], text


def test_vocab_merges_layout_matches_transformers(tmp_path):
    """Without tokenizer.json the Qwen2 pipeline is rebuilt from vocab.json + merges.txt."""
    slow_dir = tmp_path / "slow"
    slow_dir.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), slow_dir / name)
    ours = CosyVoice3Tokenizer(slow_dir)
    fast = CosyVoice3Tokenizer(TOKENIZER_DIR)
    reference = hf_reference(str(slow_dir))
    assert len(ours) == len(fast) == len(reference)
    for text in SAMPLES:
        ids = ours.encode(text)
        assert ids == reference([text])["input_ids"][0] == fast.encode(text), text


def test_encode_no_bos_eos_and_round_trip(tokenizer):
    assert tokenizer.encode("") == []
    eos = tokenizer.token_id("<|endoftext|>")
    for text in SAMPLES[1:]:
        ids = tokenizer.encode(text)
        if "<|endoftext|>" not in text:
            assert eos not in ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
    with pytest.raises(TypeError):
        tokenizer.encode(["not", "a", "string"])


def test_check_release(tokenizer, tmp_path):
    tokenizer.check_release(640)
    with pytest.raises(TokenizerError, match="only 512 rows"):
        tokenizer.check_release(512)

    def full_size(num_added: int) -> CosyVoice3Tokenizer:
        """A Qwen2-sized vocabulary: 151643 BPE entries, then ``num_added`` added special tokens."""
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
        vocab.update({f"w{i}": i for i in range(len(vocab), QWEN_ENDOFPROMPT_ID - 3)})
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        extra = [f"<|extra_{i}|>" for i in range(num_added - 3)]
        tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra])
        d = tmp_path / f"added{num_added}"
        d.mkdir()
        tok.save(str(d / "tokenizer.json"))
        return CosyVoice3Tokenizer(d)

    qwen2 = full_size(3)
    assert qwen2.endofprompt_id == QWEN_ENDOFPROMPT_ID
    qwen2.check_release(151936)
    qwen25 = full_size(22)  # Qwen2.5 adds 22 tokens, which would shift <|endofprompt|>
    with pytest.raises(TokenizerError, match="hard-codes 151646"):
        qwen25.check_release()


def test_tokenizer_bad_dirs(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        CosyVoice3Tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        CosyVoice3Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load"):
        CosyVoice3Tokenizer(tmp_path)
    only_vocab = tmp_path / "only_vocab"
    only_vocab.mkdir()
    shutil.copy(os.path.join(TOKENIZER_DIR, "vocab.json"), only_vocab / "vocab.json")
    with pytest.raises(TokenizerError, match="merges.txt"):
        CosyVoice3Tokenizer(only_vocab)


def test_added_token_id_mismatch(tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), tmp_path / name)
    with open(os.path.join(TOKENIZER_DIR, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["added_tokens_decoder"] = {str(int(k) + 5): v for k, v in config["added_tokens_decoder"].items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="tokenizer_config.json says"):
        CosyVoice3Tokenizer(tmp_path)


def test_frontend_does_not_import_torch():
    """The whole text + prompt frontend runs without importing torch or transformers."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("inflect")
    code = (
        "import sys, numpy as np\n"
        "from cosyjax.frontend import CosyVoice3Tokenizer, TextNormalizer, SpeechTokenizerONNX\n"
        f"tok = CosyVoice3Tokenizer({TOKENIZER_DIR!r})\n"
        "assert tok.encode('Hello 123 <|endofprompt|>')\n"
        "TextNormalizer(tok.encode)('I have 23 apples. 我有23个苹果。')\n"
        f"SpeechTokenizerONNX({os.path.join(RELEASE, 'speech_tokenizer_v3.onnx')!r})(np.ones(16000, np.float32))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not bad, bad[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# text normalisation
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rules(tokenizer) -> TextNormalizer:
    return TextNormalizer(tokenizer.encode, backend="rules")


def test_markup_skips_frontend(rules):
    text = "  You are a helpful assistant.<|endofprompt|>I have 23 apples (red)  \n"
    assert has_markup(text)
    assert rules(text) == [text]  # not stripped, not spelled, not split
    half = "Only <| one marker, no closing one"
    assert not has_markup(half)
    assert rules(half) != [half]


def test_language_detection():
    assert contains_chinese("abc 中 def") and not contains_chinese("abc ＡＢＣ こんにちは 한국어")


def test_zh_rules(rules):
    text = "第一行\n第二行 中文 空格 with ascii words. 括号（删除）【也删】`反引号`——破折号 a - b 结尾，、,"
    normalized, lang = rules.normalize(text)
    assert lang == "zh"
    assert normalized == "第一行第二行中文空格with ascii words。括号删除也删反引号 破折号a，b结尾。"
    assert rules.normalize("面积10m²，体积3m³")[0] == "面积10m平方，体积3m立方"


def test_remove_blanks():
    assert remove_blanks("a b 中 文 c  d") == "a b中文cd"
    assert remove_blanks(" a ") == "a"  # a missing neighbour never keeps a blank


def test_en_numbers_spelled_with_inflect(rules):
    inflect = pytest.importorskip("inflect")
    engine = inflect.engine()
    normalized, lang = rules.normalize("  I have 23 apples, 4 pears and 1000000 grapes  ")
    assert lang == "en"
    expected = "I have {} apples, {} pears and {} grapes".format(
        *(engine.number_to_words(n) for n in ("23", "4", "1000000")))
    assert normalized == expected
    assert rules.normalize("٣ cats")[0] == engine.number_to_words("3") + " cats"


def test_split_sentences_quotes():
    assert split_sentences('He said "Hi." Then left.', ".?!;:") == ['He said "Hi."', " Then left."]
    assert split_sentences("Hi!! Ok.", ".?!;:") == ["Hi!", " Ok."]  # the doubled mark is lost, as upstream
    assert split_sentences('."x.', ".") == ["x."]  # upstream crashes here (pop from empty list)


def test_split_paragraph_rules():
    sentence = "这是一个测试句子，" * 2 + "。"  # 19 characters
    text = sentence * 12
    segments = split_paragraph(text, len, "zh")
    assert "".join(segments) == text
    assert len(segments) > 1
    for segment in segments[:-1]:
        assert MIN_SEGMENT < len(segment) <= MAX_SEGMENT
    # A short tail is merged into the previous segment.
    segments = split_paragraph("长" * 70 + "。" + "短句。", len, "zh")
    assert segments == ["长" * 70 + "。短句。"]
    # A tail of >= merge_len stays a segment of its own.
    tail = "尾" * MERGE_SEGMENT + "。"
    assert split_paragraph("长" * 70 + "。" + tail, len, "zh") == ["长" * 70 + "。", tail]
    # A full stop is appended when missing; a sentence longer than max is never cut.
    assert split_paragraph("没有句号" * 30, len, "zh") == ["没有句号" * 30 + "。"]
    assert split_paragraph("no stop", lambda s: len(s.split()), "en") == ["no stop."]


def test_en_split_counts_tokens(rules, tokenizer):
    sentence = "The quick brown fox jumps over the lazy dog again and again. "
    text = (sentence * 12).strip()
    segments = rules(text)
    assert "".join(segments) == text
    lengths = [len(tokenizer.encode(s)) for s in segments]
    assert len(segments) > 1 and all(n <= MAX_SEGMENT for n in lengths[:-1]), lengths
    assert all(n > MIN_SEGMENT for n in lengths[:-1]), lengths
    # Token counts, not characters: with a 1-token-per-sentence measure nothing would be cut.
    assert split_paragraph(text, lambda s: s.count("."), "en") == [text]


def test_long_text_splits_without_loss(rules):
    sentences = [f"这是第{i}个比较长的句子，用来测试分段。" for i in range(200)]
    text = "".join(sentences)
    segments = rules(text)
    assert len(segments) > 20
    assert "".join(segments) == rules.normalize(text)[0]  # nothing truncated


def test_punctuation_only(rules):
    assert is_only_punctuation("") and is_only_punctuation("。！…“”+=$") and not is_only_punctuation(" .")
    # A punctuation-only segment of its own is dropped.
    segments = rules("长" * 70 + "。" + "…" * 25 + "。")
    assert segments == ["长" * 70 + "。"]
    for text in ("...!?", "。。。", "“”！"):
        with pytest.raises(TextError, match="nothing to speak"):
            rules(text)


def test_bad_text(rules):
    for text in ("", "   \n\t "):
        with pytest.raises(TextError, match="empty"):
            rules(text)
    with pytest.raises(TypeError):
        rules(None)
    with pytest.raises(ValueError, match="backend"):
        TextNormalizer(len, backend="ttsfrd")


@pytest.mark.skipif(not wetext_available(), reason="wetext >= 0.1 is not installed")
def test_wetext_backend(tokenizer, rules):
    normalizer = TextNormalizer(tokenizer.encode, backend="wetext")
    zh, _ = normalizer.normalize("今天是2024年3月5日，气温-3.5度。")
    assert not any(c.isdigit() for c in zh) and contains_chinese(zh)
    assert zh != rules.normalize("今天是2024年3月5日，气温-3.5度。")[0]
    en, _ = normalizer.normalize("It costs $4.50 today.")
    assert not any(c.isdigit() for c in en)
    # As wetext 0.0.4 (upstream's pin): digit-free text is not sent to the grammars at all.
    for text in ("Dr. Smith & co. arrive at noon.", "我们一起去公园散步吧，好吗？"):
        assert normalizer.normalize(text) == rules.normalize(text)


# ------------------------------------------------------------------------------------------------
# against upstream's own functions (live, when an upstream checkout is given)
# ------------------------------------------------------------------------------------------------
UPSTREAM_TEXTS = [
    "今天天气很好，我们一起去公园散步吧。你好，世界！这是一个测试。" * 6,
    "他说：“明天见。”然后走了。她问：“真的吗？”“当然。”" * 4,
    "第一行\n第二行 中文 空格 with ascii words. 括号（删除）【也删】——破折号 a - b 结尾，、,",
    "面积10m²，体积3m³。没有句号的结尾" + "长" * 90,
    "The quick brown fox jumps over the lazy dog again and again. " * 10,
    'He said "Hi." Then he left! Did he? Yes; he did: twice. "Really?" she asked.' * 3,
    "I have 23 apples, 4 pears and 1000000 grapes; 7 of them are bad",
    "Hello.”!  Hi!! Ok... fine?!",
    "こんにちは123、レキシ テキ セカイ。",  # kana and hangul: upstream's en rules (our "ja"/"ko" route)
    "안녕하세요 123개. 감사합니다!",
]


@pytest.mark.upstream
def test_rules_match_upstream(rules, tokenizer):
    """Our rules path equals upstream's text_normalize restricted to its no-normaliser branch."""
    import importlib.util

    repo = os.environ.get("COSYJAX_REFERENCE_REPO")
    if not repo:
        pytest.skip("set COSYJAX_REFERENCE_REPO to an upstream CosyVoice checkout")
    pytest.importorskip("regex")
    inflect = pytest.importorskip("inflect")
    spec = importlib.util.spec_from_file_location(
        "upstream_frontend_utils", os.path.join(repo, "cosyvoice", "utils", "frontend_utils.py"))
    up = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(up)
    engine = inflect.engine()

    def upstream(text: str) -> list[str]:  # cosyvoice/cli/frontend.py::text_normalize, text_frontend=''
        import re

        text = text.strip()
        if up.contains_chinese(text):
            text = text.replace("\n", "")
            text = up.replace_blank(text)
            text = up.replace_corner_mark(text)
            text = text.replace(".", "。").replace(" - ", "，")
            text = up.remove_bracket(text)
            text = re.sub(r"[，,、]+$", "。", text)
            texts = up.split_paragraph(text, tokenizer.encode, "zh", token_max_n=80, token_min_n=60,
                                       merge_len=20, comma_split=False)
        else:
            text = up.spell_out_number(text, engine)
            texts = up.split_paragraph(text, tokenizer.encode, "en", token_max_n=80, token_min_n=60,
                                       merge_len=20, comma_split=False)
        return [t for t in texts if not up.is_only_punctuation(t)]

    for text in UPSTREAM_TEXTS:
        assert rules(text) == upstream(text), text


# ------------------------------------------------------------------------------------------------
# script routing and normaliser failures
# ------------------------------------------------------------------------------------------------
class _FakeGrammar:
    """A stand-in wetext normaliser that records its inputs; ``fail`` makes it raise as wetext does."""

    def __init__(self, name: str, fail: type[Exception] | None = None):
        self.name, self.fail, self.calls = name, fail, []

    def normalize(self, text: str) -> str:
        self.calls.append(text)
        if self.fail is not None:
            raise self.fail()
        return text.replace("Dr.", f"<{self.name}>")


@pytest.fixture
def fake_wetext(monkeypatch):
    """Replace the wetext grammars by recording fakes (so routing is tested with or without wetext)."""
    import cosyjax.frontend.text as text_mod

    grammars = {"zh": _FakeGrammar("zh"), "en": _FakeGrammar("en")}
    monkeypatch.setattr(text_mod, "_wetext_normalizers", lambda: (grammars["zh"], grammars["en"]))
    return grammars


def test_script_of():
    assert script_of("今日は12時") == "zh"  # an ideograph first: upstream's zh path, kana or not
    assert script_of("こんにちは123") == script_of("レキシ テキ") == script_of("ｺﾝﾆﾁﾊ1") == "ja"
    assert script_of("안녕하세요 123개") == script_of("ㅎ1") == "ko"
    assert script_of("Hello 12") == script_of("Привет 1") == script_of("café") == "en"


@pytest.mark.parametrize("text, lang", [("こんにちは123", "ja"), ("ｺﾝﾆﾁﾊ 5", "ja"), ("안녕하세요 123개", "ko")])
def test_kana_and_hangul_never_reach_the_english_grammar(tokenizer, rules, fake_wetext, text, lang):
    normalizer = TextNormalizer(tokenizer.encode, backend="wetext")
    assert normalizer.normalize(text) == (rules.normalize(text)[0], lang)
    assert fake_wetext["en"].calls == [] and fake_wetext["zh"].calls == []
    # the rules path upstream takes for such text without a normaliser: digits spelled by inflect
    inflect = pytest.importorskip("inflect")
    digits = "".join(c for c in text if c.isdigit())
    assert inflect.engine().number_to_words(digits) in normalizer.normalize(text)[0]
    assert normalizer(text) == rules(text)
    # Latin text with a digit still goes to the English grammar, Chinese to the Chinese one.
    normalizer.normalize("Dr. Who 1")
    normalizer.normalize("你好1")
    assert fake_wetext["en"].calls == ["Dr. Who 1"] and fake_wetext["zh"].calls == ["你好1"]


@pytest.mark.parametrize("grammar, text", [("en", "Dr. Who has 2 cats."), ("zh", "今天是2024年。")])
def test_normaliser_failure_falls_back_to_rules_or_raises(tokenizer, rules, fake_wetext, caplog, grammar, text):
    fake_wetext[grammar].fail = AssertionError
    fallback = TextNormalizer(tokenizer.encode, backend="wetext")
    with caplog.at_level("WARNING", logger="cosyjax.frontend.text"):
        assert fallback(text) == rules(text)
    assert f"wetext's {grammar} grammar failed on {text!r} (AssertionError)" in caplog.text
    strict = TextNormalizer(tokenizer.encode, backend="wetext", errors="raise")
    with pytest.raises(TextError, match=re.escape(repr(text))) as info:
        strict.normalize(text)
    assert isinstance(info.value.__cause__, AssertionError)
    with pytest.raises(ValueError, match="errors"):
        TextNormalizer(tokenizer.encode, errors="ignore")


@pytest.mark.skipif(not wetext_available(), reason="wetext >= 0.1 is not installed")
@pytest.mark.parametrize("text", ["こんにちは123", "안녕하세요 123개", "Hello 12[laughter]", "Привет1"])
def test_real_wetext_inputs_that_break_the_english_grammar(tokenizer, rules, caplog, text):
    """The issue's inputs (and two Latin-script ones that break the English grammar the same way) give
    the rules result with the real grammars: routed around it, or caught and logged."""
    normalizer = TextNormalizer(tokenizer.encode, backend="wetext")
    with caplog.at_level("WARNING", logger="cosyjax.frontend.text"):
        assert normalizer(text) == rules(text)
    routed = script_of(text) in ("ja", "ko")
    assert ("grammar failed" in caplog.text) != routed, caplog.text


@pytest.mark.skipif(not wetext_available(), reason="wetext >= 0.1 is not installed")
def test_english_wetext_normalises_the_whole_text_when_it_holds_a_digit(tokenizer, rules):
    """As upstream's pinned wetext 0.0.4: digit-free text is left alone, text with a digit is normalised
    as a whole (the reference is wetext's own English grammar)."""
    from wetext import Normalizer

    english = Normalizer(lang="en", operator="tn")
    normalizer = TextNormalizer(tokenizer.encode, backend="wetext")
    text = "Dr. Smith has 3 cats."
    assert normalizer.normalize(text) == (english.normalize(text), "en")
    assert normalizer.normalize(text)[0].startswith("doctor Smith")
    assert normalizer.normalize("Dr. Smith") == rules.normalize("Dr. Smith") == ("Dr. Smith", "en")
