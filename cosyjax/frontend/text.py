"""Text normalisation and sentence splitting (upstream ``CosyVoiceFrontEnd.text_normalize``).

Written from upstream's ``cosyvoice/cli/frontend.py::text_normalize`` and
``cosyvoice/utils/frontend_utils.py`` (SPEC §2.6). For an input string:

1. **Markup skip.** If the text contains both ``<|`` and ``|>`` (every CosyVoice3 prompt string, and
   any tts text that embeds ``<|endofprompt|>``), nothing is done: one segment, the text unchanged
   (not even stripped).
2. Otherwise the text is stripped and, if it contains a CJK ideograph (U+4E00..U+9FFF), takes the
   **zh path**: optional wetext TN; remove newlines; remove blanks except a single one between two
   ASCII non-blank characters; ``²``/``³`` -> ``平方``/``立方``; ``.`` -> ``。``; `` - `` -> ``，``; drop
   ``（）【】`` and backticks, ``——`` -> blank; trailing ``，,、`` run -> ``。``; split with character
   counts. Else the **en path**: optional wetext TN; spell every digit run with ``inflect``'s
   ``number_to_words``; split with token counts (the LLM's text tokenizer). Text with kana or hangul
   (and no ideograph) takes the en path too, as upstream, but **never reaches wetext's English
   grammar** (lang ``"ja"`` / ``"ko"``): that grammar fails with a bare ``AssertionError`` on a digit
   next to a non-Latin letter (``"こんにちは123"``, ``"안녕하세요 123개"``, also ``"Привет1"``), in
   upstream's wetext 0.0.4 as in 0.1.x (the same ``TokenParser`` assertion).
3. **Split** (``split_paragraph``, max 80, min 60, merge 20, no comma split): append a full stop if the
   text does not end with sentence punctuation; cut after each sentence punctuation mark (a closing
   ``"``/``”`` right after it stays with the sentence); greedily pack sentences, closing a segment when
   adding the next sentence would exceed ``max`` *and* the segment already exceeds ``min``; a last
   segment shorter than ``merge`` is appended to the previous one. A sentence longer than ``max`` is
   kept whole (upstream never cuts inside a sentence). Nothing is dropped except punctuation marks that
   directly follow another one (upstream's quirk: ``"Hi!!"`` -> ``"Hi!"``).
4. Segments made only of punctuation/symbols (Unicode categories P*, S*) are dropped.

Each segment is synthesised separately (one LLM -> flow -> HiFT run per segment).

Differences from upstream, on purpose:

* Empty/blank text, and text whose segments are all punctuation, raise ``ValueError`` (upstream returns
  ``[""]`` or ``[]`` and then synthesises silence or nothing).
* Upstream's ``pop()`` on an empty list crashes for text that starts with a punctuation mark followed
  by a quote (``'."abc'``); here that quote is dropped like the punctuation before it.
* ``inflect`` is given ASCII digits: a run of other Unicode digits (``str.isdigit``, e.g. ``²``
  outside Chinese text, ``٣``) is mapped through ``unicodedata.digit`` first, since inflect cannot read
  them; upstream would pass them through unchanged or fail.
* ttsfrd (upstream's first choice, a closed binary package) is not supported.
* Text with kana or hangul (and no ideograph) is not given to wetext's English grammar (upstream's
  crashes there on a digit), and a grammar that fails on other text falls back to the rules path
  (upstream's request fails with the grammar's bare ``AssertionError``).

Normaliser backends: ``"wetext"`` uses the ``wetext`` package (>= 0.1, which bundles its FSTs in the
wheel and works offline; upstream pins 0.0.4, which downloads the FSTs from ModelScope at first use and
cannot run offline). As wetext 0.0.4 does, it is only applied to text that contains a digit, and
with the language fixed by our own zh/en decision (0.1.x would otherwise also rewrite digit-free
English and would send a digits-only string to its Chinese grammar). ``"rules"`` uses the rule-based
path only (upstream's behaviour when no normaliser is installed). ``"auto"`` (default) picks wetext
when a usable version imports, else rules.

Why digit-free English is not normalised (``"Dr. Smith"`` stays, ``"Dr. Smith has 3 cats."`` becomes
``"doctor Smith has three cats."``): upstream's frontend calls ``en_tn_model.normalize(text)`` on every
English text, but its pinned wetext 0.0.4 ``Normalizer.normalize`` returns the text unchanged unless it
holds a digit (its ``wetext.py``: ``if self.operator == "itn" or re.search(...digit...)``); only wetext
0.1.x, which upstream does not pin, rewrites every text. Doing so here would move digit-free English
away from upstream's output (``&`` -> ``and``, ``St.`` -> ``Street``, tabs and newlines -> blanks).

A normaliser that fails (an exception from the grammar) is reported as a :class:`TextError` naming the
input; with ``errors="fallback"`` (default) it is logged as a warning and that text takes the rules
path instead, with ``errors="raise"`` the ``TextError`` is raised.
"""

