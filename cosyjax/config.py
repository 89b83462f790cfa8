"""Typed, frozen configs for the three CosyVoice3 stages, read from a release directory.

A release directory holds ``cosyvoice3.yaml`` (hyperpyyaml) and ``CosyVoice-BlankEN/config.json``
(the Qwen2 config).  The yaml names Python classes with ``!new:``/``!name:`` tags and refers to other
keys with ``!ref``; we read those tags as plain data and never import or run what they name.  Every
dimension comes from these two files.  Where the yaml leaves a constructor argument out, the
upstream constructor's default applies; those defaults are facts about upstream and are listed in
``_DEFAULTS`` below, next to the class they belong to.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import operator
import os
import re
from typing import Any, Mapping

import yaml

YAML_NAME = "cosyvoice3.yaml"
QWEN_DIR = "CosyVoice-BlankEN"


class ConfigError(ValueError):
    """A release directory's config is missing, malformed or not a CosyVoice3 config."""


# --------------------------------------------------------------------------------------------
# hyperpyyaml reading, without executing anything
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tagged:
    """A yaml node carrying a hyperpyyaml tag, e.g. ``!new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT``."""

    kind: str  # "new", "name", "apply", "ref", "copy", "tuple", ...
    target: str  # dotted class/function name for new/name/apply, the expression for ref
    value: Any  # mapping or sequence of constructor arguments


class _TagLoader(yaml.SafeLoader):
    """SafeLoader that keeps hyperpyyaml tags as ``Tagged`` data."""


