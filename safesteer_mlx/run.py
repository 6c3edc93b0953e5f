"""The run directory: fixed artifact paths, the manifest, atomic writes, and stage skipping.

Every artifact is written to a temporary file in the same directory and renamed into place, so a
crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safesteer_mlx.errors import SafeSteerError

STAGES = ("direction", "mining", "distill", "eval", "export")


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# mkstemp creates 0600 files; artifacts get the mode a plain open() would give them.
_FILE_MODE = _umask_mode()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path (same directory, same suffix) for writers that take a file name, e.g.
    `mx.save_safetensors`; renamed onto `path` when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def input_hash(*parts: Any) -> str:
    """A stable hash of a stage's inputs (config section, model identity, data, upstream files)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunDir:
    """One run: `runs/NAME/` with the files DESIGN.md lists."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # Artifact paths
    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def direction_tensors(self) -> Path:
        return self.path / "direction.safetensors"

    @property
    def direction_json(self) -> Path:
        return self.path / "direction.json"

    @property
    def direction_plot(self) -> Path:
        return self.path / "direction_scores.png"

    @property
    def safety_tokens(self) -> Path:
        return self.path / "safety_tokens.json"

    @property
    def adapters(self) -> Path:
        return self.path / "adapters"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def eval_json(self) -> Path:
        return self.path / "eval.json"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    def ensure(self) -> RunDir:
        if self.path.exists() and not self.path.is_dir():
            raise SafeSteerError(f"run directory {self.path} is a file (give a directory path)")
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # Manifest
    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"stages": {}}
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            problem = str(e)
        else:
            if isinstance(data, dict) and isinstance(data.get("stages"), dict):
                return data
            problem = "no 'stages' object"
        raise SafeSteerError(
            f"{self.manifest_path} is corrupt ({problem}); delete it to rerun every stage"
        )

    def stage(self, name: str) -> dict:
        return self.manifest()["stages"].get(name, {})

    def update_stage(self, name: str, **fields: Any) -> None:
        manifest = self.manifest()
        manifest["stages"].setdefault(name, {}).update(fields)
        atomic_write_json(self.manifest_path, manifest)

    def is_current(self, name: str, inputs: str, artifacts: list[Path]) -> bool:
        """True when the stage finished with the same inputs and its artifacts are still there."""
        entry = self.stage(name)
        return (
            entry.get("status") == "done"
            and entry.get("input_hash") == inputs
            and all(p.exists() for p in artifacts)
        )

    @contextlib.contextmanager
    def stage_run(self, name: str, inputs: str) -> Iterator[dict]:
        """Record a stage's start, and on success its wall time, peak memory and the `stats` the
        block fills in; on failure, status `failed` with the error."""
        import mlx.core as mx

        self.ensure()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        self.update_stage(name, status="running", input_hash=inputs, started=_now())
        stats: dict = {}
        try:
            yield stats
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            self.update_stage(name, status=status, error=str(e)[:500], finished=_now())
            raise
        self.update_stage(
            name,
            status="done",
            finished=_now(),
            wall_time_s=round(time.perf_counter() - t0, 3),
            peak_memory_gb=round(mx.get_peak_memory() / 1e9, 4),
            error=None,
            **stats,
        )


# ---- reading artifacts (no MLX: the TUI restores its screens with these) --------------------


def read_json(path: Path) -> Any:
    """An artifact's JSON, or None when it is absent or unreadable (e.g. being rewritten)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_metrics(run: RunDir) -> list[dict]:
    """metrics.jsonl's rows (one per distillation step), skipping a torn last line."""
    rows = []
    if run.metrics.exists():
        for line in run.metrics.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def checkpoint_steps(run: RunDir) -> list[int]:
    """Complete distillation checkpoints (their state.json, written last, exists)."""
    root = run.adapters / "checkpoints"
    return sorted(int(d.parent.name.split("-")[1]) for d in root.glob("step-*/state.json"))
