"""The release directory a case holds, and upstream's modules built from it.

``render_yaml`` writes ``cosyvoice3.yaml`` at a case config's sizes, ``write_qwen_dir`` the
``CosyVoice-BlankEN`` directory; ``build_models`` / ``load_weights`` build and load the three stages as
upstream's ``CosyVoice3`` does, and ``randomize`` gives a module random weights.
"""

from __future__ import annotations

import math
import os
from typing import Any

QWEN_DIR = "CosyVoice-BlankEN"
# hift.pt keys: upstream removes every "generator." from the keys when loading (a HiFiGan training
# checkpoint also loads); ours have none.


_YAML_TEMPLATE = """\
# Small CosyVoice3 model config written by cosyjax parity make-case (case {name}, seed {seed}).
# Same structure, classes and non-size constants as upstream
# examples/libritts/cosyvoice3/conf/cosyvoice3.yaml; only sizes differ. Training-only sections
# (hifigan discriminators, data pipeline, train_conf) are left out.
# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: 24000
llm_input_size: {hidden}
llm_output_size: {hidden}
spk_embed_dim: {spk_embed_dim}
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2

# stream related params
chunk_size: {chunk_size} # streaming inference chunk size, in token
num_decoding_left_chunks: -1 # streaming inference flow decoder left chunk size, <0 means use all left chunks

llm: !new:cosyvoice.llm.llm.CosyVoice3LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: {speech_token_size}
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT
    input_size: 80
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {speech_token_size}
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: {pre_lookahead_len}
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        in_channels: 80
        channels: {pre_lookahead_channels}
        pre_lookahead_len: {pre_lookahead_len}
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.DiT.dit.DiT
            dim: {dit_dim}
            depth: {dit_depth}
            heads: {dit_heads}
            dim_head: {dit_dim_head}
            ff_mult: {dit_ff_mult}
            mel_dim: 80
            mu_dim: 80
            spk_dim: 80
            out_channels: 80
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator
    in_channels: 80
    base_channels: {hift_base_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    conv_pre_look_right: 4
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {hift_f0_cond_channels}

# frontend (not exercised by the golden data; kept so the file parses like the release one)
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
    version: cosyvoice3
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: null
    center: False
"""


def render_yaml(cfg: dict[str, Any], seed: int) -> str:
    """The release ``cosyvoice3.yaml`` text for a validated case config."""
    d = cfg["dit"]
    return _YAML_TEMPLATE.format(
        name=cfg["name"], seed=seed, hidden=cfg["qwen"]["hidden_size"], spk_embed_dim=cfg["spk_embed_dim"],
        chunk_size=cfg["chunk_size"], speech_token_size=cfg["speech_token_size"],
        pre_lookahead_len=cfg["pre_lookahead_len"], pre_lookahead_channels=cfg["pre_lookahead_channels"],
        dit_dim=d["dim"], dit_depth=d["depth"], dit_heads=d["heads"], dit_dim_head=d["dim_head"],
        dit_ff_mult=d["ff_mult"], hift_base_channels=cfg["hift_base_channels"],
        hift_f0_cond_channels=cfg["hift_f0_cond_channels"])


def write_qwen_dir(cfg: dict[str, Any], seed: int, qwen_dir: str) -> None:
    """Write ``CosyVoice-BlankEN`` (config.json, generation_config.json, model.safetensors).

    The safetensors hold a randomly initialised ``Qwen2ForCausalLM`` (HF init, seeded); upstream's
    ``Qwen2Encoder`` needs it for ``from_pretrained``, and ``llm.pt`` then overrides every weight.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    q = cfg["qwen"]
    config = Qwen2Config(
        vocab_size=q["vocab_size"], hidden_size=q["hidden_size"], intermediate_size=q["intermediate_size"],
        num_hidden_layers=q["num_hidden_layers"], num_attention_heads=q["num_attention_heads"],
        num_key_value_heads=q["num_key_value_heads"], hidden_act="silu", max_position_embeddings=32768,
        initializer_range=0.02, rms_norm_eps=q["rms_norm_eps"], use_cache=True,
        tie_word_embeddings=q["tie_word_embeddings"], rope_theta=q["rope_theta"], rope_scaling=None,
        use_sliding_window=False, sliding_window=32768, max_window_layers=q["num_hidden_layers"],
        attention_dropout=0.0, bos_token_id=q["vocab_size"] - 1, eos_token_id=q["vocab_size"] - 1,
        architectures=["Qwen2ForCausalLM"], torch_dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(qwen_dir, safe_serialization=True)


def build_models(model_dir: str) -> dict[str, Any]:
    """Build ``{"llm", "flow", "hift"}`` from a release dir exactly as upstream ``CosyVoice3.__init__``."""
    from hyperpyyaml import load_hyperpyyaml

    with open(os.path.join(model_dir, "cosyvoice3.yaml"), encoding="utf-8") as f:
        configs = load_hyperpyyaml(f, overrides={"qwen_pretrain_path": os.path.join(model_dir, QWEN_DIR)})
    return {k: configs[k] for k in ("llm", "flow", "hift")}


def load_weights(models: dict[str, Any], model_dir: str) -> None:
    """Strict ``load_state_dict`` of llm.pt/flow.pt/hift.pt as upstream ``CosyVoiceModel.load``; eval mode."""
    import torch

    for stage, module in models.items():
        sd = torch.load(os.path.join(model_dir, f"{stage}.pt"), map_location="cpu", weights_only=True)
        if stage == "hift":
            sd = {k.replace("generator.", ""): v for k, v in sd.items()}
        module.load_state_dict(sd, strict=True)
        module.eval()


def randomize(module: Any, gen: Any, gains: dict[str, float] | None = None) -> None:
    """Re-draw every parameter of ``module`` from ``gen`` (buffers are left as constructed).

    Scales keep activations O(1) so outputs are far from degenerate: embeddings N(0, 1); linear/conv
    weights N(0, gain/sqrt(fan_in)); biases N(0, 0.05); norm weights 1 + N(0, 0.1); Snake alphas
    U(0.5, 1.5).  Weight-normed convs get v = N(0, gain/sqrt(fan_in)) and g = |v| * U(0.75, 1.25),
    so g != |v| and folding the weight norm matters.  ``gains`` maps a parameter-name prefix to a gain.
    """
    import torch

    gains = gains or {}
    owners = {}
    for mname, sub in module.named_modules():
        for pname, p in sub.named_parameters(recurse=False):
            owners[id(p)] = sub

    def gain_of(name: str) -> float:
        best = ""
        for prefix in gains:
            if name.startswith(prefix) and len(prefix) > len(best):
                best = prefix
        return gains[best] if best else 1.0

    deferred_g = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("parametrizations.weight.original0"):
                deferred_g.append((name, p))
                continue
            if leaf == "alpha":
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif leaf == "bias":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif isinstance(owners.get(id(p)), torch.nn.Embedding):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * (gain_of(name) / math.sqrt(fan_in)))
        # weight norm (dim=0): original0 = g [out, 1, 1], original1 = v; W = g * v / |v|
        params = dict(module.named_parameters())
        for name, g in deferred_g:
            v = params[name[: -len("original0")] + "original1"]
            norm = v.detach().flatten(1).norm(dim=1).reshape(g.shape)
            g.copy_(norm * (0.75 + 0.5 * torch.rand(g.shape, generator=gen)))