from __future__ import annotations

import functools
import logging
import re
import unicodedata
from typing import Callable, Literal, Sequence

MAX_SEGMENT = 80
MIN_SEGMENT = 60
MERGE_SEGMENT = 20
ZH_SENTENCE_PUNCT = ("。", "？", "！", "；", "：", "、", ".", "?", "!", ";")
EN_SENTENCE_PUNCT = (".", "?", "!", ";", ":")
COMMAS = ("，", ",")
CLOSING_QUOTES = ('"', "”")

_CJK = re.compile(r"[\u4e00-\u9fff]")
# Hiragana, katakana (+ phonetic extensions, halfwidth forms).
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
# Hangul jamo (+ compatibility, extended A/B, halfwidth) and syllables.
_HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff\uffa0-\uffdc]")
_DIGIT = re.compile(r"\d")
_TRAILING_COMMAS = re.compile(r"[，,、]+$")

Backend = Literal["auto", "wetext", "rules"]
Script = Literal["zh", "ja", "ko", "en"]

log = logging.getLogger(__name__)


class TextError(ValueError):
    """Text that cannot be synthesised (empty, nothing but punctuation) or that a normaliser failed on."""


def has_markup(text: str) -> bool:
    """Upstream skips the whole text frontend when the text holds both ``<|`` and ``|>``."""
    return "<|" in text and "|>" in text


def contains_chinese(text: str) -> bool:
    """True when the text holds a CJK unified ideograph (U+4E00..U+9FFF), upstream's zh test."""
    return _CJK.search(text) is not None


def script_of(text: str) -> Script:
    """The text's routing script: "zh" with a CJK ideograph (upstream's test, so Japanese with kanji
    stays on upstream's zh path), else "ja" with kana, "ko" with hangul, else "en"."""
    if contains_chinese(text):
        return "zh"
    if _KANA.search(text):
        return "ja"
    if _HANGUL.search(text):
        return "ko"
    return "en"


def is_only_punctuation(text: str) -> bool:
    """True for "" and for text made only of Unicode punctuation (P*) and symbols (S*)."""
    return all(unicodedata.category(c)[0] in "PS" for c in text)


def remove_blanks(text: str) -> str:
    """Drop every blank except one between two ASCII non-blank characters (upstream ``replace_blank``).

    Upstream indexes ``text[i - 1]`` (wrapping to the end at i = 0) and fails at a final blank; its
    input is stripped, so those cases cannot occur there. Here a missing neighbour counts as non-ASCII.
    """
    def keeps(c: str | None) -> bool:
        return c is not None and c.isascii() and c != " "

    out = []
    for i, c in enumerate(text):
        if c != " ":
            out.append(c)
        elif keeps(text[i - 1] if i > 0 else None) and keeps(text[i + 1] if i + 1 < len(text) else None):
            out.append(c)
    return "".join(out)


