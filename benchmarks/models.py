"""Random-weight models shared by both sides: cosyjax params and upstream's PyTorch modules.

With a reference repo, the flow and HiFT weights are upstream's own random init (``torch.manual_seed(0)``
then the module constructors), converted to cosyjax params with ``cosyjax.convert``; the LLM weights are
drawn in numpy (``random_llm_state_dict``) and loaded into both.  Without one, every weight is drawn in
numpy from the cosyjax param shapes and torch is never imported.

The upstream modules are the classes a release's ``cosyvoice3.yaml`` names, built with the config's
dims.  Upstream's ``Qwen2Encoder.__init__`` can only load a pretrained checkpoint from disk
(``Qwen2ForCausalLM.from_pretrained``), so the encoder object is created without it and given an HF
``Qwen2ForCausalLM`` built from the config (its ``forward``/``forward_one_step`` are upstream's).
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from typing import Any

import numpy as np

from benchmarks.common import log
from benchmarks.workload import Workload

# Speech logits of the random LLM get this standard deviation and the 200 stop ids logit 0, so the
# chance that RAS ever picks a stop id is ~1e-7 per step: both sides decode exactly max_len tokens.
SPEECH_LOGIT_STD = 6.0
WEIGHT_STD = 0.02


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def random_llm_state_dict(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """An llm.pt-layout state_dict of random float32 weights (std 0.02, norms 1).

    ``llm_decoder`` rows of speech tokens have std SPEECH_LOGIT_STD / sqrt(hidden) (the final RMSNorm
    makes the hidden state's RMS 1, so speech logits have std ~SPEECH_LOGIT_STD); rows of the stop ids
    (>= speech_token_size) are zero.
    """
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(WEIGHT_STD)

    p = "llm.model.model."
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    decoder = np.zeros((cfg.speech_vocab_size, d), np.float32)
    decoder[:cfg.speech_token_size] = (rng.standard_normal((cfg.speech_token_size, d), dtype=np.float32)
                                       * np.float32(SPEECH_LOGIT_STD / np.sqrt(d)))
    sd = {p + "embed_tokens.weight": w(cfg.vocab_size, d), p + "norm.weight": np.ones(d, np.float32),
          "speech_embedding.weight": w(cfg.speech_vocab_size, d), "llm_decoder.weight": decoder}
    for i in range(cfg.num_layers):
        k = f"{p}layers.{i}."
        sd.update({
            k + "self_attn.q_proj.weight": w(q, d), k + "self_attn.q_proj.bias": w(q),
            k + "self_attn.k_proj.weight": w(kv, d), k + "self_attn.k_proj.bias": w(kv),
            k + "self_attn.v_proj.weight": w(kv, d), k + "self_attn.v_proj.bias": w(kv),
            k + "self_attn.o_proj.weight": w(d, q),
            k + "mlp.gate_proj.weight": w(f, d), k + "mlp.up_proj.weight": w(f, d), k + "mlp.down_proj.weight": w(d, f),
            k + "input_layernorm.weight": np.ones(d, np.float32),
            k + "post_attention_layernorm.weight": np.ones(d, np.float32),
        })
    if cfg.tie_word_embeddings:
        sd["llm.model.lm_head.weight"] = sd[p + "embed_tokens.weight"]
    else:
        sd["llm.model.lm_head.weight"] = w(cfg.vocab_size, d)
    return sd


def random_params_like(shapes: Any, seed: int) -> Any:
    """Random float32 numpy params (std 0.02) with the structure of a ShapeDtypeStruct pytree."""
    import jax

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape, dtype=np.float32) * np.float32(WEIGHT_STD)), shapes)


# --------------------------------------------------------------------------------------------
# Upstream modules
# --------------------------------------------------------------------------------------------
def build_upstream_llm(cfg, state_dict: dict[str, np.ndarray]):
    """Upstream CosyVoice3LM (Qwen2Encoder inside) holding ``state_dict``, eval mode, on CPU."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    from cosyvoice.llm.llm import CosyVoice3LM, Qwen2Encoder
    from cosyvoice.utils.common import ras_sampling

    hf_cfg = Qwen2Config(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
                         rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                         tie_word_embeddings=cfg.tie_word_embeddings,
                         max_position_embeddings=cfg.max_position_embeddings, use_sliding_window=False,
                         sliding_window=None, attn_implementation="sdpa")
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(hf_cfg)
    encoder = Qwen2Encoder.__new__(Qwen2Encoder)  # its __init__ only runs from_pretrained(path)
    torch.nn.Module.__init__(encoder)
    encoder.model = hf
    sampling = functools.partial(ras_sampling, top_p=cfg.sampling.top_p, top_k=cfg.sampling.top_k,
                                 win_size=cfg.sampling.win_size, tau_r=cfg.sampling.tau_r)
    model = CosyVoice3LM(llm_input_size=cfg.llm_input_size, llm_output_size=cfg.llm_output_size,
                         speech_token_size=cfg.speech_token_size, llm=encoder, sampling=sampling,
                         length_normalized_loss=cfg.length_normalized_loss, lsm_weight=cfg.lsm_weight,
                         mix_ratio=list(cfg.mix_ratio))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True, assign=True)
    hf.model.rotary_emb = Qwen2RotaryEmbedding(config=hf_cfg)  # a non-persistent buffer: rebuild off meta
    return model.eval()


