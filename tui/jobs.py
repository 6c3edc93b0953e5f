"""Every call the TUI makes into the engine, run in a worker thread. Each job takes the app's
`State` and a progress callback and returns what its screen shows. Wiring a new stage is one
function here plus its entry in JOBS. Heavy modules are imported inside the jobs, never at
start-up."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safesteer_mlx.config import Config
from safesteer_mlx.progress import Callback, Reporter
from safesteer_mlx.run import RunDir


@dataclass
class State:
    """What the app holds: the config being edited, the run directory, and the model loaded for
    stages 1-2 and the chat (never one that distillation attached adapters to)."""

    config: Config
    run_dir: Path
    loaded: Any = None
    loaded_key: tuple | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_dir)


def _model(state: State, progress: Callback):
    from safesteer_mlx.modeling import load_configured

    key = tuple(dataclasses.asdict(state.config.model).values())
    if state.loaded is None or state.loaded_key != key:
        _drop_model(state)  # free the old one (and a finished distill's) before the next
        Reporter("model", progress).log(f"loading {state.config.model.name}")
        state.loaded, state.loaded_key = load_configured(state.config.model), key
    return state.loaded


def _drop_model(state: State) -> None:
    """Stages that load their own copy (distill attaches adapters, eval/export load what they
    need): free ours first so two copies never sit in memory. A finished distill's model is
    only reachable through reference cycles (the trainer's value_and_grad closure), which
    reference counting alone never frees."""
    import gc

    state.loaded, state.loaded_key = None, None
    gc.collect()


def _prepared(state: State, loaded) -> RunDir:
    from safesteer_mlx.session import prepare_run

    return prepare_run(state.config, state.run_dir, False, loaded)


def preview_data(state: State, progress: Callback) -> dict:
    from safesteer_mlx.data import load_prompts

    out = {}
    for side in ("harmful", "harmless"):
        prompts = load_prompts(getattr(state.config.data, side))
        out[side] = {"count": len(prompts), "examples": [p.instruction for p in prompts[:8]]}
    return out


def download(state: State, progress: Callback) -> dict:
    from safesteer_mlx.session import download_model

    path = download_model(state.config.model.name, state.config.model.revision, progress)
    return {"path": str(path)}


def direction(state: State, progress: Callback, force: bool = False) -> dict:
    from safesteer_mlx.direction import run_direction

    loaded = _model(state, progress)
    run = _prepared(state, loaded)
    return run_direction(state.config, run, loaded=loaded, progress=progress, force=force)


def override(state: State, progress: Callback, layer: int, coefficient: float) -> dict:
    from safesteer_mlx.session import override_direction

    return override_direction(state.run, layer, coefficient)


def chat(state: State, progress: Callback, prompt: str) -> dict:
    from safesteer_mlx.session import compare_chat

    loaded = _model(state, progress)
    return compare_chat(loaded, state.run, prompt, system=state.config.data.system_prompt)


def mining(state: State, progress: Callback, force: bool = False) -> dict:
    from safesteer_mlx.mining import run_mining

    loaded = _model(state, progress)
    run = _prepared(state, loaded)
    return run_mining(state.config, run, loaded=loaded, progress=progress, force=force)


def distill(state: State, progress: Callback, resume: bool = False, force: bool = False) -> dict:
    """Start, resume or restart distillation on a freshly loaded model (it attaches LoRA layers
    to the model it is given; reusing one would stack them). A pause (state.stop) checkpoints
    and returns {"paused": True, "step": N}."""
    from safesteer_mlx.distill import run_distill
    from safesteer_mlx.modeling import load_configured
    from safesteer_mlx.run import checkpoint_steps

    _drop_model(state)
    Reporter("distill", progress).log(f"loading {state.config.model.name}")
    loaded = load_configured(state.config.model)
    run = _prepared(state, loaded)
    try:
        return run_distill(
            state.config, run, loaded=loaded, progress=progress, force=force, resume=resume,
            should_stop=state.stop.is_set,
        )  # fmt: skip
    except KeyboardInterrupt:  # what run_distill raises after checkpointing on a stop request
        steps = checkpoint_steps(run)
        return {"paused": True, "step": steps[-1] if steps else 0}


def evaluate(state: State, progress: Callback, force: bool = False) -> dict:
    from safesteer_mlx.evaluate import run_eval

    _drop_model(state)
    return run_eval(state.config, state.run, loaded=None, progress=progress, force=force)


def export(
    state: State, progress: Callback, fmt: str, dtype: str, out: str | None, force: bool = False
) -> dict:
    from safesteer_mlx.export import run_export

    _drop_model(state)
    return run_export(
        state.run, fmt, out=Path(out) if out else None, dtype=dtype, force=force, progress=progress
    )


JOBS = {
    "data": preview_data,
    "download": download,
    "direction": direction,
    "override": override,
    "chat": chat,
    "mining": mining,
    "distill": distill,
    "evaluate": evaluate,
    "export": export,
}
