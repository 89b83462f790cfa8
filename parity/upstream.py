"""Import the upstream PyTorch CosyVoice from a source checkout, unmodified.

``import_upstream(path)`` puts the checkout on ``sys.path`` so that ``cosyvoice.*`` (and the
classes a ``cosyvoice3.yaml`` names) import as they do upstream.  Upstream imports several
packages at module level that the stage forwards never call (the ONNX frontend, the tokenizer,
torchaudio's kaldi features, matcha's training code).  For each of them we use the real package
when it imports, and otherwise install a small stand-in module in ``sys.modules``.  The stand-ins
are written here from the documented behaviour of what they replace; nothing is copied from
upstream or from Matcha-TTS.  A stand-in that is *called* (rather than only imported or named in
the yaml) raises ``UpstreamStandInError`` naming itself, so it can never change a number silently.

Packages that affect numerics must be real: torch, transformers (Qwen2) and
``x-transformers==2.11.24`` (the DiT's rotary embedding).  ``import_upstream`` checks them.

What each stand-in replaces:
  matcha.models.components.flow_matching.BASECFM  base class of cosyvoice.flow.flow_matching.ConditionalCFM
                                                 (Matcha-TTS submodule, absent from source snapshots)
  matcha.utils.audio.mel_spectrogram              named by ``feat_extractor`` in the yaml (frontend only)
  matcha.hifigan.models, matcha.models.components.decoder / .transformer
                                                 imported by training / CosyVoice1 modules only
  torchaudio (+ .compliance.kaldi, .transforms)   its wheels are CUDA-linked and fail next to torch+cpu;
                                                 used only by the frontend and the training discriminators
  onnxruntime                                     ONNX frontend models (campplus, speech tokenizer)
  whisper (+ .tokenizer), tiktoken                tokenizer / frontend features
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import os
import subprocess
import sys
import types
from typing import Any

# x-transformers' RotaryEmbedding / apply_rotary_pos_emb changed numerics across releases
# (half-split vs interleaved pairs); upstream pins this one.
X_TRANSFORMERS_VERSION = "2.11.24"

STAND_IN_MARK = "__cosyjax_stand_in__"


class UpstreamImportError(ImportError):
    """The upstream checkout, or a package it needs for numerics, cannot be imported."""


class UpstreamStandInError(RuntimeError):
    """A stand-in module installed by ``import_upstream`` was called; the real package is needed."""


@dataclasses.dataclass
class UpstreamInfo:
    """What ``import_upstream`` did: where upstream lives and which modules are stand-ins."""

    path: str
    commit: str | None
    stand_ins: list[str]
    versions: dict[str, str]


_STATE: dict[str, UpstreamInfo] = {}


# --------------------------------------------------------------------------------------------
# stand-in building blocks
# --------------------------------------------------------------------------------------------
def _unavailable(qualname: str):
    """A callable / class placeholder that raises when used (instantiated or called)."""

    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise UpstreamStandInError(
            f"{qualname} is a cosyjax stand-in (the real package is not importable here); "
            f"the parity harness never calls it. Install the real package to use it.")

    fail.__name__ = qualname.rsplit(".", 1)[-1]
    fail.__qualname__ = qualname
    return fail


class _StandInModule(types.ModuleType):
    """A module whose every unknown attribute is an ``_unavailable`` placeholder."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _unavailable(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


def _module(name: str, lazy: bool = True, **attrs: Any) -> types.ModuleType:
    mod = _StandInModule(name) if lazy else types.ModuleType(name)
    setattr(mod, STAND_IN_MARK, True)
    mod.__path__ = []  # importable as a package, so ``import a.b`` finds ``a.b`` in sys.modules
    mod.__file__ = f"<cosyjax stand-in {name}>"
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def _install(modules: list[types.ModuleType]) -> None:
    """Register stand-in modules and link each child as an attribute of its parent."""
    for mod in modules:
        sys.modules[mod.__name__] = mod
    for mod in modules:
        parent, _, child = mod.__name__.rpartition(".")
        if parent and parent in sys.modules:
            setattr(sys.modules[parent], child, mod)


