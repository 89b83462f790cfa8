"""Frontend: prompt audio loading/resampling (``audio``), the feature extractors (``features``), the ONNX
speech tokenizer / speaker encoder (``onnx_models``) and their Flax ports (``s3tokenizer``, ``campplus``,
run through ``jax_models``; imported on use), prompt features (``prompt``), and the text side:
normalisation/splitting (``text``) and the Qwen tokenizer with CosyVoice3's special tokens (``tokenizer``)."""

from cosyjax.frontend.audio import AudioError, load_audio, read_audio, resample, sinc_resample_kernel
from cosyjax.frontend.features import (
    kaldi_fbank, kaldi_mel_banks, prompt_mel, slaney_mel_filterbank, spk_fbank, whisper_log_mel,
)
from cosyjax.frontend.onnx_models import (
    OnnxModelError, SpeakerEncoderBase, SpeakerEncoderONNX, SpeechTokenizerBase, SpeechTokenizerONNX,
)
from cosyjax.frontend.prompt import PromptError, PromptFeatures, align_prompt, extract_prompt
from cosyjax.frontend.text import TextError, TextNormalizer, split_paragraph
from cosyjax.frontend.tokenizer import CosyVoice3Tokenizer, TokenizerError

__all__ = [
    "AudioError", "CosyVoice3Tokenizer", "OnnxModelError", "PromptError", "PromptFeatures", "SpeakerEncoderBase",
    "SpeakerEncoderONNX", "SpeechTokenizerBase", "SpeechTokenizerONNX", "TextError", "TextNormalizer",
    "TokenizerError", "align_prompt", "extract_prompt",
    "kaldi_fbank", "kaldi_mel_banks", "load_audio", "prompt_mel", "read_audio", "resample", "sinc_resample_kernel",
    "slaney_mel_filterbank", "spk_fbank", "split_paragraph", "whisper_log_mel",
]
