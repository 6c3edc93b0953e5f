"""Pieces every screen uses: the pane base class and the progress line."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Label, ProgressBar

from safesteer_mlx.progress import Event
from safesteer_mlx.run import RunDir


class RunPane(VerticalScroll, can_focus=True):
    """One screen's content. `JOBS` names the jobs whose events and results it shows."""

    JOBS: tuple[str, ...] = ()

    @property
    def state(self):
        return self.app.state

    def restore(self, run: RunDir, statuses: dict[str, str]) -> None:
        """Show what the run directory holds (called at start and after every job)."""

    def show_event(self, job: str, event: Event) -> None:
        for bar in self.query(StageProgress):
            bar.show(event)

    def job_done(self, job: str, result, error: str | None) -> None:
        for bar in self.query(StageProgress):
            bar.finish(error)


class StageProgress(Vertical):
    """A progress bar with its task name, and the stage's latest message below."""

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield Label("idle", classes="task")
            yield ProgressBar(total=None, show_eta=True)
        yield Label("", classes="message")

    def on_mount(self) -> None:
        self.display = False  # an idle indeterminate bar would animate for nothing

    def show(self, e: Event) -> None:
        self.display = True
        if e.kind == "progress":
            self.query_one(".task", Label).update(e.task or e.stage)
            bar = self.query_one(ProgressBar)
            bar.update(total=e.total or None, progress=e.done)
            if "loss" in e.data:
                self.query_one(".message", Label).update(f"loss {e.data['loss']:.4g}")
        elif e.message:
            prefix = "warning: " if e.kind == "warning" else ""
            self.query_one(".message", Label).update(f"{prefix}{e.message}")

    def finish(self, error: str | None) -> None:
        self.display = True
        bar = self.query_one(ProgressBar)
        if bar.total is None:
            bar.update(total=1, progress=0 if error else 1)
        self.query_one(".task", Label).update("failed" if error else "done")
        message = self.query_one(".message", Label)
        if error:
            message.update(error)
        elif str(message.render()).startswith("loading "):
            message.update("")  # stale once the job is done