def _construct_tagged(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> Tagged:
    kind, _, target = tag_suffix.partition(":")
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    if kind in ("ref", "copy"):
        return Tagged(kind, str(value).strip(), None)
    return Tagged(kind, target, value)


_TagLoader.add_multi_constructor("!", _construct_tagged)

# hyperpyyaml evaluates `!ref <a> * <b>` as arithmetic; we allow exactly that and nothing else.
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _eval_arith(expr: str, where: str) -> Any:
    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ConfigError(f"{where}: unsupported expression in !ref: {expr!r}")

    try:
        return ev(ast.parse(expr, mode="eval"))
    except SyntaxError as e:
        raise ConfigError(f"{where}: cannot parse !ref expression {expr!r}: {e}") from None


_REF = re.compile(r"<([^<>]+)>")


def _resolve(node: Any, root: Mapping[str, Any], where: str, depth: int = 0) -> Any:
    """Replace ``!ref`` nodes by the values they point to (top-level keys, recursively)."""
    if depth > 32:
        raise ConfigError(f"{where}: !ref chain too deep (cycle?)")
    if isinstance(node, Tagged):
        if node.kind in ("ref", "copy"):
            expr = node.target
            names = _REF.findall(expr)
            if not names:
                raise ConfigError(f"{where}: !ref without <name>: {expr!r}")
            values = {}
            for name in names:
                key = name.strip()
                if key not in root:
                    raise ConfigError(f"{where}: !ref <{key}> names no top-level key")
                values[key] = _resolve(root[key], root, f"{where} -> <{key}>", depth + 1)
            if _REF.fullmatch(expr.strip()):
                return values[names[0].strip()]
            text = _REF.sub(lambda m: repr(values[m.group(1).strip()]), expr)
            return _eval_arith(text, where)
        value = node.value
        if isinstance(value, dict):
            value = {k: _resolve(v, root, f"{where}.{k}", depth) for k, v in value.items()}
        elif isinstance(value, list):
            value = [_resolve(v, root, f"{where}[{i}]", depth) for i, v in enumerate(value)]
        return Tagged(node.kind, node.target, value)
    if isinstance(node, dict):
        return {k: _resolve(v, root, f"{where}.{k}", depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root, f"{where}[{i}]", depth) for i, v in enumerate(node)]
    return node


def read_yaml(path: str) -> dict[str, Any]:
    """Read a hyperpyyaml file into plain data with ``!ref`` resolved and other tags kept as ``Tagged``."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_TagLoader)  # noqa: S506 - _TagLoader is a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid yaml: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level is not a mapping")
    return {k: _resolve(v, raw, f"{path}:{k}") for k, v in raw.items()}


# --------------------------------------------------------------------------------------------
# Upstream constructor signatures: which arguments exist, and their defaults (None = required)
# --------------------------------------------------------------------------------------------
_REQUIRED = object()

_DEFAULTS: dict[str, dict[str, Any]] = {
    # cosyvoice/llm/llm.py::CosyVoice3LM.__init__
    "CosyVoice3LM": dict(
        llm_input_size=_REQUIRED, llm_output_size=_REQUIRED, speech_token_size=_REQUIRED,
        llm=_REQUIRED, sampling=_REQUIRED, length_normalized_loss=True, lsm_weight=0.0,
        mix_ratio=[5, 15],
    ),
    "Qwen2Encoder": dict(pretrain_path=_REQUIRED),
    # cosyvoice/utils/common.py::ras_sampling
    "ras_sampling": dict(top_p=0.8, top_k=25, win_size=10, tau_r=0.1),
    # cosyvoice/flow/flow.py::CausalMaskedDiffWithDiT.__init__
    "CausalMaskedDiffWithDiT": dict(
        input_size=512, output_size=80, spk_embed_dim=192, output_type="mel", vocab_size=4096,
        input_frame_rate=50, only_mask_loss=True, token_mel_ratio=2, pre_lookahead_len=3,
        pre_lookahead_layer=_REQUIRED, decoder=_REQUIRED, decoder_conf=None,
    ),
    # cosyvoice/transformer/upsample_encoder.py::PreLookaheadLayer.__init__
    "PreLookaheadLayer": dict(in_channels=_REQUIRED, channels=_REQUIRED, pre_lookahead_len=1),
    # cosyvoice/flow/flow_matching.py::CausalConditionalCFM.__init__
    "CausalConditionalCFM": dict(
        in_channels=_REQUIRED, cfm_params=_REQUIRED, n_spks=1, spk_emb_dim=64, estimator=_REQUIRED
    ),
    "cfm_params": dict(
        sigma_min=1e-6, solver="euler", t_scheduler="cosine", training_cfg_rate=0.2,
        inference_cfg_rate=0.7, reg_loss_type="l1",
    ),
    # cosyvoice/flow/DiT/dit.py::DiT.__init__
    "DiT": dict(
        dim=_REQUIRED, depth=8, heads=8, dim_head=64, dropout=0.1, ff_mult=4, mel_dim=80,
        mu_dim=None, long_skip_connection=False, spk_dim=None, out_channels=None,
        static_chunk_size=50, num_decoding_left_chunks=2,
    ),
    # cosyvoice/hifigan/generator.py::CausalHiFTGenerator.__init__
    "CausalHiFTGenerator": dict(
        in_channels=80, base_channels=512, nb_harmonics=8, sampling_rate=22050, nsf_alpha=0.1,
        nsf_sigma=0.003, nsf_voiced_threshold=10, upsample_rates=[8, 8],
        upsample_kernel_sizes=[16, 16], istft_params={"n_fft": 16, "hop_len": 4},
        resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3,
        source_resblock_kernel_sizes=[7, 11], source_resblock_dilation_sizes=[[1, 3, 5]] * 2,
        lrelu_slope=0.1, audio_limit=0.99, conv_pre_look_right=4, f0_predictor=_REQUIRED,
    ),
    # cosyvoice/hifigan/f0_predictor.py::CausalConvRNNF0Predictor.__init__
    "CausalConvRNNF0Predictor": dict(num_class=1, in_channels=80, cond_channels=512),
    # matcha/utils/audio.py::mel_spectrogram (all arguments are positional-required upstream)
    "mel_spectrogram": dict(
        n_fft=_REQUIRED, num_mels=_REQUIRED, sampling_rate=_REQUIRED, hop_size=_REQUIRED,
        win_size=_REQUIRED, fmin=_REQUIRED, fmax=_REQUIRED, center=False,
    ),
}


def _args(node: Any, cls: str, where: str, kinds: tuple[str, ...] = ("new",)) -> dict[str, Any]:
    """Check that ``node`` is ``!<kind>:...<cls>`` and return its arguments with upstream defaults."""
    if not isinstance(node, Tagged) or node.kind not in kinds:
        raise ConfigError(f"{where}: expected a !{kinds[0]}:...{cls} node, found {_describe(node)}")
    if node.target.rsplit(".", 1)[-1] != cls:
        raise ConfigError(f"{where}: expected class {cls}, found {node.target}")
    given = node.value if node.value is not None else {}
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: {cls} arguments must be a mapping, found {type(given).__name__}")
    return _fill(given, cls, where)


def _fill(given: Mapping[str, Any], cls: str, where: str) -> dict[str, Any]:
    spec = _DEFAULTS[cls]
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) for {cls}: {', '.join(unknown)}")
    out = {}
    for key, default in spec.items():
        if key in given:
            out[key] = given[key]
        elif default is _REQUIRED:
            raise ConfigError(f"{where}: missing required field '{key}' of {cls}")
        else:
            out[key] = default
    return out


def _describe(node: Any) -> str:
    if isinstance(node, Tagged):
        return f"!{node.kind}:{node.target}"
    return type(node).__name__ if node is not None else "nothing"


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ConfigError(f"{where}: expected an integer, found {value!r}")
    return int(value)


def _ints(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of integers, found {value!r}")
    return tuple(_int(v, f"{where}[{i}]") for i, v in enumerate(value))


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: expected a number, found {value!r}")
    try:
        return float(value)  # yaml reads `1e-06` as a string
    except ValueError:
        raise ConfigError(f"{where}: expected a number, found {value!r}") from None


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# --------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """RAS sampling (cosyvoice/utils/common.py::ras_sampling)."""

    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1

    def __post_init__(self):
        _check(0.0 < self.top_p <= 1.0, f"SamplingConfig: top_p={self.top_p} must be in (0, 1]")
        _check(self.top_k >= 1, f"SamplingConfig: top_k={self.top_k} must be >= 1")
        _check(self.win_size >= 1, f"SamplingConfig: win_size={self.win_size} must be >= 1")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """CosyVoice3LM around a Qwen2 decoder (cosyvoice/llm/llm.py; Qwen dims from config.json)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # text vocabulary (Qwen embed_tokens rows)
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    speech_token_size: int  # FSQ codes; sos/eos/task/fill ids follow it
    llm_input_size: int
    llm_output_size: int
    sampling: SamplingConfig = SamplingConfig()
    mix_ratio: tuple[int, ...] = (5, 15)
    lsm_weight: float = 0.0
    length_normalized_loss: bool = True

    def __post_init__(self):
        _check(self.num_heads % self.num_kv_heads == 0,
               f"LLMConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        _check(self.llm_input_size == self.hidden_size,
               f"LLMConfig: llm_input_size={self.llm_input_size} != Qwen hidden_size={self.hidden_size}")
        _check(self.llm_output_size == self.hidden_size,
               f"LLMConfig: llm_output_size={self.llm_output_size} != Qwen hidden_size={self.hidden_size}")
        _check(self.head_dim % 2 == 0, f"LLMConfig: head_dim={self.head_dim} must be even for rotary")
        _check(self.speech_token_size >= 1, f"LLMConfig: speech_token_size={self.speech_token_size}")

    # Special ids live inside the speech table (CosyVoice3LM.__init__).
    @property
    def speech_vocab_size(self) -> int:
        """Rows of ``speech_embedding`` and outputs of ``llm_decoder``: speech_token_size + 200."""
        return self.speech_token_size + 200

    @property
    def sos(self) -> int:
        return self.speech_token_size

    @property
    def eos(self) -> int:
        return self.speech_token_size + 1

    @property
    def task_id(self) -> int:
        return self.speech_token_size + 2

    @property
    def fill_token(self) -> int:
        return self.speech_token_size + 3

    @classmethod
    def tiny(cls) -> "LLMConfig":
        """A small config for unit tests."""
        return cls(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   intermediate_size=128, vocab_size=512, rms_norm_eps=1e-6, rope_theta=1e6,
                   tie_word_embeddings=True, max_position_embeddings=32768, speech_token_size=64,
                   llm_input_size=64, llm_output_size=64)


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """CausalMaskedDiffWithDiT + CausalConditionalCFM + DiT (cosyvoice/flow/*)."""

    input_size: int  # token embedding width (= mel bins)
    output_size: int  # mel bins
    spk_embed_dim: int  # raw speaker embedding (campplus: 192)
    vocab_size: int  # speech tokens
    input_frame_rate: int
    token_mel_ratio: int
    pre_lookahead_len: int
    pre_lookahead_channels: int
    # CFM
    spk_emb_dim: int  # projected speaker embedding width fed to the estimator
    sigma_min: float
    t_scheduler: str
    training_cfg_rate: float
    inference_cfg_rate: float
    reg_loss_type: str
    # DiT estimator
    dim: int
    depth: int
    heads: int
    dim_head: int
    ff_mult: int
    mel_dim: int
    mu_dim: int
    spk_dim: int
    out_channels: int
    static_chunk_size: int  # streaming attention chunk, in mel frames
    num_decoding_left_chunks: int
    long_skip_connection: bool = False
    dropout: float = 0.1
    only_mask_loss: bool = True
    # Fixed by upstream code (not constructor arguments in the yaml)
    n_timesteps: int = 10  # CausalMaskedDiffWithDiT.inference passes n_timesteps=10
    conv_pos_kernel: int = 31  # CausalConvPositionEmbedding defaults
    conv_pos_groups: int = 16
    time_freq_dim: int = 256  # TimestepEmbedding(freq_embed_dim=256)
    noise_frames: int = 15000  # CausalConditionalCFM.rand_noise length (300 s at 50 Hz)

    def __post_init__(self):
        _check(self.t_scheduler == "cosine", f"FlowConfig: t_scheduler={self.t_scheduler!r}; only 'cosine' is implemented")
        _check(self.dim % self.conv_pos_groups == 0,
               f"FlowConfig: dim={self.dim} is not divisible by conv_pos_groups={self.conv_pos_groups}")
        _check(self.mel_dim == self.output_size,
               f"FlowConfig: DiT mel_dim={self.mel_dim} != flow output_size={self.output_size}")
        _check(self.spk_dim == self.spk_emb_dim == self.output_size,
               f"FlowConfig: DiT spk_dim={self.spk_dim}, CFM spk_emb_dim={self.spk_emb_dim} and flow "
               f"output_size={self.output_size} must agree (spk_embed_affine_layer feeds the DiT)")
        _check(self.mu_dim == self.input_size,
               f"FlowConfig: DiT mu_dim={self.mu_dim} != flow input_size={self.input_size}")
        _check(not self.long_skip_connection, "FlowConfig: long_skip_connection=True is not supported")
        _check(self.token_mel_ratio >= 1, f"FlowConfig: token_mel_ratio={self.token_mel_ratio}")

    @classmethod
    def tiny(cls) -> "FlowConfig":
        return cls(input_size=80, output_size=80, spk_embed_dim=192, vocab_size=64,
                   input_frame_rate=25, token_mel_ratio=2, pre_lookahead_len=3,
                   pre_lookahead_channels=64, spk_emb_dim=80, sigma_min=1e-6,
                   t_scheduler="cosine", training_cfg_rate=0.2, inference_cfg_rate=0.7,
                   reg_loss_type="l1", dim=64, depth=2, heads=4, dim_head=16, ff_mult=2,
                   mel_dim=80, mu_dim=80, spk_dim=80, out_channels=80, static_chunk_size=10,
                   num_decoding_left_chunks=-1)


@dataclasses.dataclass(frozen=True)
class HiftConfig:
    """CausalHiFTGenerator + CausalConvRNNF0Predictor (cosyvoice/hifigan/*)."""

    in_channels: int
    base_channels: int
    nb_harmonics: int
    sampling_rate: int
    nsf_alpha: float
    nsf_sigma: float
    nsf_voiced_threshold: float
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    n_fft: int
    hop_len: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    source_resblock_kernel_sizes: tuple[int, ...]
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    lrelu_slope: float
    audio_limit: float
    conv_pre_look_right: int
    f0_num_class: int
    f0_in_channels: int
    f0_cond_channels: int

    def __post_init__(self):
        n = len(self.upsample_rates)
        _check(len(self.upsample_kernel_sizes) == n,
               f"HiftConfig: {n} upsample_rates but {len(self.upsample_kernel_sizes)} upsample_kernel_sizes")
        _check(len(self.source_resblock_kernel_sizes) == n == len(self.source_resblock_dilation_sizes),
               f"HiftConfig: source_resblock_kernel_sizes/dilation_sizes must have one entry per upsample "
               f"stage ({n}), found {len(self.source_resblock_kernel_sizes)}/{len(self.source_resblock_dilation_sizes)}")
        _check(len(self.resblock_kernel_sizes) == len(self.resblock_dilation_sizes),
               f"HiftConfig: {len(self.resblock_kernel_sizes)} resblock_kernel_sizes but "
               f"{len(self.resblock_dilation_sizes)} resblock_dilation_sizes")
        _check(self.base_channels % (2 ** n) == 0,
               f"HiftConfig: base_channels={self.base_channels} not divisible by 2**{n}")
        _check(self.f0_in_channels == self.in_channels,
               f"HiftConfig: f0 predictor in_channels={self.f0_in_channels} != mel in_channels={self.in_channels}")
        _check(self.f0_num_class == 1, f"HiftConfig: f0 num_class={self.f0_num_class}; only 1 is supported")

    @property
    def upsample_scale(self) -> int:
        """Audio samples per mel frame: prod(upsample_rates) * hop_len (480 for the release)."""
        scale = self.hop_len
        for r in self.upsample_rates:
            scale *= r
        return scale

    @property
    def num_harmonic_channels(self) -> int:
        return self.nb_harmonics + 1

    @classmethod
    def tiny(cls) -> "HiftConfig":
        return cls(in_channels=80, base_channels=32, nb_harmonics=8, sampling_rate=24000,
                   nsf_alpha=0.1, nsf_sigma=0.003, nsf_voiced_threshold=10.0,
                   upsample_rates=(8, 5, 3), upsample_kernel_sizes=(16, 11, 7), n_fft=16, hop_len=4,
                   resblock_kernel_sizes=(3, 7, 11), resblock_dilation_sizes=((1, 3, 5),) * 3,
                   source_resblock_kernel_sizes=(7, 7, 11),
                   source_resblock_dilation_sizes=((1, 3, 5),) * 3, lrelu_slope=0.1,
                   audio_limit=0.99, conv_pre_look_right=4, f0_num_class=1, f0_in_channels=80,
                   f0_cond_channels=32)


@dataclasses.dataclass(frozen=True)
class MelConfig:
    """Prompt-mel feature extractor (matcha.utils.audio.mel_spectrogram arguments)."""

    n_fft: int
    num_mels: int
    sampling_rate: int
    hop_size: int
    win_size: int
    fmin: float
    fmax: float | None
    center: bool


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """All stage configs of one release directory."""

    llm: LLMConfig
    flow: FlowConfig
    hift: HiftConfig
    sample_rate: int
    token_frame_rate: int
    mel: MelConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of ``to_dict`` (JSON turns tuples into lists; we turn them back)."""
        def build(dc, data):
            if data is None:
                return None
            kwargs = {}
            for f in dataclasses.fields(dc):
                if f.name not in data:
                    continue
                v = data[f.name]
                if dataclasses.is_dataclass(_field_type(dc, f.name)):
                    v = build(_field_type(dc, f.name), v)
                elif isinstance(v, list):
                    v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
                kwargs[f.name] = v
            unknown = set(data) - {f.name for f in dataclasses.fields(dc)}
            if unknown:
                raise ConfigError(f"{dc.__name__}: unknown field(s) {sorted(unknown)}")
            return dc(**kwargs)

        return build(cls, d)


_FIELD_TYPES = {
    (ModelConfig, "llm"): LLMConfig, (ModelConfig, "flow"): FlowConfig,
    (ModelConfig, "hift"): HiftConfig, (ModelConfig, "mel"): MelConfig,
    (LLMConfig, "sampling"): SamplingConfig,
}


def _field_type(dc: type, name: str) -> Any:
    return _FIELD_TYPES.get((dc, name), object)


# --------------------------------------------------------------------------------------------
# Building the configs from a release directory
# --------------------------------------------------------------------------------------------
_QWEN_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size", "rms_norm_eps")


def read_qwen_config(path: str) -> dict[str, Any]:
    """Read and check ``CosyVoice-BlankEN/config.json``."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: Qwen config not found (a release directory needs {QWEN_DIR}/config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: top level is not an object")
    for key in _QWEN_REQUIRED:
        if key not in cfg:
            raise ConfigError(f"{path}: missing field '{key}'")
    if cfg.get("model_type", "qwen2") != "qwen2":
        raise ConfigError(f"{path}: model_type={cfg.get('model_type')!r}, expected 'qwen2'")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{path}: hidden_act={cfg.get('hidden_act')!r}; only 'silu' is supported")
    if cfg.get("rope_scaling") not in (None, {}):
        raise ConfigError(f"{path}: rope_scaling={cfg['rope_scaling']!r} is not supported")
    return cfg


