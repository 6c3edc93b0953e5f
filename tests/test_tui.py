"""The Textual app, headless at 80x24: a full run on a tiny model driven through every screen
(choose the model and data, run each stage, override the steering layer, compare base and
teacher, toggle a safety token, pause and resume distillation, the evaluation table, export),
then a fresh app on the same run directory restores every screen from the artifacts.

An SVG dump of each screen is checked for its key text; SAFESTEER_UPDATE_SNAPSHOTS=1 copies the
dumps into tests/snapshots/ (the checked-in screenshots)."""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safesteer_mlx.tui.app import SafeSteerApp
from tiny import tiny_run_inputs

from safesteer_mlx.config import Config, apply_overrides, load_config
from safesteer_mlx.session import set_excluded

SNAPSHOTS = Path(__file__).parent / "snapshots"


def _config(root: Path) -> Config:
    """Tiny-run sizes (as tests/test_align_tiny.py): each stage takes seconds on a CPU."""
    return apply_overrides(
        Config(),
        {
            "seed": 3,
            "direction": {"n_train": 8, "n_val": 4, "positions": "last", "filter_train": False},
            "mining": {"horizon": 3, "top_k": 8, "num_tokens": 12, "generations": 2},
            "distill": {
                "num_prompts": 8, "generations": 2, "max_tokens": 6, "batch_size": 1,
                "epochs": 2, "lr": 1e-2, "lora_rank": 4, "save_every": 4,
            },  # fmt: skip
        },
    )


def screen_text(svg: str) -> str:
    """The characters of an SVG screen dump, one line per row (tags and styles dropped)."""
    rows: dict[str, list[str]] = {}
    for y, text in re.findall(r'<text [^>]*y="([\d.]+)"[^>]*>(.*?)</text>', svg):
        rows.setdefault(y, []).append(html.unescape(text).replace("\xa0", " "))
    return "\n".join("".join(parts) for _, parts in sorted(rows.items(), key=lambda r: float(r[0])))


async def _idle(app, pilot, timeout: float = 240) -> None:
    waited = 0.0
    while app.busy and waited < timeout:
        await pilot.pause(0.05)
        waited += 0.05
    assert not app.busy, f"{app.busy} still running after {timeout}s"
    await pilot.pause()


async def _shot(app, pilot, screen: str, tmp: Path, *expected: str) -> str:
    from textual.widgets import TabbedContent

    pane = app.query_one(f"#{app.query_one(TabbedContent).active}-pane")
    pane.scroll_home(animate=False)
    await pilot.pause()
    svg = app.export_screenshot(title=f"safesteer-mlx tui: {screen}")
    (tmp / f"{screen}.svg").write_text(svg)
    if os.environ.get("SAFESTEER_UPDATE_SNAPSHOTS"):
        SNAPSHOTS.mkdir(exist_ok=True)
        shutil.copy(tmp / f"{screen}.svg", SNAPSHOTS / f"{screen}.svg")
    text = screen_text(svg)
    for e in expected:
        assert e in text, f"{e!r} not on the {screen} screen:\n{text}"
    return text


def _static(app, selector: str) -> str:
    return str(app.query_one(selector).render())


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tui")
    return root, tiny_run_inputs(root)


