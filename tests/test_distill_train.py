"""The training loop's switches on a tiny model: QLoRA on a quantized base, gradient
checkpointing, a stop request (Ctrl-C / UI) that checkpoints first, and a non-finite loss."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from tiny import tiny_model

from safesteer_mlx.config import Config
from safesteer_mlx.distill import build_batch
from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.modeling import forward_hidden
from safesteer_mlx.trainer import Trainer

ROWS = [[1, 40, 41, 42, 2, 201, 1, 67], [1, 50, 51, 2, 201, 1, 67]]
RESPONSES = [[70, 71, 72, 73, 2], [80, 81, 82]]
SAFETY = list(range(60, 110))


def _trainer(loaded, **distill) -> Trainer:
    config = Config()
    config.distill.lr = 1e-3
    for key, value in distill.items():
        setattr(config.distill, key, value)
    direction = mx.random.normal((loaded.hidden_size,), key=mx.random.key(3)) * 5
    return Trainer(loaded, config, direction, 1, 1.0, SAFETY, steps=10)


def _grads(trainer: Trainer):
    batch = build_batch(ROWS, RESPONSES)
    with trainer.teacher():
        teacher_hidden = mx.stop_gradient(forward_hidden(trainer.model, batch.tokens))
    (loss, _), grads = trainer._loss_and_grad(batch.tokens, batch.mask, teacher_hidden)
    mx.eval(loss, grads)
    return float(loss), grads


def _perturb_lora(model) -> None:
    """Nonzero lora_b, so the student differs from the teacher's base."""
    key = mx.random.key(7)
    params = tree_flatten(model.trainable_parameters())
    model.update(
        tree_unflatten([(k, v + 0.05 * mx.random.normal(v.shape, key=key)) for k, v in params])
    )


def test_qlora_on_a_quantized_base():
    loaded = tiny_model(seed=0, hidden=64)
    nn.quantize(loaded.model, group_size=32, bits=4)
    quantized = {k: np.array(v) for k, v in tree_flatten(loaded.model.parameters())}
    trainer = _trainer(loaded)
    layers = [m for _, m in loaded.model.named_modules() if hasattr(m, "lora_a")]
    assert layers and all(isinstance(m.linear, nn.QuantizedLinear) for m in layers)
    trainable = dict(tree_flatten(loaded.model.trainable_parameters()))
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    _perturb_lora(loaded.model)
    loss, grads = _grads(trainer)
    flat = dict(tree_flatten(grads))
    assert np.isfinite(loss) and any(np.abs(np.array(g)).max() > 0 for g in flat.values())
    trainer.apply(grads)
    after = dict(tree_flatten(loaded.model.parameters()))
    checked = 0
    for name, value in quantized.items():  # the 4-bit base (weights, scales, biases) is untouched
        stem, _, leaf = name.rpartition(".")
        key = name if name in after else f"{stem}.linear.{leaf}"
        np.testing.assert_array_equal(np.array(after[key]), value, err_msg=name)
        checked += 1
    assert checked == len(quantized) and any(".linear." in k for k in after)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = _trainer(tiny_model(seed=2))
    _perturb_lora(plain.model)
    want_loss, want = _grads(plain)
    want = dict(tree_flatten(want))
    checkpointed_model = tiny_model(seed=2)
    ckpt = _trainer(checkpointed_model, grad_checkpoint=True)
    ckpt.model.update(plain.model.trainable_parameters())
    got_loss, got = _grads(ckpt)
    got = dict(tree_flatten(got))
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(np.array(got[k]), np.array(want[k]), rtol=1e-4, atol=1e-6)