def llm_config(yaml_tree: Mapping[str, Any], qwen: Mapping[str, Any], where: str) -> LLMConfig:
    a = _args(yaml_tree.get("llm"), "CosyVoice3LM", f"{where}:llm")
    _args(a["llm"], "Qwen2Encoder", f"{where}:llm.llm")
    s = _args(a["sampling"], "ras_sampling", f"{where}:llm.sampling", kinds=("name",))
    qw = f"{where} ({QWEN_DIR}/config.json)"
    hidden = _int(qwen["hidden_size"], f"{qw}:hidden_size")
    heads = _int(qwen["num_attention_heads"], f"{qw}:num_attention_heads")
    _check(hidden % heads == 0, f"{qw}: hidden_size={hidden} not divisible by num_attention_heads={heads}")
    head_dim = _int(qwen.get("head_dim", hidden // heads), f"{qw}:head_dim")
    return LLMConfig(
        hidden_size=hidden,
        num_layers=_int(qwen["num_hidden_layers"], f"{qw}:num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_int(qwen["num_key_value_heads"], f"{qw}:num_key_value_heads"),
        head_dim=head_dim,
        intermediate_size=_int(qwen["intermediate_size"], f"{qw}:intermediate_size"),
        vocab_size=_int(qwen["vocab_size"], f"{qw}:vocab_size"),
        rms_norm_eps=_float(qwen["rms_norm_eps"], f"{qw}:rms_norm_eps"),
        rope_theta=_float(qwen.get("rope_theta", 10000.0), f"{qw}:rope_theta"),
        tie_word_embeddings=bool(qwen.get("tie_word_embeddings", False)),
        max_position_embeddings=_int(qwen.get("max_position_embeddings", 32768), f"{qw}:max_position_embeddings"),
        speech_token_size=_int(a["speech_token_size"], f"{where}:llm.speech_token_size"),
        llm_input_size=_int(a["llm_input_size"], f"{where}:llm.llm_input_size"),
        llm_output_size=_int(a["llm_output_size"], f"{where}:llm.llm_output_size"),
        sampling=SamplingConfig(
            top_p=_float(s["top_p"], f"{where}:llm.sampling.top_p"),
            top_k=_int(s["top_k"], f"{where}:llm.sampling.top_k"),
            win_size=_int(s["win_size"], f"{where}:llm.sampling.win_size"),
            tau_r=_float(s["tau_r"], f"{where}:llm.sampling.tau_r"),
        ),
        mix_ratio=_ints(a["mix_ratio"], f"{where}:llm.mix_ratio"),
        lsm_weight=_float(a["lsm_weight"], f"{where}:llm.lsm_weight"),
        length_normalized_loss=bool(a["length_normalized_loss"]),
    )


def flow_config(yaml_tree: Mapping[str, Any], where: str) -> FlowConfig:
    w = f"{where}:flow"
    a = _args(yaml_tree.get("flow"), "CausalMaskedDiffWithDiT", w)
    pre = _args(a["pre_lookahead_layer"], "PreLookaheadLayer", f"{w}.pre_lookahead_layer")
    dec = _args(a["decoder"], "CausalConditionalCFM", f"{w}.decoder")
    est = _args(dec["estimator"], "DiT", f"{w}.decoder.estimator")
    cfm_node = dec["cfm_params"]
    if isinstance(cfm_node, Tagged):  # !new:omegaconf.DictConfig {content: {...}}
        content = cfm_node.value.get("content") if isinstance(cfm_node.value, dict) else None
        if not isinstance(content, dict):
            raise ConfigError(f"{w}.decoder.cfm_params: expected a DictConfig with 'content'")
        cfm_node = content
    if not isinstance(cfm_node, dict):
        raise ConfigError(f"{w}.decoder.cfm_params: expected a mapping, found {_describe(cfm_node)}")
    cfm = _fill(cfm_node, "cfm_params", f"{w}.decoder.cfm_params")
    _check(_int(pre["in_channels"], f"{w}.pre_lookahead_layer.in_channels") == _int(a["input_size"], f"{w}.input_size"),
           f"{w}.pre_lookahead_layer.in_channels={pre['in_channels']} != flow input_size={a['input_size']}")
    _check(_int(pre["pre_lookahead_len"], f"{w}.pre_lookahead_layer.pre_lookahead_len")
           == _int(a["pre_lookahead_len"], f"{w}.pre_lookahead_len"),
           f"{w}: pre_lookahead_layer.pre_lookahead_len={pre['pre_lookahead_len']} != "
           f"pre_lookahead_len={a['pre_lookahead_len']}")
    _check(dec["n_spks"] == 1, f"{w}.decoder.n_spks={dec['n_spks']}; only 1 is supported")
    _check(cfm["solver"] == "euler", f"{w}.decoder.cfm_params.solver={cfm['solver']!r}; only 'euler' is supported")
    mel_dim = _int(est["mel_dim"], f"{w}.decoder.estimator.mel_dim")
    mu_dim = est["mu_dim"] if est["mu_dim"] is not None else mel_dim
    spk_dim = est["spk_dim"] if est["spk_dim"] is not None else 0
    out_channels = est["out_channels"] if est["out_channels"] is not None else mel_dim
    in_ch = _int(dec["in_channels"], f"{w}.decoder.in_channels")
    _check(in_ch == 2 * mel_dim + _int(mu_dim, "mu_dim"),
           f"{w}.decoder.in_channels={in_ch} != 2*mel_dim+mu_dim={2 * mel_dim + mu_dim}")
    return FlowConfig(
        input_size=_int(a["input_size"], f"{w}.input_size"),
        output_size=_int(a["output_size"], f"{w}.output_size"),
        spk_embed_dim=_int(a["spk_embed_dim"], f"{w}.spk_embed_dim"),
        vocab_size=_int(a["vocab_size"], f"{w}.vocab_size"),
        input_frame_rate=_int(a["input_frame_rate"], f"{w}.input_frame_rate"),
        token_mel_ratio=_int(a["token_mel_ratio"], f"{w}.token_mel_ratio"),
        pre_lookahead_len=_int(a["pre_lookahead_len"], f"{w}.pre_lookahead_len"),
        pre_lookahead_channels=_int(pre["channels"], f"{w}.pre_lookahead_layer.channels"),
        spk_emb_dim=_int(dec["spk_emb_dim"], f"{w}.decoder.spk_emb_dim"),
        sigma_min=_float(cfm["sigma_min"], f"{w}.decoder.cfm_params.sigma_min"),
        t_scheduler=str(cfm["t_scheduler"]),
        training_cfg_rate=_float(cfm["training_cfg_rate"], f"{w}.decoder.cfm_params.training_cfg_rate"),
        inference_cfg_rate=_float(cfm["inference_cfg_rate"], f"{w}.decoder.cfm_params.inference_cfg_rate"),
        reg_loss_type=str(cfm["reg_loss_type"]),
        dim=_int(est["dim"], f"{w}.decoder.estimator.dim"),
        depth=_int(est["depth"], f"{w}.decoder.estimator.depth"),
        heads=_int(est["heads"], f"{w}.decoder.estimator.heads"),
        dim_head=_int(est["dim_head"], f"{w}.decoder.estimator.dim_head"),
        ff_mult=_int(est["ff_mult"], f"{w}.decoder.estimator.ff_mult"),
        mel_dim=mel_dim,
        mu_dim=_int(mu_dim, f"{w}.decoder.estimator.mu_dim"),
        spk_dim=_int(spk_dim, f"{w}.decoder.estimator.spk_dim"),
        out_channels=_int(out_channels, f"{w}.decoder.estimator.out_channels"),
        static_chunk_size=_int(est["static_chunk_size"], f"{w}.decoder.estimator.static_chunk_size"),
        num_decoding_left_chunks=_int(est["num_decoding_left_chunks"], f"{w}.decoder.estimator.num_decoding_left_chunks"),
        long_skip_connection=bool(est["long_skip_connection"]),
        dropout=_float(est["dropout"], f"{w}.decoder.estimator.dropout"),
        only_mask_loss=bool(a["only_mask_loss"]),
    )


def hift_config(yaml_tree: Mapping[str, Any], where: str) -> HiftConfig:
    w = f"{where}:hift"
    a = _args(yaml_tree.get("hift"), "CausalHiFTGenerator", w)
    f0 = _args(a["f0_predictor"], "CausalConvRNNF0Predictor", f"{w}.f0_predictor")
    istft = a["istft_params"]
    if not isinstance(istft, dict) or set(istft) != {"n_fft", "hop_len"}:
        raise ConfigError(f"{w}.istft_params: expected a mapping with exactly n_fft and hop_len, found {istft!r}")
    return HiftConfig(
        in_channels=_int(a["in_channels"], f"{w}.in_channels"),
        base_channels=_int(a["base_channels"], f"{w}.base_channels"),
        nb_harmonics=_int(a["nb_harmonics"], f"{w}.nb_harmonics"),
        sampling_rate=_int(a["sampling_rate"], f"{w}.sampling_rate"),
        nsf_alpha=_float(a["nsf_alpha"], f"{w}.nsf_alpha"),
        nsf_sigma=_float(a["nsf_sigma"], f"{w}.nsf_sigma"),
        nsf_voiced_threshold=_float(a["nsf_voiced_threshold"], f"{w}.nsf_voiced_threshold"),
        upsample_rates=_ints(a["upsample_rates"], f"{w}.upsample_rates"),
        upsample_kernel_sizes=_ints(a["upsample_kernel_sizes"], f"{w}.upsample_kernel_sizes"),
        n_fft=_int(istft["n_fft"], f"{w}.istft_params.n_fft"),
        hop_len=_int(istft["hop_len"], f"{w}.istft_params.hop_len"),
        resblock_kernel_sizes=_ints(a["resblock_kernel_sizes"], f"{w}.resblock_kernel_sizes"),
        resblock_dilation_sizes=tuple(_ints(d, f"{w}.resblock_dilation_sizes[{i}]")
                                      for i, d in enumerate(a["resblock_dilation_sizes"])),
        source_resblock_kernel_sizes=_ints(a["source_resblock_kernel_sizes"], f"{w}.source_resblock_kernel_sizes"),
        source_resblock_dilation_sizes=tuple(_ints(d, f"{w}.source_resblock_dilation_sizes[{i}]")
                                             for i, d in enumerate(a["source_resblock_dilation_sizes"])),
        lrelu_slope=_float(a["lrelu_slope"], f"{w}.lrelu_slope"),
        audio_limit=_float(a["audio_limit"], f"{w}.audio_limit"),
        conv_pre_look_right=_int(a["conv_pre_look_right"], f"{w}.conv_pre_look_right"),
        f0_num_class=_int(f0["num_class"], f"{w}.f0_predictor.num_class"),
        f0_in_channels=_int(f0["in_channels"], f"{w}.f0_predictor.in_channels"),
        f0_cond_channels=_int(f0["cond_channels"], f"{w}.f0_predictor.cond_channels"),
    )


def mel_config(yaml_tree: Mapping[str, Any], where: str) -> MelConfig | None:
    node = yaml_tree.get("feat_extractor")
    if node is None:
        return None
    a = _args(node, "mel_spectrogram", f"{where}:feat_extractor", kinds=("name",))
    w = f"{where}:feat_extractor"
    return MelConfig(
        n_fft=_int(a["n_fft"], f"{w}.n_fft"), num_mels=_int(a["num_mels"], f"{w}.num_mels"),
        sampling_rate=_int(a["sampling_rate"], f"{w}.sampling_rate"),
        hop_size=_int(a["hop_size"], f"{w}.hop_size"), win_size=_int(a["win_size"], f"{w}.win_size"),
        fmin=_float(a["fmin"], f"{w}.fmin"),
        fmax=None if a["fmax"] is None else _float(a["fmax"], f"{w}.fmax"),
        center=bool(a["center"]),
    )


def load_model_config(model_dir: str) -> ModelConfig:
    """Read ``cosyvoice3.yaml`` and ``CosyVoice-BlankEN/config.json`` from a release directory."""
    if not os.path.isdir(model_dir):
        raise ConfigError(f"{model_dir}: model directory not found")
    yaml_path = os.path.join(model_dir, YAML_NAME)
    tree = read_yaml(yaml_path)
    for stage in ("llm", "flow", "hift"):
        if stage not in tree:
            raise ConfigError(f"{yaml_path}: no '{stage}' section (a CosyVoice3 yaml defines llm, flow and hift)")
    qwen = read_qwen_config(os.path.join(model_dir, QWEN_DIR, "config.json"))
    hift = hift_config(tree, yaml_path)
    sample_rate = _int(tree.get("sample_rate", hift.sampling_rate), f"{yaml_path}:sample_rate")
    flow = flow_config(tree, yaml_path)
    return ModelConfig(
        llm=llm_config(tree, qwen, yaml_path),
        flow=flow,
        hift=hift,
        sample_rate=sample_rate,
        token_frame_rate=_int(tree.get("token_frame_rate", flow.input_frame_rate), f"{yaml_path}:token_frame_rate"),
        mel=mel_config(tree, yaml_path),
    )