def spell_out_numbers(text: str, number_to_words: Callable[[str], str]) -> str:
    """Replace each maximal run of digits (``str.isdigit``) by ``number_to_words(run)``."""
    def ascii_digits(run: str) -> str:
        return "".join(c if c.isascii() else str(unicodedata.digit(c, 0)) for c in run)

    out, start = [], None
    for i, c in enumerate(text + "\0"):  # a non-digit sentinel closes a trailing run
        if c.isdigit():
            start = i if start is None else start
            continue
        if start is not None:
            out.append(number_to_words(ascii_digits(text[start:i])))
            start = None
        out.append(c)
    return "".join(out)[:-1]


def split_sentences(text: str, punctuation: Sequence[str]) -> list[str]:
    """Cut ``text`` after each punctuation mark; a closing quote right after the mark stays with it.

    Empty pieces are skipped, so a mark that directly follows another one is lost (upstream quirk).
    The caller makes sure the text ends with a mark, so nothing is left over.
    """
    pieces, start, i = [], 0, 0
    while i < len(text):
        if text[i] in punctuation:
            if i > start:
                pieces.append(text[start:i + 1])
            if i + 1 < len(text) and text[i + 1] in CLOSING_QUOTES:
                if pieces:
                    pieces[-1] += text[i + 1]
                start = i + 2
            else:
                start = i + 1
        i += 1
    return pieces


def split_paragraph(text: str, length: Callable[[str], int], lang: Literal["zh", "en"], *,
                    max_len: int = MAX_SEGMENT, min_len: int = MIN_SEGMENT, merge_len: int = MERGE_SEGMENT,
                    comma_split: bool = False) -> list[str]:
    """Group sentences into segments (upstream ``split_paragraph``).

    Args:
      text: normalised, non-empty text.
      length: segment length measure (characters for zh, text tokens for en).
      lang: "zh" or "en" (punctuation set and the full stop appended when missing).
      max_len, min_len, merge_len: see the module docstring.
      comma_split: also cut at commas (upstream's frontend never does).
    Returns:
      segments whose concatenation is the text (plus an appended full stop, minus doubled marks).
    """
    if not text:
        raise TextError("split_paragraph: empty text")
    punctuation = list(ZH_SENTENCE_PUNCT if lang == "zh" else EN_SENTENCE_PUNCT)
    if comma_split:
        punctuation += COMMAS
    if text[-1] not in punctuation:
        text += "。" if lang == "zh" else "."
    segments: list[str] = []
    current = ""
    for sentence in split_sentences(text, punctuation):
        if length(current + sentence) > max_len and length(current) > min_len:
            segments.append(current)
            current = ""
        current += sentence
    if current:
        if length(current) < merge_len and segments:
            segments[-1] += current
        else:
            segments.append(current)
    return segments


@functools.lru_cache(maxsize=1)
def _inflect_engine():
    try:
        import inflect
    except ImportError as e:
        raise ImportError("English number spelling needs the `inflect` package (pip install inflect)") from e
    return inflect.engine()


@functools.lru_cache(maxsize=1)
def _wetext_normalizers():
    """(zh, en) wetext normalisers, or None when no offline-capable wetext is installed."""
    try:
        from importlib.metadata import version

        major_minor = tuple(int(p) for p in version("wetext").split(".")[:2])
        if major_minor < (0, 1):
            return None  # 0.0.x fetches its FSTs from ModelScope at construction: not offline
        from wetext import Normalizer
    except Exception:  # not installed, or an unparsable version string
        return None
    return Normalizer(lang="zh", operator="tn", remove_erhua=False), Normalizer(lang="en", operator="tn")


def wetext_available() -> bool:
    """True when an offline-capable ``wetext`` (>= 0.1) is installed."""
    return _wetext_normalizers() is not None