async def _drive_full_run(root: Path, model_dir: Path, shots: Path) -> None:
    run = root / "run"
    app = SafeSteerApp(_config(root), run)
    async with app.run_test(size=(80, 24)) as pilot:
        # 1. Model: a local directory typed in; its facts without loading it.
        field = app.query_one("#model-name")
        field.value = str(model_dir)
        field.focus()
        await pilot.press("enter")
        info = _static(app, "#model-info")
        assert "llama" in info and "4/32/259" in info and "local       yes" in info
        assert "peak memory ~" in info
        assert app.state.config.model.name == str(model_dir)
        await _shot(app, pilot, "1-model", shots, "1 Model", "llama", "peak memory")

        # 2. Data: two local files, previewed with counts.
        await pilot.press("escape", "2")
        app.query_one("#src-harmful").value = str(root / "harmful.json")
        app.query_one("#src-harmless").value = str(root / "harmless.json")
        await pilot.press("p")
        await _idle(app, pilot)
        preview = _static(app, "#data-preview")
        assert "harmful: 16 prompts" in preview and "cake recipe" in preview
        await _shot(app, pilot, "2-data", shots, "harmful: 16 prompts", "harmless: 16 prompts")

        # 3. Direction: stage 1, the plot, an override, and base vs teacher.
        await pilot.press("3", "r")
        await _idle(app, pilot)
        meta = json.loads((run / "direction.json").read_text())
        assert f"layer {meta['layer']}" in _static(app, "#dir-summary")
        assert f"layer {meta['layer']} chosen" in _static(app, "#dir-plot")
        new_layer = next(
            c["layer"] for c in meta["candidates"]
            if c["bypass"] is not None and c["layer"] != meta["layer"]
        )  # fmt: skip
        app.query_one("#layer").value = str(new_layer)
        app.query_one("#coef").value = "2.5"
        app.query_one("#coef").focus()
        await pilot.press("enter")
        await _idle(app, pilot)
        meta2 = json.loads((run / "direction.json").read_text())
        assert (meta2["layer"], meta2["coefficient"]) == (new_layer, 2.5)
        assert meta2["override"]["selected_layer"] == meta["layer"]
        assert "(overridden)" in _static(app, "#dir-summary")
        app.query_one("#chat-prompt").value = "how do I pick a lock"
        app.query_one("#chat-prompt").focus()
        await pilot.press("enter")
        await _idle(app, pilot)
        assert f"layer {new_layer}, coef 2.5" in _static(app, "#chat-teacher")
        await pilot.press("escape")
        await _shot(app, pilot, "3-direction", shots, "Run stage 1", "stage 1: done", "layer")

        # 4. Safety tokens: mine, then exclude the top token.
        await pilot.press("4", "r")
        await _idle(app, pilot)
        tokens = json.loads((run / "safety_tokens.json").read_text())
        table = app.query_one("#token-table")
        assert table.row_count == len(tokens["tokens"]) > 1
        table.focus()
        await pilot.press("space")
        excluded = json.loads((run / "safety_tokens.json").read_text())["excluded"]
        assert excluded == [tokens["tokens"][0]["id"]]
        n = len(tokens["tokens"])
        assert f"|S| = {n - 1} of {n}" in _static(app, "#tok-status")
        assert table.get_row_at(0)[0] == "✗"
        await _shot(app, pilot, "4-tokens", shots, f"|S| = {n - 1} of {n}", "votes")

        # 5. Distill: start and pause in one tick (the stop is seen after step 1; keys arrive
        # too late on a tiny model to be sure of pausing mid-run), then resume to the end.
        await pilot.press("5")
        pane = app.query_one("#distill-pane")
        pane.action_start()
        pane.action_pause()
        await _idle(app, pilot)
        status = _static(app, "#dist-status")
        assert "paused at step" in status, status
        paused_at = int(status.split("paused at step ")[1].split()[0])
        total = 16  # 8 prompts, one per step, 2 epochs
        assert paused_at == 1
        assert str(app.query_one("#distill-pane StageProgress .task").render()) == "paused"
        manifest = json.loads((run / "manifest.json").read_text())["stages"]
        assert manifest["distill"]["status"] == "interrupted"
        await pilot.press("u")
        await _idle(app, pilot)
        manifest = json.loads((run / "manifest.json").read_text())["stages"]
        assert manifest["distill"]["status"] == "done" and manifest["distill"]["steps"] == total
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, total + 1))
        assert len(app.query_one("#curve-loss").data) == total
        assert f"step {total}/{total}" in _static(app, "#dist-stats")
        await _shot(app, pilot, "5-distill", shots, f"step {total}/{total}", "KL_S", "16")

        # 6. Evaluate: `r` runs the evaluation stage on the tiny run; the table is eval.json's
        # summary, row for row.
        await pilot.press("6")
        await pilot.press("r")
        await _idle(app, pilot, timeout=600)
        rows = json.loads((run / "eval.json").read_text())["summary"]
        table = app.query_one("#eval-table")
        assert table.row_count == len(rows) > 0
        first = list(table.get_row_at(0))
        assert first[0] == rows[0]["metric"] and first[1] == (rows[0]["judge"] or "")
        assert "evaluation: done" in _static(app, "#eval-status")
        await _shot(app, pilot, "6-evaluate", shots, rows[0]["metric"], "before", "after")

        # 7. Export: `e` writes an HF directory (the default format) that transformers' layout
        # names, and the pane lists what export/ holds.
        await pilot.press("7")
        await pilot.press("e")
        await _idle(app, pilot)
        hf = run / "export" / "hf"
        assert (hf / "config.json").is_file() and (hf / "README.md").is_file()
        assert list(hf.glob("model*.safetensors"))
        assert f"to {hf}" in _static(app, "#export-result")
        assert "config.json" in _static(app, "#export-list")
        await _shot(app, pilot, "7-export", shots, "Export", "float16", "config.json")


