"""``cosyjax train`` end to end on the synthetic dataset (tools/make_synthetic_dataset.py) and the tiny release.

The issue's acceptance runs: 30 steps for the LLM and the flow, full and LoRA, with the loss falling; a
run resumed after step 15 continues bit-identically to the uninterrupted one; two localhost CPU
processes give the loss curve of one process with the same global batch; the export (LoRA merged,
averaged over checkpoints) loads back and, in the ``upstream`` group, in upstream strictly.  Every run
uses examples/conf/tiny_train.yaml with small batches padded to one shape per model (4 rows, one
length), so each compiles its step once.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import TINY_RELEASE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_YAML = os.path.join(REPO, "examples", "conf", "tiny_train.yaml")
TOKENIZER = os.path.join(TINY_RELEASE, "CosyVoice-BlankEN")
LENGTH_BUCKET = {"llm": 128, "flow": 64}  # one padded length covers the synthetic utterances


def _tool():
    spec = importlib.util.spec_from_file_location("make_synthetic_dataset",
                                                  os.path.join(REPO, "tools", "make_synthetic_dataset.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _make(out: str, *, num_utts: int, num_shards: int, seed: int) -> str:
    from cosyjax.config import load_model_config

    tool = _tool()
    cfg = load_model_config(TINY_RELEASE)
    rows = tool.make_rows(num_utts, speech_token_size=cfg.llm.speech_token_size, spk_embed_dim=cfg.flow.spk_embed_dim,
                          seed=seed, language_seed=0, dpo=True, instruct=False)
    return tool.write_dataset(out, rows, num_shards)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return {"train": _make(str(root / "train"), num_utts=48, num_shards=4, seed=0),
            "dev": _make(str(root / "dev"), num_utts=8, num_shards=1, seed=1)}


def options(out, data, model, init, **kwargs):
    from cosyjax.train.run import RunOptions

    base = dict(config=TRAIN_YAML, data=data["train"], model=model, out=str(out), init=init, tokenizer=TOKENIZER,
                export=False, max_frames_in_batch=320, min_length_bucket=LENGTH_BUCKET[model], min_rows_bucket=4,
                log_every=1)
    base.update(kwargs)
    return RunOptions(**base)


def train(out, data, model, init, **kwargs):
    """Run (or resume) in this process; (summary, {step: loss}, metrics records)."""
    from cosyjax.train.run import read_metrics, run

    summary = run(options(out, data, model, init, **kwargs))
    records = read_metrics(str(out))
    return summary, {r["step"]: r["loss"] for r in records if "loss" in r}, records


def assert_falls(losses: dict[int, float], factor: float) -> None:
    """Mean loss of the last five steps below ``factor`` x that of the first five."""
    steps = sorted(losses)
    first, last = np.mean([losses[s] for s in steps[:5]]), np.mean([losses[s] for s in steps[-5:]])
    assert last < factor * first, (first, last, losses)


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory, data, tiny_converted):
    out = tmp_path_factory.mktemp("run") / "llm"
    summary, losses, records = train(out, data, "llm", tiny_converted, max_steps=30, save_every=15,
                                     cv_data=data["dev"], eval_every=15)
    return {"out": str(out), "summary": summary, "losses": losses, "records": records}


# ---------------------------------------------------------------------------------------------
# the LLM: 30 steps, resume, what a run writes
# ---------------------------------------------------------------------------------------------
def test_llm_30_steps_loss_falls(llm_run):
    losses = llm_run["losses"]
    assert sorted(losses) == list(range(1, 31))
    assert_falls(losses, 0.5)
    evals = {r["step"]: r["eval_loss"] for r in llm_run["records"] if "eval_loss" in r}
    assert set(evals) == {15, 30} and evals[30] < evals[15]


def test_resume_after_step_15_continues_bit_identically(llm_run, data, tiny_converted, tmp_path):
    from cosyjax.train import checkpoint

    out = tmp_path / "resumed"
    _, first, _ = train(out, data, "llm", tiny_converted, max_steps=15, save_every=15, cv_data=data["dev"],
                        eval_every=15)
    assert sorted(first) == list(range(1, 16))
    _, losses, _ = train(out, data, "llm", tiny_converted, max_steps=30, save_every=15, cv_data=data["dev"],
                         eval_every=15)
    assert losses[30] == llm_run["losses"][30]
    assert {s: losses[s] for s in range(16, 31)} == {s: llm_run["losses"][s] for s in range(16, 31)}
    a = checkpoint.read_metadata(checkpoint.step_dir(os.path.join(llm_run["out"], "checkpoints"), 30))
    b = checkpoint.read_metadata(checkpoint.step_dir(str(out / "checkpoints"), 30))
    assert a["metadata"] == b["metadata"] and a["leaves"] == b["leaves"]


def _tensorboard_scalars(run_dir: str) -> dict[str, dict[int, float]]:
    """Scalars of the run's event files (TFRecord framing: length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*")):
        with open(path, "rb") as f:
            blob = f.read()
        pos = 0
        while pos < len(blob):
            (length,) = struct.unpack("<Q", blob[pos:pos + 8])
            event = Event.FromString(blob[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_run_writes_metrics_tensorboard_plot_and_conf(llm_run):
    out = llm_run["out"]
    train_records = [r for r in llm_run["records"] if "loss" in r]
    assert all({"step", "loss", "grad_norm", "lr", "acc", "num_tokens"} <= set(r) for r in train_records)
    scalars = _tensorboard_scalars(out)
    np.testing.assert_allclose([scalars["train/loss"][s] for s in range(1, 31)],
                               [llm_run["losses"][s] for s in range(1, 31)], rtol=1e-6)  # stored as float32
    assert set(scalars["cv/eval_loss"]) == {15, 30}
    with open(os.path.join(out, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
        conf = json.load(f)
    assert conf["train_conf"]["optim"] == "adamw" and conf["accum_grad"] == 2
    assert conf["compute_dtype"] == "float32"  # auto on CPU
    assert "resample.resample_rate" in conf["data_conf_defaulted_from_upstream"]  # not in tiny_train.yaml


def test_bf16_compute_over_float32_masters(llm_run, data, tiny_converted, tmp_path):
    """--compute-dtype bfloat16: the step computes in bf16, the checkpointed masters stay float32, and the first
    loss (same weights, same batch) is the float32 run's up to bf16 rounding.

    Bound: bf16 keeps 8 significant bits (relative rounding 2^-9) on every weight and activation; through the
    2-layer LLM the logits (|logit| < 10) move by a few hundredths, the per-token cross entropy by about as
    much, so the mean loss (about 20 at the start) by well under 1 %; rtol 2e-2.
    """
    from cosyjax.train import checkpoint

    out = tmp_path / "bf16"
    _, losses, _ = train(out, data, "llm", tiny_converted, max_steps=3, compute_dtype="bfloat16", save_every=3)
    with open(out / "run.json", encoding="utf-8") as f:
        assert json.load(f)["compute_dtype"] == "bfloat16"
    leaves = checkpoint.read_metadata(checkpoint.step_dir(str(out / "checkpoints"), 3))["leaves"]
    assert {dtype for key, (_, dtype) in leaves.items() if key.startswith("params/")} == {"float32"}
    np.testing.assert_allclose(losses[1], llm_run["losses"][1], rtol=2e-2)
    assert losses[1] != llm_run["losses"][1] and losses[3] < losses[1]


def test_train_conf_defaults_to_upstreams_when_the_yaml_has_none():
    from cosyjax.train.run import train_conf_from_yaml

    conf, defaulted = train_conf_from_yaml(os.path.join(TINY_RELEASE, "cosyvoice3.yaml"))
    assert conf == {"optim": "adam", "optim_conf": {"lr": 1e-5}, "scheduler": "constantlr",
                    "scheduler_conf": {"warmup_steps": 2500}, "grad_clip": 5.0, "accum_grad": 2, "max_epoch": 200,
                    "log_interval": 100, "save_per_step": -1}
    assert set(defaulted) >= {"optim", "optim_conf", "scheduler", "grad_clip", "accum_grad", "max_epoch"}


# ---------------------------------------------------------------------------------------------
# the flow, LoRA, DPO
# ---------------------------------------------------------------------------------------------
def test_flow_30_steps_loss_falls(data, tiny_converted, tmp_path):
    _, losses, _ = train(tmp_path / "flow", data, "flow", tiny_converted, max_steps=30)
    assert sorted(losses) == list(range(1, 31))
    assert_falls(losses, 0.5)


def test_flow_lora_30_steps_loss_falls_and_trains_adapters_only(data, tiny_converted, tmp_path):
    from cosyjax.train import checkpoint

    out = tmp_path / "flow-lora"
    _, losses, _ = train(out, data, "flow", tiny_converted, max_steps=30, lora_rank=4, lora_alpha=8.0)
    assert_falls(losses, 0.8)
    leaves = checkpoint.read_metadata(checkpoint.latest_checkpoint(str(out / "checkpoints")))["leaves"]
    params = [k for k in leaves if k.startswith("params/")]
    assert params and all(k.endswith(("/a", "/b")) for k in params), params
    moments = [k for k in leaves if k.startswith("opt_state/") and leaves[k][0]]  # non-scalar optimizer leaves
    assert moments and all(k.endswith(("/a", "/b")) for k in moments), moments


@pytest.fixture(scope="module")
def lora_llm_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("run") / "llm-lora"
    summary, losses, _ = train(out, data, "llm", TINY_RELEASE, max_steps=30, lora_rank=8, lora_alpha=16.0,
                               save_every=15, export=True, average=2, average_by="latest")
    return {"out": str(out), "summary": summary, "losses": losses}


def test_llm_lora_30_steps_loss_falls(lora_llm_run):
    assert sorted(lora_llm_run["losses"]) == list(range(1, 31))
    assert_falls(lora_llm_run["losses"], 0.8)


def test_lora_export_is_the_average_of_the_merged_checkpoints(lora_llm_run):
    """export/llm.pt converts back to the mean over steps 15 and 30 of base + scale * a @ b (our own merge)."""
    from cosyjax.convert import convert_model
    from cosyjax.convert.common import flatten_params
    from cosyjax.train import checkpoint
    from cosyjax.train.lora import LoraConfig, merge_lora

    export = lora_llm_run["summary"]["export"]
    with open(os.path.join(export, "EXPORT.json"), encoding="utf-8") as f:
        assert json.load(f) == {"checkpoints": ["step_00000015", "step_00000030"], "lora_merged": True,
                                "stage": "llm"}
    base = convert_model(TINY_RELEASE, progress=False)
    exported = convert_model(export, progress=False)
    cfg = LoraConfig.for_model("llm", 8, 16.0)
    ckpts = os.path.join(lora_llm_run["out"], "checkpoints")
    merged = []
    for step in (15, 30):
        tree = checkpoint.restore_train_state(checkpoint.step_dir(ckpts, step), _adapter_template(ckpts, step))
        merged.append(flatten_params(jax.device_get(merge_lora(base.params["llm"], tree["params"], cfg))))
    got = flatten_params(exported.params["llm"])
    for path, value in got.items():
        mean = (merged[0][path] + merged[1][path]) / 2
        np.testing.assert_allclose(value, mean, rtol=0, atol=2 * np.finfo(np.float32).eps * np.abs(mean).max(),
                                   err_msg="/".join(path))
    changed = [p for p in got if not np.array_equal(got[p], flatten_params(base.params["llm"])[p])]
    assert changed and all(p[-2] in cfg.targets for p in changed)  # only the adapted kernels moved
    for stage in ("flow", "hift"):  # the other stages are the release's
        for path, value in flatten_params(exported.params[stage]).items():
            np.testing.assert_array_equal(value, flatten_params(base.params[stage])[path])


def _adapter_template(ckpts: str, step: int):
    """A nested numpy tree with the checkpoint's leaves (zeros), to restore it without a TrainState."""
    from cosyjax.train import checkpoint

    leaves = checkpoint.read_metadata(checkpoint.step_dir(ckpts, step))["leaves"]
    tree: dict = {}
    for key, (shape, dtype) in leaves.items():
        node = tree
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = np.zeros(shape, dtype)
    return tree


def test_dpo_runs_and_its_loss_falls(data, tiny_converted, tmp_path):
    _, losses, records = train(tmp_path / "dpo", data, "llm", tiny_converted, max_steps=10, dpo=True,
                               ref=tiny_converted)
    assert_falls(losses, 0.8)
    last = [r for r in records if "loss" in r][-1]
    assert {"sft_loss", "dpo_loss", "dpo_acc", "chosen_reward", "reject_reward"} <= set(last)
    np.testing.assert_allclose(last["loss"], last["sft_loss"] + last["dpo_loss"], rtol=1e-6)


def test_bad_options_fail_before_any_work(data, tmp_path):
    from cosyjax.train.run import RunOptions, TrainError, run

    good = dataclasses.asdict(options(tmp_path / "r", data, "llm", TINY_RELEASE))
    for edit, message in (({"model": "hift"}, "--model"), ({"dpo": True}, "--ref"), ({"model": "flow", "dpo": True},
                          "--model llm"), ({"ref": TINY_RELEASE}, "--dpo"), ({"max_steps": 0}, "--max-steps"),
                          ({"data": str(tmp_path / "none.list")}, "not found")):
        with pytest.raises(TrainError, match=message):
            run(RunOptions(**{**good, **edit}))
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# two processes, one global batch
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_localhost_processes_match_one_process(data, tiny_converted, tmp_path):
    """jax.distributed over 2 CPU processes (each reading its half of the shards) gives the loss curve of one
    process that reads both halves (``data_ranks=2``): the same global batches, summed in another order.

    Bound: float32 reassociation of the cross-device sums, a few ulps per step, through 8 Adam steps
    whose updates are normalised (measured 1.3e-7 relative); rtol 1e-5.
    """
    _, one, _ = train(tmp_path / "one", data, "llm", tiny_converted, max_steps=8, data_ranks=2, save_every=4)
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "cosyjax.cli", "train", "--config", TRAIN_YAML, "--data", data["train"], "--model",
           "llm", "--init", tiny_converted, "--tokenizer", TOKENIZER, "--out", str(tmp_path / "two"), "--max-steps",
           "8", "--save-every", "4", "--no-export", "--max-frames-in-batch", "320", "--min-length-bucket", "128",
           "--min-rows-bucket", "4", "--log-every", "1", "--coordinator", f"localhost:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    from cosyjax.train.run import read_metrics

    two = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "two")) if "loss" in r}
    assert sorted(two) == sorted(one) == list(range(1, 9))
    np.testing.assert_allclose([two[s] for s in range(1, 9)], [one[s] for s in range(1, 9)], rtol=1e-5)
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["step_00000004", "step_00000008"]


# ---------------------------------------------------------------------------------------------
# upstream loads the export
# ---------------------------------------------------------------------------------------------
REFERENCE_REPO = os.environ.get("COSYJAX_REFERENCE_REPO")


@pytest.mark.upstream
@pytest.mark.skipif(not REFERENCE_REPO, reason="set COSYJAX_REFERENCE_REPO to an upstream CosyVoice checkout")
def test_exported_run_loads_in_upstream_strictly(lora_llm_run):
    """The fine-tuned export builds with upstream's load_hyperpyyaml and loads with strict load_state_dict,
    and upstream's module holds the merged kernels."""
    from cosyjax.convert import convert_model
    from cosyjax.parity.reference.release import build_models, load_weights
    from cosyjax.parity.upstream import import_upstream

    import_upstream(REFERENCE_REPO)
    export = lora_llm_run["summary"]["export"]
    models = build_models(export)
    load_weights(models, export)  # strict=True, as CosyVoiceModel.load
    ours = convert_model(export, progress=False).params["llm"]
    q = models["llm"].llm.model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(q, ours["llm"]["layers_0"]["self_attn"]["q_proj"]["kernel"].T)
