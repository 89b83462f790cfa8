"""Train-state checkpoints: resume gives the same next loss; clear errors; atomic; rotation."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from cosyjax.train.checkpoint import (
    TrainCheckpointError, checkpoint_steps, latest_checkpoint, read_metadata, restore_train_state, save_checkpoint,
    save_train_state)
from cosyjax.train.step import TrainState, make_optimizer, make_train_step
from test_train_step import llm_batch, llm_loss_fn, tiny_llm


@pytest.fixture(scope="module")
def run():
    """A tiny LLM run: config, initial params, optimizer, jitted step and 4 batches."""
    cfg, params = tiny_llm()
    tx = make_optimizer(lr=3e-3, scheduler="warmuplr", warmup_steps=2)
    step = make_train_step(llm_loss_fn(cfg), tx, accum_steps=2)
    batches = [llm_batch(cfg, 4, seed=s) for s in range(4)]
    return cfg, params, tx, step, batches


def test_resume_gives_the_same_next_loss(run, tmp_path):
    cfg, params, tx, step, batches = run
    state = TrainState.create(params, tx, 11)
    for b in batches[:3]:
        state, _ = step(state, b)
    path = save_train_state(str(tmp_path / "ckpt"), state, metadata={"note": "k=3"})
    state, uninterrupted = step(state, batches[3])

    fresh = TrainState.create(tiny_llm(seed=5)[1], make_optimizer(lr=3e-3, scheduler="warmuplr", warmup_steps=2), 0)
    restored = restore_train_state(path, fresh)
    assert int(restored.step) == 3
    restored, resumed = step(restored, batches[3])
    for key in ("loss", "grad_norm", "lr", "acc"):
        assert float(resumed[key]) == float(uninterrupted[key]), key  # bitwise
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(restored))
    meta = read_metadata(path)
    assert meta["step"] == 3 and meta["metadata"] == {"note": "k=3"}


def test_errors(run, tmp_path):
    cfg, params, tx, step, batches = run
    state = TrainState.create(params, tx, 0)
    path = save_train_state(str(tmp_path / "c"), state)
    with pytest.raises(TrainCheckpointError, match="checkpoint exists"):
        save_train_state(path, state)
    with pytest.raises(TrainCheckpointError, match="not found"):
        restore_train_state(str(tmp_path / "nowhere"), state)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(TrainCheckpointError, match="not a train-state checkpoint"):
        restore_train_state(str(tmp_path / "empty"), state)
    # another optimizer: adamw + constant lr has other opt_state leaves
    other = TrainState.create(params, make_optimizer(optim="adamw", weight_decay=0.1, grad_clip=None), 0)
    with pytest.raises(TrainCheckpointError, match="does not fit the template"):
        restore_train_state(path, other)
    # another model size: a shape mismatch names the leaf and both shapes
    wide = jax.tree.map(lambda x: np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype)
                        if x.ndim == 2 else x, params)
    with pytest.raises(TrainCheckpointError, match=r"params/llm_decoder/kernel: saved \(32, 216\) float32, "
                                                   r"expected \(32, 217\) float32"):
        restore_train_state(path, TrainState.create(wide, tx, 0))
    meta = json.load(open(os.path.join(path, "meta.json")))
    meta["format"] = "something-else"
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    with pytest.raises(TrainCheckpointError, match="format 'something-else'"):
        restore_train_state(path, state)


def test_failed_save_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        save_train_state(str(tmp_path / "bad"), {"step": np.zeros((), np.int32)}, metadata={"x": object()})
    assert os.listdir(tmp_path) == []


def test_rotation_and_latest(run, tmp_path):
    cfg, params, tx, step, batches = run
    state = TrainState.create(params, tx, 0)
    run_dir = str(tmp_path / "run")
    assert latest_checkpoint(run_dir) is None
    for b in batches[:3]:
        state, _ = step(state, b)
        save_checkpoint(run_dir, state, keep=2)
    assert checkpoint_steps(run_dir) == [2, 3]
    assert latest_checkpoint(run_dir).endswith("step_00000003")
    restored = restore_train_state(run_dir, TrainState.create(params, tx, 0))  # a run dir: its latest step
    assert int(restored.step) == 3


def test_replicated_state_round_trip_keeps_shardings(run, tmp_path):
    """A pmap-replicated state (leading device axis) saves and restores onto the template's shardings."""
    from cosyjax.train.parallel import make_mesh, replicate, replicate_for_pmap

    cfg, params, tx, step, batches = run
    stacked = replicate_for_pmap(TrainState.create(params, tx, 1))
    path = save_checkpoint(str(tmp_path / "run"), stacked)
    assert path.endswith("step_00000000")
    back = restore_train_state(path, replicate_for_pmap(TrainState.create(tiny_llm(seed=2)[1], tx, 0)))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(stacked), jax.device_get(back))
    assert all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(back)))
    mesh = make_mesh()
    on_mesh = restore_train_state(save_train_state(str(tmp_path / "one"), TrainState.create(params, tx, 1)),
                                  replicate(TrainState.create(params, tx, 0), mesh))
    assert all(x.sharding.is_fully_replicated and x.committed for x in jax.tree.leaves(on_mesh))
