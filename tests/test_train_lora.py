"""LoRA (cosyjax.train.lora): the merge, what is trained, and that a merged export equals the adapted forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="module")
def model(tiny_converted):
    from cosyjax.checkpoint import load_converted

    return load_converted(tiny_converted)


def _random_adapters(params, cfg, seed):
    """Adapters with both factors random (a fresh init has b = 0, so its update is zero)."""
    from cosyjax.train.lora import init_lora

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32),
                        init_lora(params, cfg, seed))


def test_merge_is_w_plus_scaled_product(model):
    from cosyjax.convert.common import flatten_params
    from cosyjax.train.lora import LoraConfig, init_lora, merge_lora

    cfg = LoraConfig.for_model("llm", rank=4, alpha=6.0)
    base = model.params["llm"]
    fresh = flatten_params(jax.device_get(merge_lora(base, init_lora(base, cfg, 0), cfg)))
    for path, value in flatten_params(base).items():  # a fresh init (b = 0) is the base model exactly
        np.testing.assert_array_equal(fresh[path], value)
    adapters = _random_adapters(base, cfg, 1)
    merged = flatten_params(jax.device_get(merge_lora(base, adapters, cfg)))
    flat_base = flatten_params(base)
    adapted = 0
    for path, value in merged.items():
        if path[-1] == "kernel" and path[-2] in cfg.targets:
            node = adapters
            for part in path[:-1]:
                node = node[part]
            want = flat_base[path].astype(np.float64) + 1.5 * node["a"].astype(np.float64) @ node["b"]
            np.testing.assert_allclose(value, want, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(want).max())
            adapted += 1
        else:
            np.testing.assert_array_equal(value, flat_base[path])
    assert adapted == 7 * model.config.llm.num_layers  # q k v o gate up down in every layer


def test_targets_must_exist(model):
    from cosyjax.train.lora import LoraConfig, init_lora, merge_lora

    with pytest.raises(ValueError, match=r"\['qproj'\] match no 2-D kernel"):
        init_lora(model.params["llm"], LoraConfig(rank=2, targets=("q_proj", "qproj")), 0)
    with pytest.raises(ValueError, match="modules the params do not have"):
        merge_lora(model.params["llm"], {"llm": {"nope": {"a": np.zeros((2, 1)), "b": np.zeros((1, 2))}}},
                   LoraConfig(rank=1, targets=("q_proj",)))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0, targets=("q_proj",))


def test_only_adapters_are_trained(model):
    """The optimizer state holds adapter moments only, the base is not changed, and the loss falls."""
    from cosyjax.train.losses import llm_loss, prepare_llm_batch
    from cosyjax.train.lora import LoraConfig, init_lora, lora_loss
    from cosyjax.train.step import TrainState, make_optimizer, make_train_step

    cfg = model.config.llm
    lora = LoraConfig.for_model("llm", rank=4, alpha=8.0)
    base = jax.tree.map(jnp.asarray, model.params["llm"])
    adapters = init_lora(base, lora, 0)
    optimizer = make_optimizer(optim="adamw", lr=1e-2)
    state = TrainState.create(adapters, optimizer, 0)
    adapter_shapes = sorted(np.shape(x) for x in jax.tree.leaves(adapters))
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x)]
    assert sorted(np.shape(x) for x in moments) == sorted(adapter_shapes * 2)  # Adam's mu and nu, nothing else
    rng = np.random.default_rng(0)
    text = [rng.integers(0, cfg.vocab_size, 5) for _ in range(4)]
    speech = [rng.integers(0, cfg.speech_token_size, 12) for _ in range(4)]
    batch = prepare_llm_batch(cfg, text, speech)
    step = make_train_step(lora_loss(lambda p, b, r: llm_loss(p, b, cfg=cfg), lora), optimizer,
                           weight_key="num_tokens", with_frozen=True)
    frozen = {"base": base}
    before = jax.tree.map(np.array, base)
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch, frozen)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, base))


def test_merged_llm_export_equals_the_adapted_forward(model, tmp_path):
    """llm.pt written from the merge, read back by the converter, gives the loss and logits that training saw."""
    import torch

    from cosyjax.convert import llm as convert_llm
    from cosyjax.convert.common import load_state_dict
    from cosyjax.convert.export import export_llm, to_torch
    from cosyjax.train.losses import llm_logits, llm_loss, prepare_llm_batch
    from cosyjax.train.lora import LoraConfig, lora_loss, merge_lora

    cfg = model.config.llm
    lora = LoraConfig.for_model("llm", rank=4, alpha=8.0)
    base = model.params["llm"]
    adapters = _random_adapters(base, lora, 2)
    path = str(tmp_path / "llm.pt")
    torch.save(to_torch(export_llm(jax.device_get(merge_lora(base, adapters, lora)), cfg)), path)
    exported = convert_llm.convert(load_state_dict(path), cfg, path)
    rng = np.random.default_rng(1)
    batch = prepare_llm_batch(cfg, [rng.integers(0, cfg.vocab_size, 6) for _ in range(3)],
                              [rng.integers(0, cfg.speech_token_size, 20) for _ in range(3)])
    adapted = jax.jit(lora_loss(lambda p, b, r: llm_loss(p, b, cfg=cfg), lora))(adapters, batch, None, {"base": base})
    plain = jax.jit(lambda p, b: llm_loss(p, b, cfg=cfg))(exported, batch)
    assert float(adapted[0]) == float(plain[0])
    args = (jnp.asarray(batch["ids"]), jnp.asarray(batch["is_speech"]), jnp.asarray(batch["lengths"]))
    np.testing.assert_array_equal(np.asarray(llm_logits(merge_lora(base, adapters, lora), *args, cfg=cfg)),
                                  np.asarray(llm_logits(exported, *args, cfg=cfg)))
    assert float(plain[0]) != float(jax.jit(lambda p, b: llm_loss(p, b, cfg=cfg))(base, batch)[0])  # it did adapt


def test_merged_flow_export_equals_the_adapted_forward(model, tmp_path):
    import torch

    from cosyjax.convert import flow as convert_flow
    from cosyjax.convert.common import load_state_dict
    from cosyjax.convert.export import export_flow, to_torch
    from cosyjax.train.losses import flow_loss, sample_flow_draws
    from cosyjax.train.lora import LoraConfig, lora_loss, merge_lora

    cfg = model.config.flow
    lora = LoraConfig.for_model("flow", rank=2)
    base = model.params["flow"]
    adapters = _random_adapters(base, lora, 3)
    path = str(tmp_path / "flow.pt")
    torch.save(to_torch(export_flow(jax.device_get(merge_lora(base, adapters, lora)), cfg)), path)
    exported = convert_flow.convert(load_state_dict(path), cfg, path)
    rng = np.random.default_rng(2)
    n = 12
    batch = {"speech_token": rng.integers(0, cfg.vocab_size, (2, n)).astype(np.int32),
             "speech_token_len": np.asarray([12, 9], np.int32),
             "speech_feat": rng.normal(size=(2, 2 * n, cfg.output_size)).astype(np.float32),
             "speech_feat_len": np.asarray([24, 18], np.int32),
             "embedding": rng.normal(size=(2, cfg.spk_embed_dim)).astype(np.float32)}
    draws = sample_flow_draws(jax.random.key(0), batch, cfg=cfg)

    def loss(p, b, r):
        return flow_loss(p, b, r, cfg=cfg, draws=draws)

    adapted = jax.jit(lora_loss(loss, lora))(adapters, batch, None, {"base": base})
    plain = jax.jit(loss)(exported, batch, None)
    assert float(adapted[0]) == float(plain[0])
    assert float(plain[0]) != float(jax.jit(loss)(base, batch, None)[0])


def test_step_state_is_small_with_lora(model):
    """What a LoRA run checkpoints: adapter leaves and their moments (no base weights)."""
    from cosyjax.train.lora import LoraConfig, init_lora
    from cosyjax.train.step import TrainState, make_optimizer

    base = model.params["flow"]
    adapters = init_lora(base, LoraConfig.for_model("flow", rank=2), 0)
    state = TrainState.create(adapters, make_optimizer(), 0)
    count = sum(int(np.size(x)) for x in jax.tree.leaves(state.params))
    assert count == sum(int(np.size(x)) for x in jax.tree.leaves(adapters))
    assert count * 10 < sum(int(np.size(x)) for x in jax.tree.leaves(base))
