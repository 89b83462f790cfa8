"""CosyVoice3 text tokenizer: the release's Qwen2 BPE tokenizer plus CosyVoice3's special tokens.

Upstream (``cosyvoice/tokenizer/tokenizer.py::CosyVoice3Tokenizer``) loads
``transformers.AutoTokenizer.from_pretrained(<release>/CosyVoice-BlankEN)`` (a fast Qwen2 tokenizer),
then calls ``add_special_tokens`` with ``<|endoftext|>`` as eos/pad and the 280 additional special
tokens listed below, in this order (markup/events, then ARPAbet phones, then pinyin with tones).
``add_special_tokens`` appends every token the vocabulary does not hold yet, in list order, so the ids
depend on the base vocabulary and on the order. ``encode(text)`` is ``tokenizer([text])["input_ids"][0]``.

Why not transformers here: ``import transformers`` (4.51.3) imports torch whenever torch is installed
(``transformers/utils/chat_template_utils.py``), and nothing under ``cosyjax/`` may import torch. A
transformers fast tokenizer is a thin wrapper over the Rust ``tokenizers`` library, so we load the
same ``tokenizers.Tokenizer`` directly and replay what transformers does around it (no BPE is
reimplemented):

* ``tokenizer.json`` present: ``Tokenizer.from_file`` (what ``PreTrainedTokenizerFast`` does).
* only ``vocab.json`` + ``merges.txt``: transformers converts the slow ``Qwen2Tokenizer`` with
  ``convert_slow_tokenizer.Qwen2Converter``: byte-level BPE (no unk, no dropout), NFC normaliser,
  pre-tokenizer = Qwen2 split regex (isolated) then ByteLevel(add_prefix_space=False, use_regex=False),
  ByteLevel decoder, ByteLevel(trim_offsets=False) post-processor. We build exactly that.
* then, in both cases, every entry of ``tokenizer_config.json``'s ``added_tokens_decoder`` that is not
  in the vocabulary yet is added with its flags, at its id;
* ``add_special_tokens`` turns each string into ``AddedToken(t, lstrip=False, rstrip=False,
  normalized=False, special=True)`` and passes ``[eos] + additional`` to the Rust tokenizer's
  ``add_special_tokens`` (pad equals eos and is deduplicated);
* ``tokenizer([text])`` is ``encode_batch([text], add_special_tokens=True)`` without truncation; the
  Qwen2 post-processor adds no BOS/EOS.
``tests/test_frontend_text.py`` checks the ids against transformers' ``AutoTokenizer`` on both file
layouts.

Ids in the real release (Qwen2-0.5B vocabulary: 151643 BPE tokens, then ``<|endoftext|>`` 151643,
``<|im_start|>`` 151644, ``<|im_end|>`` 151645): ``<|endofprompt|>`` is the first token added, 151646,
and upstream's ``Qwen2LM.inference`` hard-codes that id (SPEC §2.6). :meth:`CosyVoice3Tokenizer.check_release`
asserts it for every vocabulary large enough to hold id 151646 (it would catch e.g. a Qwen2.5 tokenizer,
whose 22 extra added tokens shift it); a tiny test tokenizer (a few hundred ids, built by
``tools/make_tiny_release.py``) cannot hold that id, so for it the check is only that every id fits the
LLM's text embedding.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

ENDOFPROMPT = "<|endofprompt|>"
ENDOFTEXT = "<|endoftext|>"
QWEN_ENDOFPROMPT_ID = 151646  # hard-coded in upstream Qwen2LM.inference
# transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX (and every Qwen2 tokenizer.json)
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_MARKUP_AND_EVENT_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]", "[quick_breath]", "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]", "<|endofsystem|>",
)  # 20 tokens
_ARPABET_TOKENS = (
    "[AA]", "[AA0]", "[AA1]", "[AA2]", "[AE]", "[AE0]", "[AE1]", "[AE2]", "[AH]", "[AH0]", "[AH1]", "[AH2]",
    "[AO]", "[AO0]", "[AO1]", "[AO2]", "[AW]", "[AW0]", "[AW1]", "[AW2]", "[AY]", "[AY0]", "[AY1]", "[AY2]",
    "[B]", "[CH]", "[D]", "[DH]", "[EH]", "[EH0]", "[EH1]", "[EH2]", "[ER]", "[ER0]", "[ER1]", "[ER2]", "[EY]",
    "[EY0]", "[EY1]", "[EY2]", "[F]", "[G]", "[HH]", "[IH]", "[IH0]", "[IH1]", "[IH2]", "[IY]", "[IY0]",
    "[IY1]", "[IY2]", "[JH]", "[K]", "[L]", "[M]", "[N]", "[NG]", "[OW]", "[OW0]", "[OW1]", "[OW2]", "[OY]",
    "[OY0]", "[OY1]", "[OY2]", "[P]", "[R]", "[S]", "[SH]", "[T]", "[TH]", "[UH]", "[UH0]", "[UH1]", "[UH2]",
    "[UW]", "[UW0]", "[UW1]", "[UW2]", "[V]", "[W]", "[Y]", "[Z]", "[ZH]",
)  # 84 tokens
_PINYIN_TOKENS = (
    "[a]", "[ai]", "[an]", "[ang]", "[ao]", "[b]", "[c]", "[ch]", "[d]", "[e]", "[ei]", "[en]", "[eng]", "[f]",
    "[g]", "[h]", "[i]", "[ian]", "[in]", "[ing]", "[iu]", "[ià]", "[iàn]", "[iàng]", "[iào]", "[iá]", "[ián]",
    "[iáng]", "[iáo]", "[iè]", "[ié]", "[iòng]", "[ióng]", "[iù]", "[iú]", "[iā]", "[iān]", "[iāng]", "[iāo]",
    "[iē]", "[iě]", "[iōng]", "[iū]", "[iǎ]", "[iǎn]", "[iǎng]", "[iǎo]", "[iǒng]", "[iǔ]", "[j]", "[k]",
    "[l]", "[m]", "[n]", "[o]", "[ong]", "[ou]", "[p]", "[q]", "[r]", "[s]", "[sh]", "[t]", "[u]", "[uang]",
    "[ue]", "[un]", "[uo]", "[uà]", "[uài]", "[uàn]", "[uàng]", "[uá]", "[uái]", "[uán]", "[uáng]", "[uè]",
    "[ué]", "[uì]", "[uí]", "[uò]", "[uó]", "[uā]", "[uāi]", "[uān]", "[uāng]", "[uē]", "[uě]", "[uī]", "[uō]",
    "[uǎ]", "[uǎi]", "[uǎn]", "[uǎng]", "[uǐ]", "[uǒ]", "[vè]", "[w]", "[x]", "[y]", "[z]", "[zh]", "[à]",
    "[ài]", "[àn]", "[àng]", "[ào]", "[á]", "[ái]", "[án]", "[áng]", "[áo]", "[è]", "[èi]", "[èn]", "[èng]",
    "[èr]", "[é]", "[éi]", "[én]", "[éng]", "[ér]", "[ì]", "[ìn]", "[ìng]", "[í]", "[ín]", "[íng]", "[ò]",
    "[òng]", "[òu]", "[ó]", "[óng]", "[óu]", "[ù]", "[ùn]", "[ú]", "[ún]", "[ā]", "[āi]", "[ān]", "[āng]",
    "[āo]", "[ē]", "[ēi]", "[ēn]", "[ēng]", "[ě]", "[ěi]", "[ěn]", "[ěng]", "[ěr]", "[ī]", "[īn]", "[īng]",
    "[ō]", "[ōng]", "[ōu]", "[ū]", "[ūn]", "[ǎ]", "[ǎi]", "[ǎn]", "[ǎng]", "[ǎo]", "[ǐ]", "[ǐn]", "[ǐng]",
    "[ǒ]", "[ǒng]", "[ǒu]", "[ǔ]", "[ǔn]", "[ǘ]", "[ǚ]", "[ǜ]",
)  # 176 tokens

CV3_ADDITIONAL_SPECIAL_TOKENS: tuple[str, ...] = _MARKUP_AND_EVENT_TOKENS + _ARPABET_TOKENS + _PINYIN_TOKENS


_TOKENIZER_JSON = "tokenizer.json"
_SLOW_FILES = ("vocab.json", "merges.txt")
_CONFIG_JSON = "tokenizer_config.json"


class TokenizerError(ValueError):
    """A tokenizer directory that is missing, incomplete or inconsistent with the release."""


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read JSON ({type(e).__name__}: {e})") from e


def _qwen2_from_vocab_merges(tokenizer_dir: str):
    """transformers' ``Qwen2Converter`` pipeline built from vocab.json + merges.txt."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = _read_json(os.path.join(tokenizer_dir, "vocab.json"))
    merges = []
    with open(os.path.join(tokenizer_dir, "merges.txt"), encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.strip()
            if (i == 0 and line.startswith("#version:")) or not line:
                continue  # as Qwen2Tokenizer reads the file
            merges.append(tuple(line.split()))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


class CosyVoice3Tokenizer:
    """Text -> Qwen token ids, as upstream ``CosyVoice3Tokenizer.encode`` (no BOS/EOS added).

    Args:
      tokenizer_dir: the release's ``CosyVoice-BlankEN`` directory: ``tokenizer.json``, or a Qwen2
        ``vocab.json`` + ``merges.txt``; ``tokenizer_config.json`` is read for its added tokens.
    Raises:
      TokenizerError: the directory or its tokenizer files are missing or unreadable, or an added
        token does not land on the id the config gives it.
    """

    def __init__(self, tokenizer_dir: str | os.PathLike):
        tokenizer_dir = os.fspath(tokenizer_dir)
        if not os.path.isdir(tokenizer_dir):
            raise TokenizerError(f"{tokenizer_dir}: tokenizer directory not found")
        present = set(os.listdir(tokenizer_dir))
        try:
            from tokenizers import AddedToken, Tokenizer
        except ImportError as e:
            raise TokenizerError("the text tokenizer needs the `tokenizers` package (pip install tokenizers)") from e
        config = {}
        if _CONFIG_JSON in present:
            config = _read_json(os.path.join(tokenizer_dir, _CONFIG_JSON))
        try:
            if _TOKENIZER_JSON in present:
                tok = Tokenizer.from_file(os.path.join(tokenizer_dir, _TOKENIZER_JSON))
            elif all(name in present for name in _SLOW_FILES):
                cls = str(config.get("tokenizer_class", "Qwen2Tokenizer"))
                if not cls.startswith("Qwen2Tokenizer"):
                    raise TokenizerError(f"{tokenizer_dir}: no tokenizer.json and tokenizer_class {cls!r}; "
                                         "only Qwen2 vocab.json + merges.txt can be converted")
                tok = _qwen2_from_vocab_merges(tokenizer_dir)
            else:
                raise TokenizerError(
                    f"{tokenizer_dir}: no tokenizer files (need tokenizer.json, or vocab.json + merges.txt; "
                    f"found {sorted(present) or 'nothing'})")
        except TokenizerError:
            raise
        except Exception as e:  # the Rust loader raises plain Exception subclasses on corrupt files
            raise TokenizerError(f"{tokenizer_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
        # Added tokens from tokenizer_config.json that the vocabulary lacks (transformers adds them at load).
        for key, spec in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            if tok.token_to_id(spec["content"]) is not None:
                continue
            token = AddedToken(spec["content"], single_word=spec.get("single_word", False),
                               lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                               normalized=spec.get("normalized", True), special=spec.get("special", False))
            tok.add_special_tokens([token]) if spec.get("special", False) else tok.add_tokens([token])
            if tok.token_to_id(spec["content"]) != int(key):
                raise TokenizerError(f"{tokenizer_dir}: added token {spec['content']!r} got id "
                                     f"{tok.token_to_id(spec['content'])}, but tokenizer_config.json says {key}")
        self.base_vocab_size = tok.get_vocab_size(with_added_tokens=True)
        tok.add_special_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=True)
                                for t in (ENDOFTEXT, *CV3_ADDITIONAL_SPECIAL_TOKENS)])
        tok.no_truncation()
        tok.no_padding()
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer = tok

    def __len__(self) -> int:
        """Vocabulary size including the added special tokens (transformers' ``len(tokenizer)``)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """``tokenizer([text])["input_ids"][0]``.

        Args:
          text: any string (special tokens such as ``<|endofprompt|>`` or ``[breath]`` map to one id).
        Returns:
          [L] token ids, L >= 0.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode: expected str, got {type(text).__name__}")
        return list(self._tokenizer.encode_batch([text], add_special_tokens=True)[0].ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text (upstream ``decode`` skips special tokens by default)."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """The id of one vocabulary entry; raises TokenizerError if absent."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.tokenizer_dir}: token {token!r} is not in the vocabulary")
        return int(token_id)

    @property
    def endofprompt_id(self) -> int:
        """Id of ``<|endofprompt|>`` (151646 in the real release)."""
        return self.token_id(ENDOFPROMPT)

    def check_release(self, text_vocab_size: int | None = None) -> None:
        """Check the ids against what the released LLM expects.

        Args:
          text_vocab_size: rows of the LLM's text embedding (``LLMConfig.vocab_size``), if known.
        Raises:
          TokenizerError: ``<|endofprompt|>`` is not 151646 in a vocabulary large enough to hold that id,
            or some id would index past the text embedding. The 151646 check is skipped for tiny
            test vocabularies (see the module docstring).
        """
        if len(self) > QWEN_ENDOFPROMPT_ID and self.endofprompt_id != QWEN_ENDOFPROMPT_ID:
            raise TokenizerError(
                f"{self.tokenizer_dir}: {ENDOFPROMPT} has id {self.endofprompt_id}, but the CosyVoice3 LLM "
                f"hard-codes {QWEN_ENDOFPROMPT_ID}; this is not the release's Qwen2 tokenizer "
                f"(vocabulary before CosyVoice3's tokens: {self.base_vocab_size}, expected "
                f"{QWEN_ENDOFPROMPT_ID})")
        if text_vocab_size is not None and len(self) > text_vocab_size:
            raise TokenizerError(
                f"{self.tokenizer_dir}: the tokenizer has {len(self)} ids (with CosyVoice3's "
                f"{len(CV3_ADDITIONAL_SPECIAL_TOKENS)} special tokens) but the LLM text embedding has "
                f"only {text_vocab_size} rows")
