"""2. Data: the harmful and harmless prompt sources (builtin:, a file, hf:ORG/NAME), with counts
and the first prompts of each, and how stage 1 splits them."""

from __future__ import annotations

from safesteer_mlx.tui.widgets import RunPane, StageProgress
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, Input, Label, Static

from safesteer_mlx.run import RunDir


class DataPane(RunPane):
    JOBS = ("data",)
    BINDINGS = [Binding("p", "preview", "Preview")]

    def compose(self) -> ComposeResult:
        for side in ("harmful", "harmless"):
            with Horizontal(classes="row"):
                yield Label(f"{side:<9}", classes="field-label")
                yield Input(id=f"src-{side}", placeholder="builtin:NAME, a file, hf:ORG/NAME")
        with Horizontal(classes="row"):
            yield Button("Preview", id="preview")
            yield Static(id="split", classes="note")
        yield StageProgress()
        yield Static(id="data-preview")

    def restore(self, run: RunDir, statuses: dict[str, str]) -> None:
        cfg = self.state.config
        for side in ("harmful", "harmless"):
            field = self.query_one(f"#src-{side}", Input)
            if not field.has_focus:
                field.value = getattr(cfg.data, side)
        d = cfg.direction
        self.query_one("#split", Static).update(
            f"stage 1 takes {d.n_train} train + {d.n_val} val prompts of each; distillation "
            f"{cfg.distill.num_prompts} harmful"
        )

    def _apply(self) -> None:
        for side in ("harmful", "harmless"):
            value = self.query_one(f"#src-{side}", Input).value.strip()
            if value:
                setattr(self.state.config.data, side, value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_preview()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_preview()

    def action_preview(self) -> None:
        if self.app.busy:
            self.app.notify(f"{self.app.busy} is running; preview when it ends", severity="warning")
            return
        self._apply()
        self.app.start_job("data")

    def job_done(self, job: str, result, error: str | None) -> None:
        super().job_done(job, result, error)
        if error:
            self.query_one("#data-preview", Static).update(f"[red]{error}[/red]")
            return
        lines = []
        for side in ("harmful", "harmless"):
            r = result[side]
            lines.append(f"[b]{side}[/b]: {r['count']} prompts")
            lines += [f"  · {p[:74]}" for p in r["examples"][:4]]
        self.query_one("#data-preview", Static).update("\n".join(lines))