class TextNormalizer:
    """Upstream's ``text_normalize`` for one tokenizer.

    Args:
      tokenize: text -> token ids (``CosyVoice3Tokenizer.encode``); en segments are measured in tokens.
      backend: "auto", "wetext" or "rules" (see the module docstring).
      errors: what a failing wetext grammar does: "fallback" (default) logs a warning with the
        :class:`TextError` and takes the rules path for that text; "raise" raises the ``TextError``.
    Raises:
      ImportError: backend="wetext" but no offline-capable wetext is installed.
    """

    def __init__(self, tokenize: Callable[[str], Sequence[int]], backend: Backend = "auto",
                 errors: Literal["fallback", "raise"] = "fallback"):
        if backend not in ("auto", "wetext", "rules"):
            raise ValueError(f"TextNormalizer: backend must be 'auto', 'wetext' or 'rules', got {backend!r}")
        if errors not in ("fallback", "raise"):
            raise ValueError(f"TextNormalizer: errors must be 'fallback' or 'raise', got {errors!r}")
        if backend == "wetext" and not wetext_available():
            raise ImportError("TextNormalizer(backend='wetext') needs wetext >= 0.1 (pip install 'wetext>=0.1'); "
                              "older versions download their grammars at runtime")
        if backend == "auto":
            backend = "wetext" if wetext_available() else "rules"
        self.tokenize = tokenize
        self.backend = backend
        self.errors = errors

    def _wetext(self, text: str, script: Script) -> str:
        # Kana and hangul never reach the English grammar (see the module docstring); upstream sends them there.
        if self.backend != "wetext" or script in ("ja", "ko") or not _DIGIT.search(text):
            return text
        zh, en = _wetext_normalizers()
        grammar = "zh" if script == "zh" else "en"
        try:
            return (zh if grammar == "zh" else en).normalize(text)
        except Exception as e:  # the grammars signal "no path" with bare AssertionError/RuntimeError
            detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            error = TextError(f"wetext's {grammar} grammar failed on {text[:80]!r} ({detail})")
            if self.errors == "raise":
                raise error from e
            log.warning("%s; using the rule-based normalisation for this text", error)
            return text

    def normalize(self, text: str) -> tuple[str, str]:
        """Steps 1-2 only: (normalised text, lang) with lang in {"markup", "zh", "ja", "ko", "en"}.

        "ja" and "ko" (kana or hangul, no ideograph) follow the en rules without wetext.

        Raises:
          TypeError: ``text`` is not a str.
          TextError: empty text; a failing normaliser with ``errors="raise"``.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if not text.strip():
            raise TextError("the text is empty")
        if has_markup(text):
            return text, "markup"
        text = text.strip()
        script = script_of(text)
        if script == "zh":
            text = self._wetext(text, "zh")
            text = text.replace("\n", "")
            text = remove_blanks(text)
            text = text.replace("²", "平方").replace("³", "立方")
            text = text.replace(".", "。").replace(" - ", "，")
            for mark in ("（", "）", "【", "】", "`"):
                text = text.replace(mark, "")
            text = text.replace("——", " ")
            return _TRAILING_COMMAS.sub("。", text), "zh"
        text = self._wetext(text, script)
        # inflect takes seconds to import (typeguard), so only load it when there is a number to spell.
        return spell_out_numbers(text, lambda run: _inflect_engine().number_to_words(run)), script

    def __call__(self, text: str) -> list[str]:
        """Normalise and split ``text`` into the segments that are synthesised one by one.

        Args:
          text: tts text (prompt/instruct strings with ``<|endofprompt|>`` pass through unchanged).
        Returns:
          non-empty list of segments.
        Raises:
          TypeError: ``text`` is not a str.
          TextError: empty text, nothing but punctuation, or a failing normaliser with ``errors="raise"``.
        """
        normalized, lang = self.normalize(text)
        if lang == "markup":
            return [normalized]
        if lang == "zh":
            segments = split_paragraph(normalized, len, "zh")
        else:
            segments = split_paragraph(normalized, lambda s: len(self.tokenize(s)), "en")
        segments = [s for s in segments if not is_only_punctuation(s)]
        if not segments:
            raise TextError(f"the text {text[:50]!r} holds nothing to speak (only punctuation or symbols)")
        return segments