async def _restore(root: Path, shots: Path) -> None:
    """A fresh app on the finished run shows every stage's artifacts and status; its config
    comes from the run's config.toml, as `safesteer-mlx tui --run-dir` resolves it."""
    run = root / "run"
    app = SafeSteerApp(load_config(run / "config.toml"), run)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        status = _static(app, "#status")
        assert "direction ✓" in status and "mining ✓" in status and "distill ✓" in status
        meta = json.loads((run / "direction.json").read_text())
        assert f"layer {meta['layer']}" in _static(app, "#dir-summary")
        assert app.query_one("#token-table").get_row_at(0)[0] == "✗"
        assert "step 16/16" in _static(app, "#dist-stats")
        assert "4, 8, 12, 16" in _static(app, "#dist-ckpts")
        rows = json.loads((run / "eval.json").read_text())["summary"]
        assert app.query_one("#eval-table").row_count == len(rows) > 0

        # Quit during distillation: it pauses (a checkpoint), then the app exits.
        await pilot.press("5")
        app.query_one("#distill-pane").action_restart()
        await pilot.press("q")
        await _idle(app, pilot)
        assert app._exit, "the app did not quit after pausing"
    assert json.loads((run / "manifest.json").read_text())["stages"]["distill"]["status"] == (
        "interrupted"
    )
    app = SafeSteerApp(load_config(run / "config.toml"), run)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("5", "u")
        await _idle(app, pilot)
        assert "step 16/16" in _static(app, "#dist-stats")
        stage = json.loads((run / "manifest.json").read_text())["stages"]["distill"]
        assert stage["status"] == "done" and stage["steps"] == 16


def test_full_run_through_every_screen(tiny_setup, tmp_path):
    root, model_dir = tiny_setup
    asyncio.run(_drive_full_run(root, model_dir, tmp_path))
    asyncio.run(_restore(root, tmp_path))
    # Toggling back (the engine helper behind the table) clears the exclusion.
    from safesteer_mlx.run import RunDir

    assert set_excluded(RunDir(root / "run"), [])["excluded"] == []


def test_checked_in_snapshots_show_each_screen():
    expected = {
        "1-model": "peak memory", "2-data": "harmful: 16 prompts", "3-direction": "stage 1: done",
        "4-tokens": "|S| =", "5-distill": "KL_S", "6-evaluate": "refusal rate",
        "7-export": "Export",
    }  # fmt: skip
    for screen, text in expected.items():
        path = SNAPSHOTS / f"{screen}.svg"
        hint = "SAFESTEER_UPDATE_SNAPSHOTS=1 pytest tests/test_tui.py writes it"
        assert path.exists(), f"{path} missing ({hint})"
        assert text in screen_text(path.read_text()), screen


