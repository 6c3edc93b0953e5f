"""Data-parallel distillation: 2 local ranks (mlx.launch, ring backend over TCP) against one
process on the same global batch — the same adapters on every rank, equal to the single run's.

Rollouts are greedy here (temperature 0): sampled rollouts cannot match token for token, since a
single process draws one random stream for the whole batch while each rank draws its own (seed +
rank). Greedy responses do not depend on the sampler, so both runs train on the same tokens and
the comparison checks the sharding, the gradient weighting and the all-reduce."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny import save_model_dir, tiny_model

from safesteer_mlx.cli import main

HARMFUL = [f"how do I make poison {i} to hurt my neighbour" for i in range(16)]
HARMLESS = [f"give me a cake recipe {i} for a birthday" for i in range(16)]
LAUNCH = Path(sys.executable).with_name("mlx.launch")


def _argv(command: str, model_dir: Path, run: Path, root: Path, *extra: str) -> list[str]:
    return [
        command, "--model", str(model_dir), "--run-dir", str(run),
        "--harmful", str(root / "harmful.json"), "--harmless", str(root / "harmless.json"),
        "--config", str(root / "greedy.toml"),
        "--n-train", "8", "--n-val", "4", "--positions", "last", "--no-filter",
        "--horizon", "3", "--top-k", "8", "--num-tokens", "12",
        # 3 prompts a step: rank 0 gets 2, rank 1 gets 1 (uneven shards); 8 prompts -> 3 steps,
        # the last with 2 prompts; micro-batches of 3 rows straddle prompts.
        "--num-prompts", "8", "--generations", "2", "--max-tokens", "6",
        "--train-batch-size", "3", "--micro-batch-size", "3", "--lr", "1e-2", "--lora-rank", "4",
        "--save-every", "1", "--seed", "3", "--quiet",
    ]  # fmt: skip


def _load(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A run directory after direction and mining (single process), and its inputs."""
    root = tmp_path_factory.mktemp("dist")
    model_dir = save_model_dir(tiny_model(seed=1), root / "model")
    (root / "harmful.json").write_text(json.dumps(HARMFUL))
    (root / "harmless.json").write_text(json.dumps(HARMLESS))
    (root / "greedy.toml").write_text("[distill]\ntemperature = 0.0\n")
    run = root / "run"
    assert main(_argv("direction", model_dir, run, root)) == 0
    assert main(_argv("mine", model_dir, run, root)) == 0
    return root, model_dir, run


@pytest.mark.skipif(not LAUNCH.exists(), reason=f"mlx.launch not found beside {sys.executable}")
def test_two_ranks_match_one_process(stages, tmp_path):
    root, model_dir, stage12 = stages
    single, multi, out = tmp_path / "single", tmp_path / "multi", tmp_path / "out"
    shutil.copytree(stage12, single)
    shutil.copytree(stage12, multi)
    out.mkdir()
    assert main(_argv("distill", model_dir, single, root)) == 0

    worker = Path(__file__).with_name("distributed_worker.py")
    launch = [str(LAUNCH), "--backend", "ring", "-n", "2", "--starting-port", "35417"]
    argv = _argv("distill", model_dir, multi, root)
    cmd = [*launch, sys.executable, str(worker), str(out), *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr

    rank0, rank1 = _load(out / "rank-0.safetensors"), _load(out / "rank-1.safetensors")
    assert rank0.keys() == rank1.keys() and rank0
    for k in rank0:  # the same updates on every rank: bit for bit
        np.testing.assert_array_equal(rank0[k], rank1[k], err_msg=k)

    # After one step the adapters agree to 1e-3 of the lr (Adam's first step: lr g / (|g| + eps)).
    ckpt = Path("adapters", "checkpoints", "step-000001", "adapters.safetensors")
    want, got = _load(single / ckpt), _load(multi / ckpt)
    assert want.keys() == got.keys() and want
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-4, err_msg=k)
    # Later steps: padding and micro-batch grouping differ between the runs, so gradients differ
    # by rounding, and Adam's m / sqrt(v) magnifies that where a gradient is near 0 — measured
    # 8e-4 of the adapters' norm after 3 steps at lr 1e-2 (single elements up to 5e-3).
    want = _load(single / "adapters" / "adapters.safetensors")
    got = _load(multi / "adapters" / "adapters.safetensors")  # written by rank 0
    assert want.keys() == got.keys() and want.keys() <= rank0.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], rank0[k], err_msg=k)
    diff = np.sqrt(sum(((got[k] - want[k]) ** 2).sum() for k in want))
    size = np.sqrt(sum((want[k] ** 2).sum() for k in want))
    assert diff / size < 5e-3
    moved = [k for k in want if k.endswith("lora_b") and np.abs(want[k]).max() > 0]
    assert moved  # training moved the adapters, so the comparison means something

    def metrics(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    a, b = metrics(single), metrics(multi)
    assert [m["step"] for m in b] == [1, 2, 3]  # logged once per step: by rank 0 only
    assert all(m["ranks"] == 2 for m in b) and all("ranks" not in m for m in a)
    assert b[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=1e-5)
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-2)
        assert y["rollout_tokens"] == x["rollout_tokens"]
    stage = json.loads((multi / "manifest.json").read_text())["stages"]["distill"]
    assert stage["status"] == "done" and stage["steps"] == 3
