"""DPO (cosyjax.train.dpo): parity with upstream's DPO step on the committed case tests/data/tiny-dpo, and the
loss's own rules.

tiny-dpo's group ``train_dpo`` was made by make-case from upstream: ``Qwen2LM.forward_dpo`` on the policy
(the case's llm.pt) and on a frozen reference (model/llm.ref.pt), ``DPOLoss``, the sft term, every draw
recorded, and torch's autograd gradient of every policy parameter.  The ``upstream`` test regenerates
such a case at other sizes and checks it.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA

CASE = os.path.join(DATA, "tiny-dpo")


@pytest.fixture(scope="module")
def case():
    from cosyjax.parity.case import load_case

    return load_case(CASE)


@pytest.fixture(scope="module")
def model(case):
    from cosyjax.convert import convert_model

    return convert_model(case.model_dir, progress=False)


def test_dpo_group_is_registered(case):
    from cosyjax.parity.check import select_groups
    from cosyjax.parity.stages import runners, stage_of

    assert stage_of("train_dpo") == "train" and "train_dpo" in runners()
    assert "train_dpo" in select_groups(case, ["train"])


def test_dpo_group_meets_the_issue_bounds(case, model):
    """Loss within 1e-5 relative and every policy gradient within 1e-4 of upstream (the acceptance bounds);
    the runner's own tolerances (parity/stages/train.py) are tighter."""
    from cosyjax.parity.stages.train import RUNNERS

    result = RUNNERS["train_dpo"](case, "train_dpo", model)
    by_key = {c.key: c for c in result.comparisons}
    assert all(c.passed for c in result.comparisons), [c for c in result.comparisons if not c.passed]
    assert by_key["train_dpo/loss"].rel <= 1e-5 and by_key["train_dpo/dpo_loss"].rel <= 1e-5
    grads = [c for k, c in by_key.items() if "/grad/" in k]
    assert len(grads) == len(jax.tree.leaves(model.params["llm"]))  # every parameter compared
    assert max(c.rel for c in grads) <= 1e-4
    for key in ("policy_lm_target", "ref_lm_target", "policy_lm_input_len", "ref_lm_input_len"):
        assert by_key[f"train_dpo/{key}"].max_abs == 0


def test_case_covers_the_branches(case):
    """Bistream and unistream rows, reference layouts drawn apart from the policy's, a preference term whose
    gradient matters (beta 1), and a reference that differs from the policy."""
    a = case.group("train_dpo")
    assert set(a["policy_bistream"].tolist()) == {0, 1}
    assert (a["policy_bistream"] != a["ref_bistream"]).any()
    policy, ref = a["policy_lm_target"], a["ref_lm_target"]
    assert policy.shape != ref.shape or (policy != ref).any()
    assert float(a["beta"]) == 1.0 and (a["chosen_logps"] != a["ref_chosen_logps"]).all()
    assert float(a["dpo_loss"]) != pytest.approx(np.log(2), abs=1e-4)


def test_sequence_logps_masks():
    """target: mean log-prob of the targets; upstream: mean log-prob of token 0 where the target is IGNORE_ID."""
    from cosyjax.train.dpo import sequence_logps
    from cosyjax.train.losses import IGNORE_ID

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (3, 7)).astype(np.int32)
    targets[:, :2] = IGNORE_ID
    targets[1, 5:] = IGNORE_ID
    logp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    for row in range(3):
        keep = targets[row] != IGNORE_ID
        got = np.asarray(sequence_logps(jnp.asarray(logits), jnp.asarray(targets), mask="target"))[row]
        np.testing.assert_allclose(got, logp[row, keep, targets[row, keep]].mean(), rtol=1e-6)
        got = np.asarray(sequence_logps(jnp.asarray(logits), jnp.asarray(targets), mask="upstream"))[row]
        np.testing.assert_allclose(got, logp[row, ~keep, 0].mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="mask='both'"):
        sequence_logps(jnp.asarray(logits), jnp.asarray(targets), mask="both")


def test_reference_equal_to_policy_gives_log2_and_zero_rewards(case, model):
    """z = 0 when the reference is the policy: DPOLoss is log 2, the rewards are 0, and the total is the sft loss
    plus log 2, for either mask."""
    from cosyjax.parity.stages.train import dpo_batch
    from cosyjax.train.dpo import dpo_loss

    cfg = model.config.llm
    batch = dpo_batch(case, "train_dpo", cfg)
    batch.update({k[len("ref_"):]: v for k, v in batch.items() if k.startswith("ref_")})  # one layout for both
    params = jax.tree.map(jnp.asarray, model.params["llm"])
    for mask in ("target", "upstream"):
        loss, aux = dpo_loss(params, params, batch, cfg=cfg, beta=0.01, mask=mask)
        np.testing.assert_allclose(float(aux["dpo_loss"]), np.log(2), rtol=1e-6)
        assert float(aux["chosen_reward"]) == 0 and float(aux["reject_reward"]) == 0
        np.testing.assert_allclose(float(loss), float(aux["sft_loss"]) + np.log(2), rtol=1e-6)


def test_bad_dpo_batches(case, model):
    from cosyjax.parity.stages.train import dpo_batch
    from cosyjax.train.dpo import dpo_loss

    cfg = model.config.llm
    batch = dpo_batch(case, "train_dpo", cfg)
    params = model.params["llm"]
    with pytest.raises(ValueError, match="missing key"):
        dpo_loss(params, params, {k: v for k, v in batch.items() if k != "ref_targets"}, cfg=cfg)
    flat = dict(batch, ids=batch["ids"][:, 0])
    with pytest.raises(ValueError, match=r"expected \[B, 2, T\]"):
        dpo_loss(params, params, flat, cfg=cfg)


REFERENCE_REPO = os.environ.get("COSYJAX_REFERENCE_REPO")


@pytest.mark.upstream
@pytest.mark.skipif(not REFERENCE_REPO, reason="set COSYJAX_REFERENCE_REPO to an upstream CosyVoice source checkout")
def test_dpo_case_from_upstream_passes(tmp_path):
    """make-case with ``dpo: true`` on the micro config (other sizes and seed), then check the group."""
    from cosyjax.parity.check import run_check
    from cosyjax.parity.make_case import make_case

    with open(os.path.join(DATA, "configs", "micro.yaml"), encoding="utf-8") as f:
        text = f.read()
    config = tmp_path / "micro-dpo.yaml"
    config.write_text(text.replace("name: micro", "name: micro-dpo") + "dpo: true\n", encoding="utf-8")
    out = make_case(REFERENCE_REPO, str(config), 11, str(tmp_path / "case"), progress=False)
    report = run_check(out, str(tmp_path / "report"), stages=["train"], progress=False)
    assert {g["group"]: g["status"] for g in report["groups"]} == {"train_dpo": "pass"}, report["groups"]