def build_upstream_flow(cfg):
    """Upstream CausalMaskedDiffWithDiT at ``cfg``'s dims, torch default init after manual_seed(0), eval mode."""
    import torch

    from cosyvoice.flow.DiT.dit import DiT
    from cosyvoice.flow.flow import CausalMaskedDiffWithDiT
    from cosyvoice.flow.flow_matching import CausalConditionalCFM
    from cosyvoice.transformer.upsample_encoder import PreLookaheadLayer

    torch.manual_seed(0)
    cfm_params = types.SimpleNamespace(sigma_min=cfg.sigma_min, solver="euler", t_scheduler=cfg.t_scheduler,
                                       training_cfg_rate=cfg.training_cfg_rate,
                                       inference_cfg_rate=cfg.inference_cfg_rate, reg_loss_type=cfg.reg_loss_type)
    estimator = DiT(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, dim_head=cfg.dim_head, ff_mult=cfg.ff_mult,
                    mel_dim=cfg.mel_dim, mu_dim=cfg.mu_dim, spk_dim=cfg.spk_dim, out_channels=cfg.out_channels,
                    static_chunk_size=cfg.static_chunk_size, num_decoding_left_chunks=cfg.num_decoding_left_chunks)
    decoder = CausalConditionalCFM(in_channels=2 * cfg.mel_dim + cfg.mu_dim, cfm_params=cfm_params, n_spks=1,
                                   spk_emb_dim=cfg.spk_emb_dim, estimator=estimator)
    model = CausalMaskedDiffWithDiT(
        input_size=cfg.input_size, output_size=cfg.output_size, spk_embed_dim=cfg.spk_embed_dim,
        output_type="mel", vocab_size=cfg.vocab_size, input_frame_rate=cfg.input_frame_rate,
        token_mel_ratio=cfg.token_mel_ratio, pre_lookahead_len=cfg.pre_lookahead_len,
        pre_lookahead_layer=PreLookaheadLayer(cfg.input_size, cfg.pre_lookahead_channels, cfg.pre_lookahead_len),
        decoder=decoder)
    return model.eval()


def build_upstream_hift(cfg):
    """Upstream CausalHiFTGenerator at ``cfg``'s dims, torch default init after manual_seed(0), eval mode."""
    import torch

    from cosyvoice.hifigan.f0_predictor import CausalConvRNNF0Predictor
    from cosyvoice.hifigan.generator import CausalHiFTGenerator

    torch.manual_seed(0)
    f0 = CausalConvRNNF0Predictor(num_class=cfg.f0_num_class, in_channels=cfg.f0_in_channels,
                                  cond_channels=cfg.f0_cond_channels)
    model = CausalHiFTGenerator(
        in_channels=cfg.in_channels, base_channels=cfg.base_channels, nb_harmonics=cfg.nb_harmonics,
        sampling_rate=cfg.sampling_rate, nsf_alpha=cfg.nsf_alpha, nsf_sigma=cfg.nsf_sigma,
        nsf_voiced_threshold=cfg.nsf_voiced_threshold, upsample_rates=list(cfg.upsample_rates),
        upsample_kernel_sizes=list(cfg.upsample_kernel_sizes),
        istft_params={"n_fft": cfg.n_fft, "hop_len": cfg.hop_len},
        resblock_kernel_sizes=list(cfg.resblock_kernel_sizes),
        resblock_dilation_sizes=[list(d) for d in cfg.resblock_dilation_sizes],
        source_resblock_kernel_sizes=list(cfg.source_resblock_kernel_sizes),
        source_resblock_dilation_sizes=[list(d) for d in cfg.source_resblock_dilation_sizes],
        lrelu_slope=cfg.lrelu_slope, audio_limit=cfg.audio_limit, conv_pre_look_right=cfg.conv_pre_look_right,
        f0_predictor=f0)
    return model.eval()


