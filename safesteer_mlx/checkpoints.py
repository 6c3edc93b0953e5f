"""Distillation checkpoints: adapters, optimizer state and step, written atomically, so a
crashed or interrupted run resumes exactly where its last checkpoint left it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.run import atomic_path, atomic_write_json, atomic_write_text, checkpoint_steps


class Checkpoints:
    """`adapters/checkpoints/step-N/` = adapters.safetensors, adapter_config.json,
    optimizer.safetensors, state.json; `adapters/` itself holds the final adapters.
    `writes=False` (ranks other than 0 of a distributed run) reads checkpoints but writes
    nothing."""

    def __init__(self, run, writes: bool = True):
        self.run = run
        self.writes = writes
        self.root = run.adapters / "checkpoints"

    def _dir(self, step: int) -> Path:
        return self.root / f"step-{step:06d}"

    def steps(self) -> list[int]:
        return checkpoint_steps(self.run)

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def clear(self) -> None:
        if not self.writes:
            return
        shutil.rmtree(self.root, ignore_errors=True)
        for name in ("adapters.safetensors", "adapter_config.json"):
            (self.run.adapters / name).unlink(missing_ok=True)
        self.run.metrics.unlink(missing_ok=True)

    def save(self, trainer, step: int, inputs: str) -> Path:
        from safesteer_mlx.adapters import save_adapters

        path = self._dir(step)
        if not self.writes:
            return path
        (path / "state.json").unlink(missing_ok=True)
        save_adapters(path, trainer.model, trainer.adapter_config)
        state = dict(tree_flatten(trainer.optimizer.state))
        with atomic_path(path / "optimizer.safetensors") as tmp:
            mx.save_safetensors(str(tmp), state)
        atomic_write_json(
            path / "state.json",
            {"step": step, "total_steps": trainer.total_steps, "input_hash": inputs,
             "lr": trainer.lr},
        )  # fmt: skip
        return path

    def restore(self, trainer, inputs: str) -> int:
        """Load the latest checkpoint into the trainer; returns its step (0 if none)."""
        step = self.latest()
        if step is None:
            return 0
        path = self._dir(step)
        state = json.loads((path / "state.json").read_text())
        if state.get("input_hash") != inputs:
            raise SafeSteerError(
                f"the checkpoint in {path} was made with other inputs (config, model, data or "
                "safety tokens changed); rerun with --force to start over"
            )
        trainer.model.load_weights(str(path / "adapters.safetensors"), strict=False)
        opt = mx.load(str(path / "optimizer.safetensors"))
        trainer.optimizer.state = tree_unflatten(list(opt.items()))
        mx.eval(trainer.model.trainable_parameters(), trainer.optimizer.state)
        if self.writes:
            self._truncate_metrics(step)
        return step

    def _truncate_metrics(self, step: int) -> None:
        path = self.run.metrics
        if not path.exists():
            return
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def append_metrics(self, metrics: dict) -> None:
        if not self.writes:
            return
        self.run.ensure()
        with open(self.run.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")

    def finalize(self, trainer) -> None:
        """The final adapters in adapters/ (what mlx_lm.load(adapter_path=...) reads)."""
        from safesteer_mlx.adapters import save_adapters

        if self.writes:
            save_adapters(self.run.adapters, trainer.model, trainer.adapter_config)
