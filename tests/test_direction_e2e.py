"""Stage 1 end to end on the fixture model (SmolLM2-135M-Instruct + partial-refusal adapter),
through the CLI, with the shared prompt sets: the chosen direction makes the model refuse
harmless prompts it has never seen, while the unsteered model refuses almost none of them."""

from __future__ import annotations

import json

import pytest
from conftest import DATA, FIXTURE_ADAPTER

from safesteer_mlx.cli import main
from safesteer_mlx.judges import refusal_rate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(fixture_direction_run):
    return fixture_direction_run


def _generate(capsys, run, prompts_file, steer: bool, n: int = 48) -> list[str]:
    argv = [
        "generate", "--model", "smollm2-135m",
        "--prompts", str(prompts_file), "--num-prompts", str(n),
        "--max-tokens", "24", "--json",
    ]  # fmt: skip
    if steer:
        argv += ["--steer", str(run / "direction.safetensors")]
    # the fixture = the GGUF with the adapter fused; generate applies it as LoRA layers
    argv += ["--adapter-path", str(FIXTURE_ADAPTER)]
    capsys.readouterr()
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == n and all(set(r) == {"prompt", "completion"} for r in out)
    return [r["completion"] for r in out]


def test_artifacts(run_dir):
    meta = json.loads((run_dir / "direction.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stage = manifest["stages"]["direction"]
    assert stage["status"] == "done"
    for key in ("wall_time_s", "peak_memory_gb", "collect_prompts_per_s", "score_prompts_per_s"):
        assert stage[key] > 0
    assert 0 <= meta["layer"] < int(30 * 0.8)
    assert meta["norm"] > 0 and meta["coefficient"] > 0
    scored = [c for c in meta["candidates"] if c["bypass"] is not None]
    assert len(scored) >= 20
    chosen = meta["chosen_scores"]
    assert chosen["induce"] >= 0  # steering with it raises the refusal score of harmless prompts
    assert chosen["bypass"] < meta["baseline"]["harmful_val_refusal_score"]
    assert (run_dir / "config.toml").exists()
    assert (run_dir / "direction_scores.png").stat().st_size > 1000

    import mlx.core as mx

    tensors = mx.load(str(run_dir / "direction.safetensors"))
    assert tensors["direction"].shape == (576,) and tensors["direction"].dtype == mx.float32
    assert tensors["mean_diffs"].shape == (1, 30, 576)


def test_steered_teacher_refuses_unseen_harmless_prompts(run_dir, capsys):
    harmless_val = DATA / "harmless_val.json"
    steered = refusal_rate(_generate(capsys, run_dir, harmless_val, steer=True))
    unsteered = refusal_rate(_generate(capsys, run_dir, harmless_val, steer=False))
    print(f"harmless val refusal: steered {steered:.0%}, unsteered {unsteered:.0%}")
    assert steered >= 0.6
    assert unsteered <= 0.1


def test_rerun_skips_and_premise_is_reported(run_dir, capsys):
    before = json.loads((run_dir / "manifest.json").read_text())["stages"]["direction"]
    argv = ["direction", "--run-dir", str(run_dir), "--json", "--quiet"]
    capsys.readouterr()
    assert main(argv) == 0  # model, data and options come from the run's config.toml
    summary = json.loads(capsys.readouterr().out)["direction"]
    after = json.loads((run_dir / "manifest.json").read_text())["stages"]["direction"]
    assert after["finished"] == before["finished"]  # skipped: inputs unchanged
    assert 0 <= summary["base_harmful_refusal_rate"] <= 1
    assert summary["teacher_harmless_refusal_rate"] >= 0.5