# --------------------------------------------------------------------------------------------
# The bundle: everything a run builds, built once and shared by the stages
# --------------------------------------------------------------------------------------------
class Bundle:
    """Lazily built weights, models and warm-state of one benchmark process.

    ``np_params[stage]`` are converted cosyjax params (numpy, float32), ``upstream[stage]`` the torch
    modules (None without a reference), ``model(dtype)`` the cosyjax ``CosyVoice3Model`` under that
    precision policy and ``upstream_model()`` upstream's ``CosyVoice3Model`` over the same three stages.
    ``jax_params(stage, dtype)`` are the stage's params on the device under ``policy(dtype)``: the float32
    weights cast to the stage's compute dtype exactly as ``CosyVoice3Model`` casts them, so every dtype's
    rows run the same random weights.  ``warm`` records the padded shapes (and precisions) whose programs
    are already compiled in this process (see ``benchmarks.e2e``).
    """

    def __init__(self, wl: Workload, reference_repo: str | None):
        self.wl = wl
        self.reference_repo = reference_repo
        self.upstream_info = None
        self.torch_device = None
        if reference_repo:
            import torch

            from cosyjax.parity.upstream import import_upstream

            self.upstream_info = import_upstream(reference_repo)
            # torch.cuda.amp.autocast deprecation notes from upstream's model.py, once per call
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"cosyvoice\.")
            torch.set_num_threads(os.cpu_count() or 1)
            self.torch_device = "cuda" if torch.cuda.is_available() else "cpu"
        self.np_params: dict[str, Any] = {}
        self.upstream: dict[str, Any] = {}
        self.buffers: dict[str, Any] = {}
        self._jax: dict[tuple[str, str], Any] = {}
        self._models: dict[str, Any] = {}
        self._policies: dict[str, Any] = {}
        self._upstream_model = None
        self.warm: set[tuple] = set()
        self.upstream_ran: set[str] = set()  # upstream modules already run once in this process

    @property
    def has_reference(self) -> bool:
        return self.reference_repo is not None

    # ------------------------------------------------------------------ per stage
    def build(self, stage: str) -> None:
        if stage in self.np_params:
            return
        import time

        start = time.perf_counter()
        getattr(self, f"_build_{stage}")()
        log(f"[build] {stage}: random weights{' + upstream module' if self.has_reference else ''} "
            f"in {time.perf_counter() - start:.1f} s")

    def _build_llm(self) -> None:
        from cosyjax.convert.llm import convert

        cfg = self.wl.config.llm
        sd = random_llm_state_dict(cfg, self.wl.seed)
        self.np_params["llm"] = convert(sd, cfg, "random (benchmarks)")
        self.upstream["llm"] = self._to_device(build_upstream_llm(cfg, sd)) if self.has_reference else None

    def _build_flow(self) -> None:
        cfg = self.wl.config.flow
        if self.has_reference:
            from cosyjax.convert.flow import convert

            module = build_upstream_flow(cfg)
            state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
            self.np_params["flow"] = convert(state, cfg, "upstream random init (benchmarks)")
            self.buffers["flow_rand_noise"] = module.decoder.rand_noise.numpy().astype(np.float32)
            self.upstream["flow"] = self._to_device(module)
        else:
            from cosyjax.flow.flow import param_shapes

            self.np_params["flow"] = random_params_like(param_shapes(cfg), self.wl.seed + 1)
            rng = np.random.default_rng([self.wl.seed, 4])
            self.buffers["flow_rand_noise"] = rng.standard_normal((1, cfg.output_size, cfg.noise_frames),
                                                                  dtype=np.float32)
            self.upstream["flow"] = None

    def _build_hift(self) -> None:
        from cosyjax.hift.generator import mel_bucket
        from cosyjax.hift.source import HiftNoise

        cfg = self.wl.config.hift
        if self.has_reference:
            from cosyjax.convert.hift import convert

            module = build_upstream_hift(cfg)
            state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
            self.np_params["hift"] = convert(state, cfg, "upstream random init (benchmarks)")
            # Upstream's construction-time source noise, long enough for every call of the run.
            frames = mel_bucket(max(self.wl.hift_frames, self.e2e_mel_frames()))
            sine = module.m_source.l_sin_gen
            self.buffers["hift_noise"] = HiftNoise(sine.rand_ini.numpy().reshape(-1).astype(np.float32),
                                                   sine.sine_waves[0, :frames * cfg.upsample_scale].numpy())
            self.upstream["hift"] = self._to_device(module)
        else:
            from cosyjax.hift.generator import param_shapes

            self.np_params["hift"] = random_params_like(param_shapes(cfg), self.wl.seed + 2)
            self.buffers["hift_noise"] = None  # seed 0, expanded by cosyjax.hift.source.make_noise
            self.upstream["hift"] = None

    def _to_device(self, module):
        return module.to(self.torch_device) if self.torch_device not in (None, "cpu") else module

    def e2e_mel_frames(self) -> int:
        flow = self.wl.config.flow
        return flow.token_mel_ratio * self.wl.e2e_tokens

    def policy(self, dtype: str = "float32"):
        """``PrecisionPolicy.resolve(dtype)`` on jax's default backend (what ``CosyVoice3Model(dtype=...)`` runs)."""
        if dtype not in self._policies:
            from cosyjax.precision import PrecisionPolicy

            self._policies[dtype] = PrecisionPolicy.resolve(dtype)
        return self._policies[dtype]

    def jax_params(self, stage: str, dtype: str = "float32") -> Any:
        """The stage's params on the JAX device under ``policy(dtype)`` (the model's own once it is built)."""
        if dtype in self._models:
            return self._models[dtype].params[stage]
        if (stage, dtype) not in self._jax:
            import jax
            import jax.numpy as jnp

            from cosyjax.checkpoint import cast_params

            self.build(stage)
            compute = self.policy(dtype).stage(stage).compute
            tree = self.np_params[stage]
            if compute != "float32":  # the model's cast (checkpoint.FLOAT32_ONLY subtrees stay float32)
                tree = cast_params(tree, compute, (stage,))
            self._jax[(stage, dtype)] = jax.tree.map(jnp.asarray, tree)
        return self._jax[(stage, dtype)]

    # ------------------------------------------------------------------ whole models
    def model(self, dtype: str = "float32"):
        """cosyjax CosyVoice3Model over the three stages under ``policy(dtype)`` (fresh hop schedule for every
        stream request)."""
        if dtype not in self._models:
            from cosyjax.checkpoint import ConvertedModel
            from cosyjax.model import CosyVoice3Model

            for stage in ("llm", "flow", "hift"):
                self.build(stage)
            converted = ConvertedModel(config=self.wl.config, params=dict(self.np_params),
                                       buffers={"flow_rand_noise": self.buffers["flow_rand_noise"]},
                                       source={"benchmarks": "random weights"})
            self._models[dtype] = CosyVoice3Model(converted, dtype=self.policy(dtype),
                                                  hift_noise=self.buffers["hift_noise"], upstream_hop_quirk=False)
            # From now on this dtype's stages use the model's device params: free the other copies, and the
            # numpy weights once every dtype of the run (and float32, which the other stages run) has its model.
            for stage in ("llm", "flow", "hift"):
                self._jax.pop((stage, dtype), None)
            if {"float32", *self.wl.dtypes} <= set(self._models):
                for stage in self.np_params:
                    self.np_params[stage] = None
        return self._models[dtype]

    def upstream_model(self):
        """Upstream's CosyVoice3Model over the same three torch modules (None without a reference)."""
        if not self.has_reference:
            return None
        if self._upstream_model is None:
            from cosyvoice.cli.model import CosyVoice3Model

            for stage in ("llm", "flow", "hift"):
                self.build(stage)
            model = CosyVoice3Model(self.upstream["llm"], self.upstream["flow"], self.upstream["hift"], fp16=False)
            # Upstream writes the hop as literals (25, 4 * 25) that "must match training static_chunk_size";
            # take them from the config like cosyjax does (the same values at the release dims).
            from cosyjax.model import MAX_HOP_FACTOR

            self.upstream_hop = self.wl.hop
            model.token_hop_len = self.wl.hop
            model.token_max_hop_len = MAX_HOP_FACTOR * self.wl.hop
            self._upstream_model = model
        return self._upstream_model
