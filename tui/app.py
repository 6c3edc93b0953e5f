"""The app: a status line (run directory, each stage's status from manifest.json), one tab per
stage, the footer of key bindings. Jobs run one at a time on one engine thread, awaited by a
Textual worker; their progress events come back as messages."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safesteer_mlx.tui.data_screen import DataPane
from safesteer_mlx.tui.direction_screen import DirectionPane
from safesteer_mlx.tui.distill_screen import DistillPane
from safesteer_mlx.tui.evaluate_screen import EvaluatePane
from safesteer_mlx.tui.export_screen import ExportPane
from safesteer_mlx.tui.jobs import JOBS, State
from safesteer_mlx.tui.model_screen import ModelPane
from safesteer_mlx.tui.tokens_screen import TokensPane
from safesteer_mlx.tui.widgets import RunPane
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Footer, Static, TabbedContent, TabPane

from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.progress import Event
from safesteer_mlx.session import stage_statuses

SCREENS = [
    ("model", "1 Model", ModelPane),
    ("data", "2 Data", DataPane),
    ("direction", "3 Direction", DirectionPane),
    ("tokens", "4 Tokens", TokensPane),
    ("distill", "5 Distill", DistillPane),
    ("evaluate", "6 Eval", EvaluatePane),
    ("export", "7 Export", ExportPane),
]
STAGE_NAMES = ("direction", "mining", "distill", "eval", "export")
MARKS = {"done": "✓", "running": "…", "failed": "✗", "interrupted": "‖", "": "·"}


class StageEvent(Message):
    def __init__(self, job: str, event: Event):
        super().__init__()
        self.job, self.event = job, event


class JobDone(Message):
    def __init__(self, job: str, result, error: str | None):
        super().__init__()
        self.job, self.result, self.error = job, result, error


class SafeSteerApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "safesteer-mlx"
    BINDINGS = [
        *(
            Binding(str(i + 1), f"show('{sid}')", "Screens" if i == 0 else label, show=i == 0,
                    key_display="1-7")  # fmt: skip
            for i, (sid, label, _) in enumerate(SCREENS)
        ),
        Binding("escape", "leave_input", "Leave field", show=False),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, config, run_dir: str | Path):
        super().__init__()
        self.state = State(config, Path(run_dir))
        self.busy: str | None = None
        self._quit_when_idle = False
        # Every job runs on this one thread: MLX streams are thread-local (mlx >= 0.31.2 on
        # Metal), so the model, mlx_lm's generation stream and every job must share a thread.
        self._engine = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safesteer-engine")

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        with TabbedContent(initial="model"):
            for sid, label, pane in SCREENS:
                with TabPane(label, id=sid):
                    yield pane(id=f"{sid}-pane")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_run()

    # -- the run directory -> every screen -----------------------------------------------------

    def refresh_run(self) -> None:
        run = self.state.run
        statuses = stage_statuses(run)
        marks = "  ".join(f"{s} {MARKS.get(statuses.get(s, ''), '?')}" for s in STAGE_NAMES)
        busy = f"  [b]running {self.busy}[/b]" if self.busy else ""
        self.query_one("#status", Static).update(f"{marks}{busy}  │ {run.path}")
        for pane in self.query(RunPane):
            pane.restore(run, statuses)

    # -- jobs --------------------------------------------------------------------------------

    def start_job(self, job: str, *args, **kwargs) -> bool:
        if self.busy:
            self.notify(f"{self.busy} is running; wait for it (or pause distillation)",
                        severity="warning")  # fmt: skip
            return False
        self.busy = job
        self.state.stop.clear()  # here, not in the worker: a pause pressed at once must stick
        self.refresh_run()
        self._work(job, args, kwargs)
        return True

    @work(group="jobs", exit_on_error=False)
    async def _work(self, job: str, args: tuple, kwargs: dict) -> None:
        """Await the job on the engine thread (no thread of asyncio's own is held, so quitting
        never waits for a stage)."""

        def progress(event: Event) -> None:  # called on the engine thread; post is thread-safe
            self.post_message(StageEvent(job, event))

        try:
            run = self._engine.submit(JOBS[job], self.state, progress, *args, **kwargs)
            result, error = await asyncio.wrap_future(run), None
        except SafeSteerError as e:
            result, error = None, str(e)
        except Exception as e:  # shown, not raised: the app must outlive a failed stage
            result, error = None, f"{type(e).__name__}: {e}"
        self.post_message(JobDone(job, result, error))

    def on_unmount(self) -> None:
        self._engine.shutdown(wait=False)

    def _panes_for(self, job: str):
        return [p for p in self.query(RunPane) if job in p.JOBS]

    def on_stage_event(self, message: StageEvent) -> None:
        for pane in self._panes_for(message.job):
            pane.show_event(message.job, message.event)

    def on_job_done(self, message: JobDone) -> None:
        self.busy = None
        if message.error:
            self.notify(message.error, title=f"{message.job} failed", severity="error",
                        timeout=12)  # fmt: skip
        self.refresh_run()
        for pane in self._panes_for(message.job):
            pane.job_done(message.job, message.result, message.error)
        if self._quit_when_idle:
            self.exit()

    # -- actions -----------------------------------------------------------------------------

    def action_show(self, screen_id: str) -> None:
        self.query_one(TabbedContent).active = screen_id
        self.query_one(f"#{screen_id}-pane", RunPane).focus()

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.query_one(f"#{event.pane.id}-pane", RunPane).focus()

    def action_leave_input(self) -> None:
        pane = self.query_one(TabbedContent).active
        self.query_one(f"#{pane}-pane", RunPane).focus()

    async def action_quit(self) -> None:
        if self.busy == "distill" and not self._quit_when_idle:
            self.state.stop.set()
            self._quit_when_idle = True
            self.notify("pausing distillation: saving a checkpoint, then quitting "
                        "(q again quits now, resuming from the last saved checkpoint)")  # fmt: skip
        elif self.busy and not self._quit_when_idle:
            self._quit_when_idle = True
            self.notify(f"{self.busy} is running: press q again to quit now (rerun the stage "
                        "later), or wait and the app quits when it ends")  # fmt: skip
        else:
            self.exit()
