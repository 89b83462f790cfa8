"""PyTorch -> JAX conversion of a CosyVoice3 release directory (installed as ``cosyjax.convert``).

``convert_model(model_dir)`` reads ``cosyvoice3.yaml`` + ``CosyVoice-BlankEN/config.json`` into configs,
loads ``llm.pt``, ``flow.pt`` and ``hift.pt`` with ``torch.load(weights_only=True)``, maps every tensor
through the stage tables (strict in both directions), and regenerates the non-parameter state upstream
creates at construction time (the flow decoder's seeded noise).  ``convert_to_dir`` writes the result
atomically with orbax.  This package needs torch; the JAX runtime never imports it.
"""

from __future__ import annotations

import os
from typing import Callable

from cosyjax.checkpoint import ConvertedModel, save_converted
from cosyjax.config import ModelConfig, load_model_config
from cosyjax.convert.common import ConversionError, load_state_dict

STAGE_FILES = {"llm": "llm.pt", "flow": "flow.pt", "hift": "hift.pt"}
LLM_FILES = ("llm.pt", "llm.rl.pt")  # a 2512 release ships both: upstream loads llm.pt, llm.rl.pt is RL-tuned


def stage_files(llm_file: str = "llm.pt") -> dict[str, str]:
    """File name per stage inside a release directory, with ``llm_file`` as the LLM checkpoint.

    Raises:
      ConversionError: ``llm_file`` is a path rather than a file name of the release directory.
    """
    if not llm_file or os.path.basename(llm_file) != llm_file or not llm_file.endswith(".pt"):
        raise ConversionError(f"llm_file {llm_file!r}: expected the name of a .pt file in the release directory "
                              f"(one of {', '.join(LLM_FILES)})")
    return {**STAGE_FILES, "llm": llm_file}


def _stage_converter(stage: str) -> Callable:
    if stage == "llm":
        from cosyjax.convert import llm as module
    elif stage == "flow":
        from cosyjax.convert import flow as module
    else:
        from cosyjax.convert import hift as module
    return module.convert


def convert_model(model_dir: str, *, dtype: str = "float32", llm_file: str = "llm.pt",
                  progress: bool = True) -> ConvertedModel:
    """Convert a release directory in memory.

    Args:
      model_dir: directory with cosyvoice3.yaml, llm.pt, flow.pt, hift.pt, CosyVoice-BlankEN/config.json.
      dtype: "float32" or "bfloat16" storage for the float params (the noise buffer stays float32).
      llm_file: the LLM checkpoint's file name in ``model_dir`` ("llm.pt" as upstream loads, or the
        release's RL-tuned "llm.rl.pt"; same keys and shapes).
      progress: show a tqdm progress bar over the steps.

    Returns:
      ConvertedModel with numpy params {"llm", "flow", "hift"} and buffers {"flow_rand_noise"}.

    Raises:
      ConfigError for a bad yaml/config.json, ConversionError for a bad checkpoint (one message naming
      the file and every missing/unexpected/misshaped key).
    """
    from tqdm.auto import tqdm

    from cosyjax.convert.flow import rand_noise

    cfg: ModelConfig = load_model_config(model_dir)
    files = stage_files(llm_file)
    paths = {stage: os.path.join(model_dir, name) for stage, name in files.items()}
    for stage, path in paths.items():  # fail before spending time on the other files
        if not os.path.isfile(path):
            raise ConversionError(f"{path}: checkpoint file not found ({stage} stage)")
    params = {}
    source = {"model_dir": os.path.abspath(model_dir)}
    with tqdm(total=2 * len(paths) + 1, desc="convert", unit="step", disable=not progress) as bar:
        for stage, path in paths.items():
            bar.set_postfix_str(f"load {os.path.basename(path)}")
            state_dict = load_state_dict(path)
            bar.update()
            bar.set_postfix_str(f"map {stage}")
            params[stage] = _stage_converter(stage)(state_dict, getattr(cfg, stage), path)
            source[files[stage]] = {"keys": len(state_dict), "bytes": os.path.getsize(path)}
            del state_dict
            bar.update()
        bar.set_postfix_str("flow noise")
        buffers = {"flow_rand_noise": rand_noise(cfg.flow)}
        bar.update()
    return ConvertedModel(config=cfg, params=params, buffers=buffers, dtype=dtype, source=source)


def convert_to_dir(model_dir: str, out_dir: str, *, dtype: str = "float32", llm_file: str = "llm.pt",
                   overwrite: bool = False, progress: bool = True) -> str:
    """Convert ``model_dir`` and write it to ``out_dir`` atomically; returns the absolute output path.

    The output is refused up front if it exists and ``overwrite`` is False, so no work is wasted.
    """
    from cosyjax.checkpoint import CheckpointError

    if os.path.exists(out_dir) and not overwrite:
        raise CheckpointError(f"{out_dir}: output exists (pass --overwrite to replace it)")
    model = convert_model(model_dir, dtype=dtype, llm_file=llm_file, progress=progress)
    return save_converted(out_dir, model, overwrite=overwrite)


__all__ = ["ConversionError", "convert_model", "convert_to_dir", "LLM_FILES", "STAGE_FILES", "stage_files"]