def _make_basecfm():
    """Our minimal equivalent of matcha's ``BASECFM`` (``matcha/models/components/flow_matching.py``).

    Upstream's ``ConditionalCFM`` only relies on the constructor: it stores ``n_feats``,
    ``n_spks``, ``spk_emb_dim``, ``solver`` and ``sigma_min`` (from ``cfm_params``, with
    ``sigma_min`` falling back to 1e-4 as in matcha) and starts with ``estimator = None``.
    It creates no parameters and draws no random numbers, so construction order and the
    global torch RNG are the same as with the real class.  Its ``forward``/``solve_euler``/
    ``compute_loss`` are all overridden by CosyVoice's subclasses.
    """
    import torch

    class BASECFM(torch.nn.Module):
        def __init__(self, n_feats, cfm_params, n_spks=1, spk_emb_dim=128):
            super().__init__()
            self.n_feats = n_feats
            self.n_spks = n_spks
            self.spk_emb_dim = spk_emb_dim
            self.solver = cfm_params.solver
            self.sigma_min = cfm_params.sigma_min if hasattr(cfm_params, "sigma_min") else 1e-4
            self.estimator = None

        def forward(self, *args, **kwargs):  # overridden by ConditionalCFM
            raise UpstreamStandInError("BASECFM.forward (cosyjax stand-in) is abstract")

    BASECFM.__module__ = "matcha.models.components.flow_matching"
    return BASECFM


def _matcha_stand_ins() -> list[types.ModuleType]:
    return [
        _module("matcha"),
        _module("matcha.models"),
        _module("matcha.models.components"),
        _module("matcha.models.components.flow_matching", BASECFM=_make_basecfm()),
        _module("matcha.models.components.decoder"),
        _module("matcha.models.components.transformer"),
        _module("matcha.utils"),
        _module("matcha.utils.audio"),  # mel_spectrogram: named by the yaml, called by the frontend only
        _module("matcha.hifigan"),
        _module("matcha.hifigan.models"),
    ]


def _torchaudio_stand_ins() -> list[types.ModuleType]:
    return [
        _module("torchaudio", __version__="0+cosyjax.stand-in"),
        _module("torchaudio.compliance"),
        _module("torchaudio.compliance.kaldi"),
        _module("torchaudio.transforms"),
        _module("torchaudio.functional"),
    ]


def _whisper_stand_ins() -> list[types.ModuleType]:
    # cosyvoice/tokenizer/tokenizer.py subclasses nothing from whisper; it only imports the name.
    return [_module("whisper"), _module("whisper.tokenizer")]


# name -> (modules to try importing for real, stand-in factory)
_OPTIONAL: dict[str, tuple[tuple[str, ...], Any]] = {
    "matcha": (("matcha.models.components.flow_matching", "matcha.utils.audio"), _matcha_stand_ins),
    "torchaudio": (("torchaudio", "torchaudio.compliance.kaldi"), _torchaudio_stand_ins),
    "onnxruntime": (("onnxruntime",), lambda: [_module("onnxruntime")]),
    "whisper": (("whisper", "whisper.tokenizer"), _whisper_stand_ins),
    "tiktoken": (("tiktoken",), lambda: [_module("tiktoken")]),
}


def _drop_modules(prefix: str) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]


def _real_or_stand_in(name: str) -> bool:
    """Import package ``name`` for real if possible, else install its stand-in. True if stand-in."""
    real_modules, factory = _OPTIONAL[name]
    if name in sys.modules and getattr(sys.modules[name], STAND_IN_MARK, False):
        return True
    try:
        for mod in real_modules:
            importlib.import_module(mod)
        return False
    except Exception:  # noqa: BLE001 - a CUDA torchaudio raises OSError, others ImportError
        _drop_modules(name)  # a half-imported package would shadow the stand-in
        _install(factory())
        return True


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(path: str) -> str | None:
    """``git rev-parse HEAD`` of ``path`` (None when it is not a git checkout)."""
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return text if out.returncode == 0 and len(text) == 40 else None


