"""3. Direction: run stage 1 with live progress; the per-layer plot of candidate scores; the chosen
layer and coefficient, overridable; base vs steered teacher side by side on any prompt."""

from __future__ import annotations

from safesteer_mlx.tui.plot import layer_plot
from safesteer_mlx.tui.widgets import RunPane, StageProgress
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, Input, Label, Static

from safesteer_mlx.run import RunDir, read_json


def summary(meta: dict) -> str:
    p = meta.get("premise", {})
    lines = [
        f"[b]layer {meta['layer']}[/b], position {meta['position']}, coefficient "
        f"{meta['coefficient']:g}, norm {meta['norm']:.3g}"
        + ("  [yellow](overridden)[/yellow]" if meta.get("override") else ""),
        f"teacher refuses {p.get('teacher_harmless_refusal_rate', 0):.0%} of harmless val "
        f"prompts; base refuses {p.get('base_harmful_refusal_rate', 0):.0%} of harmful val",
    ]
    return "\n".join(lines)


def warnings(meta: dict) -> str:
    return "\n".join(f"[yellow]warning:[/yellow] {w}" for w in meta["premise"].get("warnings", []))


class DirectionPane(RunPane):
    JOBS = ("direction", "override", "chat")
    BINDINGS = [
        Binding("r", "run", "Run stage 1"),
        Binding("R", "run(True)", "Redo"),
        Binding("o", "override", "Override"),
        Binding("c", "chat", "Compare"),
    ]

    def compose(self) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Button("Run stage 1", id="run")
            yield Static(id="dir-status", classes="note")
        yield StageProgress()
        yield Static(id="dir-summary")
        yield Static(id="dir-plot")
        yield Static(id="dir-warnings")
        with Horizontal(classes="row"):
            yield Label("layer", classes="field-label")
            yield Input(id="layer", type="integer", classes="small")
            yield Label("coef", classes="field-label")
            yield Input(id="coef", type="number", classes="small")
            yield Button("Override", id="override")
        with Horizontal(classes="row"):
            yield Input(placeholder="a prompt for base vs steered teacher", id="chat-prompt")
            yield Button("Compare", id="chat")
        with Horizontal(id="chat-out"):
            yield Static("[b]base[/b]", id="chat-base")
            yield Static("[b]steered teacher[/b]", id="chat-teacher")

    def restore(self, run: RunDir, statuses: dict[str, str]) -> None:
        status = statuses.get("direction") or "not run"
        self.query_one("#dir-status", Static).update(f"stage 1: {status}")
        meta = read_json(run.direction_json)
        if meta is None:
            self.query_one("#dir-summary", Static).update("no direction yet: press r")
            self.query_one("#dir-plot", Static).update("")
            self.query_one("#dir-warnings", Static).update("")
            return
        self.query_one("#dir-summary", Static).update(summary(meta))
        self._meta = meta
        self._draw_plot()
        self.query_one("#dir-warnings", Static).update(warnings(meta))
        for key, value in (("layer", meta["layer"]), ("coef", f"{meta['coefficient']:g}")):
            field = self.query_one(f"#{key}", Input)
            if not field.has_focus:
                field.value = str(value)

    def _draw_plot(self) -> None:
        meta = getattr(self, "_meta", None)
        if meta is not None:
            width = max(40, self.size.width - 4) if self.size.width else 72
            self.query_one("#dir-plot", Static).update(layer_plot(meta, width=width))

    def on_resize(self) -> None:
        self._draw_plot()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        {"run": self.action_run, "override": self.action_override, "chat": self.action_chat}[
            event.button.id
        ]()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        (self.action_chat if event.input.id == "chat-prompt" else self.action_override)()

    def action_run(self, force: bool = False) -> None:
        self.app.start_job("direction", force=force)

    def action_override(self) -> None:
        try:
            layer = int(self.query_one("#layer", Input).value)
            coef = float(self.query_one("#coef", Input).value)
        except ValueError:
            self.app.notify("layer must be an integer and coef a number", severity="error")
            return
        self.app.start_job("override", layer, coef)

    def action_chat(self) -> None:
        prompt = self.query_one("#chat-prompt", Input).value.strip()
        if not prompt:
            self.app.notify("type a prompt first", severity="warning")
            return
        self.app.start_job("chat", prompt)

    def job_done(self, job: str, result, error: str | None) -> None:
        super().job_done(job, result, error)
        if job == "chat" and not error:
            self.query_one("#chat-base", Static).update(f"[b]base[/b]\n{result['base']}")
            self.query_one("#chat-teacher", Static).update(
                f"[b]steered teacher[/b] (layer {result['layer']}, coef "
                f"{result['coefficient']:g})\n{result['teacher']}"
            )
