"""4. Safety tokens: the mined set S (token, votes, mean Δ) with include/exclude toggles saved to
safety_tokens.json (distillation leaves excluded ids out of S)."""

from __future__ import annotations

from safesteer_mlx.tui.widgets import RunPane, StageProgress
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, DataTable, Static

from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.run import RunDir, read_json


class TokensPane(RunPane):
    JOBS = ("mining",)
    BINDINGS = [
        Binding("r", "run", "Mine"),
        Binding("R", "run(True)", "Redo"),
        Binding("space", "toggle", "Include/exclude"),
    ]

    def compose(self) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Button("Mine tokens", id="run")
            yield Static(id="tok-status", classes="note")
        yield StageProgress()
        table = DataTable(id="token-table", cursor_type="row", zebra_stripes=True)
        table.add_columns("use", "id", "token", "votes", "mean Δ", "p teacher", "p base")
        yield table

    def restore(self, run: RunDir, statuses: dict[str, str]) -> None:
        data = read_json(run.safety_tokens)
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        status = statuses.get("mining") or "not run"
        if data is None:
            self.query_one("#tok-status", Static).update(f"stage 2: {status}; press r to mine")
            return
        excluded = set(data.get("excluded", []))
        for t in data["tokens"]:
            table.add_row(
                "✗" if t["id"] in excluded else "✓", t["id"], repr(t["token"]), t["votes"],
                f"{t['mean_delta']:.3f}", f"{t.get('teacher_prob', 0):.3g}",
                f"{t.get('base_prob', 0):.3g}", key=str(t["id"]),
            )  # fmt: skip
        used = len(data["tokens"]) - len(excluded)
        self.query_one("#tok-status", Static).update(
            f"stage 2: {status}; |S| = {used} of {len(data['tokens'])} used "
            "(space toggles; distillation reruns with the new S)"
        )
        if data["tokens"]:
            table.move_cursor(row=min(row, len(data["tokens"]) - 1))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_run()

    def action_run(self, force: bool = False) -> None:
        self.app.start_job("mining", force=force)

    def action_toggle(self) -> None:
        from safesteer_mlx.session import set_excluded

        if self.app.busy in ("mining", "distill"):
            self.app.notify(f"{self.app.busy} is running; toggle when it ends", severity="warning")
            return
        table = self.query_one(DataTable)
        run = self.state.run
        data = read_json(run.safety_tokens)
        if data is None or not table.row_count:
            return
        token_id = int(table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value)
        excluded = set(data.get("excluded", []))
        excluded ^= {token_id}
        try:
            set_excluded(run, sorted(excluded))
        except SafeSteerError as e:
            self.app.notify(str(e), severity="error")
        self.app.refresh_run()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_toggle()