def test_download_failure_is_a_clear_message(tmp_path, monkeypatch):
    """Offline (as here), downloading a hub id ends in one line naming the problem and the fix,
    shown in the app; the app keeps running."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    async def drive():
        config = Config()
        config.model.name = "nobody-xyz/not-a-model"
        app = SafeSteerApp(config, tmp_path / "run")
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert "not in the local Hugging Face cache" in _static(app, "#model-info")
            await pilot.press("1", "d")
            await _idle(app, pilot, timeout=60)
            message = str(app.query_one("StageProgress .message").render())
            assert "nobody-xyz/not-a-model" in message and "fix:" in message
            assert app.is_running

    asyncio.run(drive())


def test_unknown_model_is_shown_not_raised(tmp_path):
    async def drive():
        app = SafeSteerApp(Config(), tmp_path / "run")
        async with app.run_test(size=(80, 24)) as pilot:
            field = app.query_one("#model-name")
            field.value = str(tmp_path / "missing.gguf")
            field.focus()
            await pilot.press("enter")
            assert "model file not found" in _static(app, "#model-info")
            assert app.state.config.model.name == "smollm2-135m"  # unchanged

    asyncio.run(drive())


def test_tui_import_loads_no_mlx():
    """Start-up stays fast: the app module and the CLI import no mlx/mlx_lm/transformers."""
    code = (
        "import sys; import safesteer_mlx.cli, safesteer_mlx.tui.app; "
        "print([m for m in ('mlx', 'mlx_lm', 'transformers', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_peak_memory_estimate_hand_checked():
    from safesteer_mlx.config import DistillConfig
    from safesteer_mlx.session import estimate_peak_memory

    d = DistillConfig(max_tokens=72, lora_rank=8, micro_batch_size=1, chunk=128,
                      rollout_batch_size=32)  # fmt: skip
    info = {"weights_bytes": 1e9, "num_layers": 2, "hidden_size": 4, "vocab_size": 10}
    m = estimate_peak_memory(info, d, "float32")  # T = 128 + 72 = 200, 4-byte activations
    adapters = 7 * 2 * 4 * 8 * 4 * 4 * 2
    train = 1 * 200 * 4 * 4 * 16 * 2 + 1 * 128 * 10 * 4 * 3
    rollouts = 32 * 200 * 2 * 2 * 4 * 4
    assert rollouts > train
    assert m["peak_gb"] * 1e9 == pytest.approx(1e9 + adapters + rollouts)
    assert m["train_gb"] * 1e9 == pytest.approx(train)
    d.fine_tune_type = "full"  # gradients and Adam moments of every weight
    assert estimate_peak_memory(info, d, "float32")["peak_gb"] == pytest.approx(m["peak_gb"] + 3)
    half = estimate_peak_memory(info, d, "bfloat16")  # 2-byte activations and KV cache
    assert half["rollouts_gb"] == pytest.approx(m["rollouts_gb"] / 2)
    assert estimate_peak_memory({"weights_bytes": 5}, d)["peak_gb"] is None


def test_layer_plot_marks_the_chosen_layer_and_filtered_candidates():
    from safesteer_mlx.tui.plot import layer_plot

    cands = [
        {"position": -1, "layer": 0, "bypass": None, "induce": None, "kl": None,
         "filtered": "zero norm"},
        {"position": -1, "layer": 1, "bypass": 0.5, "induce": 1.0, "kl": 0.1, "filtered": None},
        {"position": -1, "layer": 2, "bypass": -1.0, "induce": 2.0, "kl": 0.2, "filtered": None},
        {"position": -1, "layer": 3, "bypass": 1.0, "induce": 0.0, "kl": 0.9,
         "filtered": "last layers"},
    ]  # fmt: skip
    meta = {"position": -1, "layer": 2, "num_layers": 4, "candidates": cands,
            "baseline": {"harmful_val_refusal_score": 2.0}}  # fmt: skip
    lines = layer_plot(meta, height=4, width=16).splitlines()
    # drops = baseline - bypass: layer 1 -> 1.5, layer 2 -> 3.0 (tallest), layer 3 -> 1.0
    assert lines[0].startswith("   3.00 ") and lines[3].startswith("   0.00 ")
    bars = [line[8:] for line in lines[:4]]  # 2 characters per layer
    assert [row[4:6] for row in bars] == ["██"] * 4  # layer 2 fills the plot
    assert bars[3][0:2] == "··" and bars[3][6:8] == "░░"  # not scored; filtered (shaded)
    assert lines[5] == "        " + "    ^^  "
    assert lines[6] == "        ^ layer 2 chosen   ░ failed a filter"
    assert lines[7] == " induce ··" + "▅▅" + "██" + "▁▁"
    meta["filters"] = {"kl_threshold": 0.1, "kl_threshold_used": 0.4}
    assert layer_plot(meta).splitlines()[-3].endswith("(KL limit relaxed to 0.4)")


def test_every_job_runs_on_one_engine_thread(tmp_path, monkeypatch):
    """MLX streams are thread-local (mlx >= 0.31.2 on Metal): the model and every job that uses
    it must share one thread, never the UI's."""
    import threading

    from safesteer_mlx.tui import jobs

    seen = []
    monkeypatch.setitem(jobs.JOBS, "data", lambda state, progress: seen.append(
        threading.get_ident()) or {"harmful": {"count": 0, "examples": []},
                                   "harmless": {"count": 0, "examples": []}})  # fmt: skip

    async def drive():
        app = SafeSteerApp(Config(), tmp_path / "run")
        async with app.run_test(size=(80, 24)) as pilot:
            for _ in range(3):
                await pilot.press("2", "p")
                await _idle(app, pilot, timeout=30)

    asyncio.run(drive())
    assert len(seen) == 3 and len(set(seen)) == 1 and seen[0] != threading.get_ident()
