"""Prompt-audio frontend: loading/resampling (``audio``) and the three feature extractors (``features``)."""

from cosyjax.frontend.audio import AudioError, load_audio, read_audio, resample, sinc_resample_kernel
from cosyjax.frontend.features import (
    kaldi_fbank, kaldi_mel_banks, prompt_mel, slaney_mel_filterbank, spk_fbank, whisper_log_mel,
)

__all__ = [
    "AudioError", "kaldi_fbank", "kaldi_mel_banks", "load_audio", "prompt_mel", "read_audio", "resample",
    "sinc_resample_kernel", "slaney_mel_filterbank", "spk_fbank", "whisper_log_mel",
]
