"""5. Distill: start / pause / resume; step, loss and KL_S curves live, tokens/s, peak memory,
ETA; the checkpoints on disk."""

from __future__ import annotations

from safesteer_mlx.tui.widgets import RunPane, StageProgress
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, Label, Sparkline, Static

from safesteer_mlx.progress import Event
from safesteer_mlx.run import RunDir, checkpoint_steps, read_metrics


def stats_line(m: dict, total: int | None, eta: float | None) -> str:
    of = f"/{total}" if total else ""
    tps = m.get("train_tokens_per_s") or 0
    roll = m.get("rollout_tokens_per_s") or 0
    eta_text = f"  ETA {eta:.0f}s" if eta is not None else ""
    return (
        f"step {m.get('step', 0)}{of}  loss {m.get('loss', 0):.4g}  KL_S {m.get('kl_S', 0):.4g}  "
        f"lr {m.get('lr', 0):.2g}\ntrain {tps:.0f} tok/s  rollout {roll:.0f} tok/s  "
        f"peak {m.get('peak_mem_gb', 0):.2f} GB{eta_text}"
    )


class DistillPane(RunPane):
    JOBS = ("distill",)
    BINDINGS = [
        Binding("s", "start", "Start"),
        Binding("p", "pause", "Pause"),
        Binding("u", "resume", "Resume"),
        Binding("R", "restart", "Restart"),
    ]

    def compose(self) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Button("Start", id="start")
            yield Button("Pause", id="pause")
            yield Button("Resume", id="resume")
            yield Static(id="dist-status", classes="note")
        yield StageProgress()
        yield Static(id="dist-stats")
        for name in ("loss", "kl_S"):
            with Horizontal(classes="curve"):
                yield Label(f"{name:<5}", classes="curve-label")
                yield Sparkline([], id=f"curve-{name}")
        yield Static(id="dist-ckpts")

    def restore(self, run: RunDir, statuses: dict[str, str]) -> None:
        entry = run.manifest()["stages"].get("distill", {}) if "manifest" not in statuses else {}
        status = entry.get("status") or "not run"
        self.query_one("#dist-status", Static).update(f"stage 3: {status}")
        self._show_metrics(read_metrics(run), entry.get("steps"), None)
        self._show_checkpoints(run)

    def _show_checkpoints(self, run: RunDir) -> None:
        steps = checkpoint_steps(run)
        final = (run.adapters / "adapters.safetensors").exists()
        shown = ", ".join(str(s) for s in steps[-8:]) or "none"
        self.query_one("#dist-ckpts", Static).update(
            f"checkpoints (step): {shown}" + (f"\nadapters: {run.adapters}" if final else "")
        )

    def _show_metrics(self, rows: list[dict], total, eta) -> None:
        self._rows = rows
        self.query_one("#dist-stats", Static).update(
            stats_line(rows[-1], total, eta) if rows else "no training steps yet: press s"
        )
        for name in ("loss", "kl_S"):
            self.query_one(f"#curve-{name}", Sparkline).data = [r[name] for r in rows]

    def show_event(self, job: str, event: Event) -> None:
        super().show_event(job, event)
        if event.kind == "progress" and "loss" in event.data:
            rows = [r for r in getattr(self, "_rows", []) if r["step"] < event.data["step"]]
            self._show_metrics([*rows, event.data], event.total, event.eta)
            self.query_one("#dist-status", Static).update("stage 3: running")
            self._show_checkpoints(self.state.run)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        getattr(self, f"action_{event.button.id}")()

    def action_start(self) -> None:
        self.app.start_job("distill")

    def action_resume(self) -> None:
        self.app.start_job("distill", resume=True)

    def action_restart(self) -> None:
        self.app.start_job("distill", force=True)

    def action_pause(self) -> None:
        if self.app.busy == "distill":
            self.state.stop.set()
            self.app.notify("pausing after this step (a checkpoint is saved)")

    def job_done(self, job: str, result, error: str | None) -> None:
        super().job_done(job, result, error)
        if result and result.get("paused"):
            self.query_one("StageProgress .task", Label).update("paused")
            self.query_one("#dist-status", Static).update(
                f"stage 3: paused at step {result['step']} (u resumes)"
            )