@pytest.fixture()
def tiny_run(tmp_path):
    """A run directory with stages 1 and 2 done on the tiny model."""
    from safesteer_mlx.direction import run_direction
    from safesteer_mlx.mining import run_mining
    from safesteer_mlx.run import RunDir

    root = tmp_path
    (root / "harmful.json").write_text(json.dumps([f"hurt person {i} badly" for i in range(12)]))
    (root / "harmless.json").write_text(json.dumps([f"bake cake {i} nicely" for i in range(12)]))
    config = Config()
    config.data.harmful = str(root / "harmful.json")
    config.data.harmless = str(root / "harmless.json")
    d = config.direction
    d.n_train, d.n_val, d.positions, d.filter_train, d.check_tokens = 8, 4, "last", False, 4
    config.mining.generations, config.mining.horizon, config.mining.num_tokens = 2, 3, 10
    c = config.distill
    c.num_prompts, c.generations, c.max_tokens, c.batch_size, c.save_every = 8, 2, 4, 1, 0
    loaded = tiny_model(seed=4)
    run = RunDir(root / "run")
    run_direction(config, run, loaded=loaded)
    run_mining(config, run, loaded=loaded)
    return config, run, loaded


def test_stop_request_checkpoints_first_and_resume_finishes(tiny_run):
    from safesteer_mlx.distill import run_distill

    config, run, loaded = tiny_run
    calls = {"n": 0}

    def stop_after_three():
        calls["n"] += 1
        return calls["n"] >= 3

    with pytest.raises(KeyboardInterrupt):
        run_distill(config, run, loaded=loaded, should_stop=stop_after_three)
    steps = sorted(p.name for p in (run.adapters / "checkpoints").iterdir())
    assert steps == ["step-000003"]  # save_every 0: only the stop wrote one
    assert run.stage("distill")["status"] == "interrupted"
    assert not (run.adapters / "adapters.safetensors").exists()
    run_distill(config, run, loaded=tiny_model(seed=4), resume=True)
    assert run.stage("distill")["status"] == "done"
    metrics = [json.loads(x) for x in run.metrics.read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_run, monkeypatch):
    from safesteer_mlx import distill, trainer

    config, run, loaded = tiny_run
    config.distill.save_every = 1
    real_step = trainer.Trainer.step

    def step(self, step, prompts):
        metrics, grads = real_step(self, step, prompts)
        if step == 2:
            metrics["loss"] = float("nan")
        return metrics, grads

    monkeypatch.setattr(trainer.Trainer, "step", step)
    with pytest.raises(SafeSteerError, match="not finite at step 3"):
        distill.run_distill(config, run, loaded=loaded)
    ckpts = sorted(p.name for p in (run.adapters / "checkpoints").iterdir())
    assert ckpts == ["step-000001", "step-000002"]
    assert run.stage("distill")["status"] == "failed"
    assert len(run.metrics.read_text().splitlines()) == 2  # the bad step is not logged


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_dora_and_full_fine_tuning_keep_a_base_for_the_teacher(kind):
    """After an update the student differs from the base, while the teacher/base context still
    computes the original weights bit for bit (DoRA: its layers bypassed; full fine-tuning: the
    saved copy swapped in)."""
    loaded = tiny_model(seed=5)
    tokens = mx.array([ROWS[0] + RESPONSES[0]])
    base_logits = np.array(loaded.model(tokens))
    trainer = _trainer(loaded, fine_tune_type=kind)
    trainable = dict(tree_flatten(loaded.model.trainable_parameters()))
    if kind == "dora":
        assert trainable and all(k.endswith(("lora_a", "lora_b", ".m")) for k in trainable)
    else:
        assert "model.layers.0.self_attn.q_proj.weight" in trainable
        assert not any("norm" in k or "embed" in k or "lm_head" in k for k in trainable)
    for _ in range(2):
        _, grads = _grads(trainer)
        trainer.apply(grads)
    student = np.array(loaded.model(tokens))
    with trainer.base():
        again = np.array(loaded.model(tokens))
    assert not np.allclose(student, base_logits, atol=1e-5)
    np.testing.assert_array_equal(again, base_logits)
    np.testing.assert_array_equal(np.array(loaded.model(tokens)), student)  # student restored
