"""1. Model: a preset, a local directory, a hub id or a .gguf file; what it is, whether it is here,
the estimated peak memory of alignment; download from the hub with progress."""

from __future__ import annotations

from safesteer_mlx.tui.widgets import RunPane, StageProgress
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, Input, Select, Static

from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.run import RunDir


def _gb(x) -> str:
    return f"{x:.2f} GB" if x is not None else "?"


def describe(info: dict, memory: dict) -> str:
    """The facts, one per line (kept short for 80 columns)."""
    where = info.get("path") or info.get("repo") or info.get("source") or ""
    here = "yes" if info.get("available") else f"no  ({info.get('hint', '')})"
    shape = "/".join(str(info.get(k) or "?") for k in ("num_layers", "hidden_size", "vocab_size"))
    params = f"{info['params_b']:g}B params, " if info.get("params_b") else ""
    lines = [
        f"[b]{info.get('display_name') or info['source_name']}[/b]  ({info['kind']})",
        f"where       {where}",
        f"family      {info.get('family', '?')}   layers/hidden/vocab {shape}",
        f"weights     {params}{_gb(info.get('weights_bytes', 0) / 1e9)}, "
        f"quantization {info.get('quantization', '?')}",
        f"local       {here}",
    ]
    if memory.get("peak_gb") is not None:
        lines.append(
            f"peak memory ~{_gb(memory['peak_gb'])} for alignment = weights "
            f"{_gb(memory['weights_gb'])} + adapters {_gb(memory['adapters_gb'])} + "
            f"max(training {_gb(memory['train_gb'])}, rollouts {_gb(memory['rollouts_gb'])})"
        )
    else:
        lines.append(f"peak memory ? ({memory.get('note', '')})")
    return "\n".join(lines)


class ModelPane(RunPane):
    JOBS = ("download",)
    BINDINGS = [
        Binding("d", "download", "Download"),
    ]

    def compose(self) -> ComposeResult:
        from safesteer_mlx.models import presets

        options = [(f"{p.name}  {p.params:g}B  {p.quantization}", p.name) for p in presets()]
        yield Select(options, prompt="preset", id="preset", allow_blank=True)
        with Horizontal(classes="row"):
            yield Input(placeholder="or a local dir, .gguf file or ORG/NAME", id="model-name")
            yield Button("Use", id="use")
            yield Button("Download", id="download")
        yield Static(id="model-info")
        yield StageProgress()

    def restore(self, run: RunDir, statuses: dict[str, str]) -> None:
        self.show_model(self.state.config.model.name)

    def show_model(self, name: str) -> None:
        from safesteer_mlx.session import estimate_peak_memory, model_info

        info_widget = self.query_one("#model-info", Static)
        if self.app.busy and name != self.state.config.model.name:
            self.app.notify(f"{self.app.busy} is running; change the model when it ends",
                            severity="warning")  # fmt: skip
            return
        try:
            info = model_info(name)
        except SafeSteerError as e:
            info_widget.update(f"[red]{e}[/red]")
            return
        self.state.config.model.name = name
        memory = estimate_peak_memory(
            info, self.state.config.distill, self.state.config.model.dtype
        )
        info_widget.update(describe(info, memory))
        field = self.query_one("#model-name", Input)
        if field.value != name:
            field.value = name
        preset = self.query_one("#preset", Select)
        if info["kind"] == "preset" and preset.value != info["name"]:
            preset.value = info["name"]

    def on_select_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            self.show_model(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.show_model(event.value.strip())

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "use":
            self.action_use()
        elif event.button.id == "download":
            self.action_download()

    def action_use(self) -> None:
        self.show_model(self.query_one("#model-name", Input).value.strip())

    def action_download(self) -> None:
        self.app.start_job("download")

    def job_done(self, job: str, result, error: str | None) -> None:
        super().job_done(job, result, error)
        if not error:
            self.show_model(self.state.config.model.name)
