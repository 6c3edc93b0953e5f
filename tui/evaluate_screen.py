"""6. Evaluate: run the evaluation stage; the before/after table from eval.json's summary."""

from __future__ import annotations

from safesteer_mlx.tui.widgets import RunPane, StageProgress
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, DataTable, Static

from safesteer_mlx.eval_tables import summary_cells
from safesteer_mlx.run import RunDir, read_json


def stage_line(label: str, status: str | None) -> str:
    return f"{label}: {status or 'not run'}"


class EvaluatePane(RunPane):
    JOBS = ("evaluate",)
    BINDINGS = [Binding("r", "run", "Evaluate"), Binding("R", "run(True)", "Redo")]

    def compose(self) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Button("Evaluate", id="run")
            yield Static(id="eval-status", classes="note")
        yield StageProgress()
        table = DataTable(id="eval-table", zebra_stripes=True, cursor_type="row")
        table.add_columns("metric", "judge", "before", "after", "change")
        yield table

    def restore(self, run: RunDir, statuses: dict[str, str]) -> None:
        line = stage_line("evaluation", statuses.get("eval"))
        self.query_one("#eval-status", Static).update(line)
        table = self.query_one(DataTable)
        table.clear()
        data = read_json(run.eval_json) or {}
        for row in data.get("summary", []):
            table.add_row(*summary_cells(row))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_run()

    def action_run(self, force: bool = False) -> None:
        self.app.start_job("evaluate", force=force)
