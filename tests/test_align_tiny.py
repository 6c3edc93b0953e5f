"""`align` end to end on a tiny random model (direction -> mine -> distill) through the CLI,
adapters that mlx-lm loads, and a killed `distill` resumed to the same adapters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny import tiny_run_inputs

from safesteer_mlx.cli import main
from safesteer_mlx.run import RunDir


def _argv(command: str, model_dir: Path, run: Path, data: Path, *extra: str) -> list[str]:
    return [
        command, "--model", str(model_dir), "--run-dir", str(run),
        "--harmful", str(data / "harmful.json"), "--harmless", str(data / "harmless.json"),
        "--n-train", "8", "--n-val", "4", "--positions", "last", "--no-filter",
        "--horizon", "3", "--top-k", "8", "--num-tokens", "12",
        "--num-prompts", "8", "--generations", "2", "--max-tokens", "6",
        "--train-batch-size", "2", "--lr", "1e-2", "--lora-rank", "4",
        "--seed", "3", "--quiet", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    return root, tiny_run_inputs(root)


@pytest.fixture(scope="module")
def aligned(setup):
    root, model_dir = setup
    run = root / "run"
    assert main(_argv("align", model_dir, run, root, "--json")) == 0
    return run


def _adapters(run: Path) -> dict[str, np.ndarray]:
    weights = mx.load(str(run / "adapters" / "adapters.safetensors"))
    return {k: np.array(v) for k, v in weights.items()}


def test_align_writes_every_artifact(aligned):
    run = aligned
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    assert [manifest[s]["status"] for s in ("direction", "mining", "distill")] == ["done"] * 3
    tokens = json.loads((run / "safety_tokens.json").read_text())
    assert 0 < len(tokens["tokens"]) <= 12
    votes = [t["votes"] for t in tokens["tokens"]]
    assert votes == sorted(votes, reverse=True) and min(votes) > 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        for key in ("loss", "kl_S", "lr", "grad_norm", "rollout_tokens_per_s",
                    "train_tokens_per_s", "peak_mem_gb", "seconds"):  # fmt: skip
            assert key in m and np.isfinite(m[key])
    # cosine schedule with 10% warm-up over 4 steps: warm-up rounds to 0 steps, then decay
    assert metrics[0]["lr"] == pytest.approx(1e-2) and metrics[-1]["lr"] < metrics[0]["lr"]
    weights = _adapters(run)
    assert weights and all(k.endswith(("lora_a", "lora_b")) for k in weights)
    assert any(np.abs(v).max() > 0 for k, v in weights.items() if k.endswith("lora_b"))
    config = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 4


def test_adapters_load_in_mlx_lm(aligned, setup):
    """mlx_lm.load(model, adapter_path=run/adapters) gives the student we trained."""
    from mlx_lm import load

    from safesteer_mlx.adapters import attach, read_adapter_config
    from safesteer_mlx.modeling import load_model

    _, model_dir = setup
    model, _ = load(str(model_dir), adapter_path=str(aligned / "adapters"))
    ours = load_model(str(model_dir))
    attach(ours.model, read_adapter_config(aligned / "adapters"))
    ours.model.load_weights(str(aligned / "adapters" / "adapters.safetensors"), strict=False)
    tokens = mx.array([[1, 40, 41, 42, 43, 2, 201]])
    a, b = np.array(model(tokens)), np.array(ours.model(tokens))
    np.testing.assert_allclose(a, b, atol=1e-5)
    base = np.array(load_model(str(model_dir)).model(tokens))
    assert not np.allclose(a, base, atol=1e-4)  # the adapters changed the model


def test_rerun_skips_every_stage(aligned, setup):
    root, model_dir = setup
    before = json.loads((aligned / "manifest.json").read_text())["stages"]
    assert main(_argv("align", model_dir, aligned, root)) == 0
    after = json.loads((aligned / "manifest.json").read_text())["stages"]
    assert {s: after[s]["finished"] for s in after} == {s: before[s]["finished"] for s in before}


def test_eval_of_a_run_keeps_its_split_and_stages(aligned):
    """`eval --run-dir` with --quick/--seed changes only [eval]: the run's data split, seed and
    stages stay as trained (the held-out prompts must not move onto distilled ones)."""
    from safesteer_mlx.config import load_config

    before = load_config(aligned / "config.toml")
    stages = json.loads((aligned / "manifest.json").read_text())["stages"]
    argv = ["eval", "--run-dir", str(aligned), "--quick", "--seed", "9", "--quiet"]
    assert main([*argv, "--max-tokens", "4", "--force"]) == 0
    after = load_config(aligned / "config.toml")
    assert after.seed == before.seed and after.eval.max_tokens == 4
    for section in ("model", "data", "direction", "mining", "distill"):
        assert getattr(after, section) == getattr(before, section), section
    now = json.loads((aligned / "manifest.json").read_text())["stages"]
    for s in ("direction", "mining", "distill"):
        assert now[s] == stages[s], s


def test_coefficient_override_reruns_mining_and_distill(aligned, setup, capsys):
    """Overriding only the coefficient (same layer, same direction bytes) is a new teacher:
    mining and distillation are no longer current and rerun."""
    from safesteer_mlx.session import override_direction

    root, model_dir = setup
    meta = json.loads((aligned / "direction.json").read_text())
    override_direction(RunDir(aligned), meta["layer"], meta["coefficient"] * 2)
    before = json.loads((aligned / "manifest.json").read_text())["stages"]
    assert main(_argv("mine", model_dir, aligned, root)) == 0
    after = json.loads((aligned / "manifest.json").read_text())["stages"]
    assert after["mining"]["finished"] != before["mining"]["finished"]
    # distill is stale too: it does not skip, it asks before replacing the earlier checkpoints
    assert main(_argv("distill", model_dir, aligned, root)) == 2
    assert "--resume to continue it, or --force" in capsys.readouterr().err


def test_killed_distill_resumes_to_the_same_adapters(setup, tmp_path):
    root, model_dir = setup
    extra = ("--save-every", "1", "--train-batch-size", "1", "--epochs", "3")
    # Reference: one uninterrupted run.
    ref = tmp_path / "ref"
    assert main(_argv("align", model_dir, ref, root, *extra)) == 0
    # Same stages 1-2, then distill in a child process killed (SIGKILL) mid-run.
    run = tmp_path / "run"
    assert main(_argv("direction", model_dir, run, root, *extra)) == 0
    assert main(_argv("mine", model_dir, run, root, *extra)) == 0
    argv = _argv("distill", model_dir, run, root, *extra)
    cmd = [sys.executable, "-m", "safesteer_mlx.cli", *argv]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = run / "adapters" / "checkpoints"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        if len(list(ckpts.glob("step-*/state.json"))) >= 3:
            break
        time.sleep(0.02)
    assert child.poll() is None, f"distill ended before it could be killed: {child.stderr.read()}"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (run / "adapters" / "adapters.safetensors").exists()  # it really died mid-run
    stage = json.loads((run / "manifest.json").read_text())["stages"]["distill"]
    assert stage["status"] == "running"  # killed: nothing got to record an ending

    # Without --resume the old checkpoints are not silently thrown away.
    assert main(_argv("distill", model_dir, run, root, *extra)) == 2
    assert main(_argv("distill", model_dir, run, root, *extra, "--resume")) == 0
    a, b = _adapters(ref), _adapters(run)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=1e-5, err_msg=k)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    total = json.loads((run / "manifest.json").read_text())["stages"]["distill"]["steps"]
    assert total == 24  # 8 train prompts (n_train), one per step, 3 epochs
    assert steps == list(range(1, total + 1))  # each step logged once, none lost or doubled