def import_upstream(reference_repo: str) -> UpstreamInfo:
    """Make the upstream CosyVoice checkout at ``reference_repo`` importable.

    Idempotent for one path; a second, different path in the same process is refused (the
    ``cosyvoice`` package can only be imported once).

    Args:
      reference_repo: root of a CosyVoice source checkout (holds ``cosyvoice/``).
    Returns:
      UpstreamInfo with the resolved path, the git commit when the checkout is a git repo,
      the stand-in packages installed, and the versions of the packages that affect numerics.
    Raises:
      UpstreamImportError: no checkout there, or a numerics-relevant package is missing/wrong.
    """
    path = os.path.realpath(os.path.expanduser(reference_repo))
    if not os.path.isfile(os.path.join(path, "cosyvoice", "__init__.py")) and not os.path.isfile(
            os.path.join(path, "cosyvoice", "llm", "llm.py")):
        raise UpstreamImportError(f"{reference_repo}: not a CosyVoice source checkout (no cosyvoice/llm/llm.py)")
    if path in _STATE:
        return _STATE[path]
    if _STATE:
        other = next(iter(_STATE))
        raise UpstreamImportError(f"upstream already imported from {other}; cannot also import {path} "
                                  "in the same process")
    loaded = sys.modules.get("cosyvoice")
    if loaded is not None:
        where = os.path.realpath(os.path.dirname(os.path.dirname(getattr(loaded, "__file__", "") or
                                                                 list(getattr(loaded, "__path__", [""]))[0])))
        if where != path:
            raise UpstreamImportError(f"a 'cosyvoice' package is already imported from {where}")

    # Numerics-relevant packages must be the real ones.
    for dist, module in (("torch", "torch"), ("transformers", "transformers"),
                         ("hyperpyyaml", "hyperpyyaml"), ("x-transformers", "x_transformers"),
                         ("einops", "einops"), ("omegaconf", "omegaconf")):
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001
            raise UpstreamImportError(f"upstream needs the real '{dist}' package: {type(e).__name__}: {e}") from e
    xt = _version("x-transformers")
    if xt != X_TRANSFORMERS_VERSION:
        raise UpstreamImportError(
            f"x-transformers {xt} is installed; upstream pins {X_TRANSFORMERS_VERSION} and the DiT rotary "
            f"embedding differs between releases: pip install x-transformers=={X_TRANSFORMERS_VERSION}")

    if path not in sys.path:
        sys.path.insert(0, path)
    matcha_dir = os.path.join(path, "third_party", "Matcha-TTS")
    if os.path.isfile(os.path.join(matcha_dir, "matcha", "__init__.py")) and matcha_dir not in sys.path:
        sys.path.insert(1, matcha_dir)  # the submodule checked out: use it as upstream does

    stand_ins = [name for name in _OPTIONAL if _real_or_stand_in(name)]

    # cosyvoice/utils/onnx.py loads ONNX models at import time when $onnx_path is set, and
    # cosyvoice/utils/file_utils.py calls logging.basicConfig(level=DEBUG) at import time, which would
    # flood our output with jax's debug lines: keep the root logger as it was.
    saved = os.environ.pop("onnx_path", None)
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    try:
        for mod in ("cosyvoice.llm.llm", "cosyvoice.flow.flow", "cosyvoice.flow.flow_matching",
                    "cosyvoice.flow.DiT.dit", "cosyvoice.transformer.upsample_encoder",
                    "cosyvoice.hifigan.generator", "cosyvoice.hifigan.f0_predictor", "cosyvoice.utils.common"):
            try:
                importlib.import_module(mod)
            except Exception as e:  # noqa: BLE001
                raise UpstreamImportError(f"importing upstream {mod} from {path} failed: "
                                          f"{type(e).__name__}: {e}") from e
    finally:
        if saved is not None:
            os.environ["onnx_path"] = saved
        for handler in list(root.handlers):
            if handler not in root_handlers:
                root.removeHandler(handler)
        root.setLevel(root_level)

    versions = {d: v for d in ("torch", "transformers", "x-transformers", "hyperpyyaml", "einops", "omegaconf",
                               "numpy", "safetensors") if (v := _version(d)) is not None}
    info = UpstreamInfo(path=path, commit=git_commit(path), stand_ins=stand_ins, versions=versions)
    _STATE[path] = info
    return info
