"""7. Export: format, dtype and output path; progress; what export/ holds."""

from __future__ import annotations

from safesteer_mlx.tui.evaluate_screen import stage_line
from safesteer_mlx.tui.widgets import RunPane, StageProgress
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, Input, Label, Select, Static

from safesteer_mlx.run import RunDir

FORMATS = ("hf", "mlx", "gguf", "control-vector")
DTYPES = ("float16", "bfloat16", "float32")


def listing(root, limit: int = 12) -> str:
    if not root.is_dir():
        return "nothing exported yet"
    lines = []
    for p in sorted(root.rglob("*"))[:limit]:
        if p.is_file():
            lines.append(f"  {p.relative_to(root)}  {p.stat().st_size / 1e6:.1f} MB")
    return f"{root}:\n" + ("\n".join(lines) or "  (empty)")


class ExportPane(RunPane):
    JOBS = ("export",)
    BINDINGS = [Binding("e", "export", "Export"), Binding("E", "export(True)", "Overwrite")]

    def compose(self) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Select([(f, f) for f in FORMATS], value="hf", allow_blank=False, id="fmt")
            yield Select([(d, d) for d in DTYPES], value="float16", allow_blank=False, id="dtype")
            yield Button("Export", id="do-export")
        with Horizontal(classes="row"):
            yield Label("out", classes="field-label")
            yield Input(placeholder="default: under RUN/export/", id="out")
        yield Static(id="export-status", classes="note")
        yield StageProgress()
        yield Static(id="export-result")
        yield Static(id="export-list")

    def restore(self, run: RunDir, statuses: dict[str, str]) -> None:
        line = stage_line("export", statuses.get("export"))
        self.query_one("#export-status", Static).update(line)
        self.query_one("#export-list", Static).update(listing(run.export_dir))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_export()

    def action_export(self, force: bool = False) -> None:
        fmt = self.query_one("#fmt", Select).value
        dtype = self.query_one("#dtype", Select).value
        out = self.query_one("#out", Input).value.strip() or None
        self.app.start_job("export", fmt, dtype, out, force=force)

    def job_done(self, job: str, result, error: str | None) -> None:
        super().job_done(job, result, error)
        if result:
            self.query_one("#export-result", Static).update(
                f"wrote {result['format']} ({result['dtype']}) to {result['path']}: "
                f"{result['bytes'] / 1e6:.1f} MB in {result['seconds']:.1f}s"
            )
