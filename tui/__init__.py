"""The Textual terminal UI (installed as ``safesteer_mlx.tui``): one screen per stage over the same
stage functions and run directory as the CLI. Nothing heavy is imported until a stage runs."""

from __future__ import annotations

import os
from pathlib import Path


def run_app(config, run_dir: Path) -> None:
    """Run the app in this terminal. A stage still running when the user quits (stages 1-2 have
    no stop point; distillation is paused first) is abandoned: its artifacts are written
    atomically, so the run directory stays resumable, and the process exits without waiting."""
    from safesteer_mlx.tui.app import SafeSteerApp

    app = SafeSteerApp(config, run_dir)
    app.run()
    if app.busy:  # the engine thread is still in a stage: do not wait for it
        os._exit(0)
