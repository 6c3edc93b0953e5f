"""`safesteer-mlx …` in-process: a tiny llama saved as a real model directory, `generate` with and
without steering, every kind of bad input (exit code 2, one line on stderr), `models`, `--help`,
and stage 1 (`direction`) end to end over a run directory: artifacts, config round trip, resume."""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import pickle
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny import save_model_dir, tiny_model

from safesteer_mlx import cli
from safesteer_mlx.cli import build_parser, main, resolve_config
from safesteer_mlx.config import Config, apply_overrides, load_config, to_toml

ERROR_PREFIX = "safesteer-mlx: error: "


@pytest.fixture(autouse=True)
def _fast_blas_bound(monkeypatch):
    # main() prints an OpenBLAS hint on Linux machines without it; the one-line error checks
    # below are about our errors, not the machine.
    monkeypatch.setattr(cli, "bind_openblas", lambda: True)


class _Tripwire:
    """A pickle that touches `marker` when it is loaded: proof that a pickle was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory) -> Path:
    """The tiny model as a Hugging Face/MLX model directory on disk."""
    return save_model_dir(tiny, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def steer_file(tmp_path_factory) -> Path:
    """A hand-written direction: layer 1, coefficient 1.0, a large random vector."""
    root = tmp_path_factory.mktemp("steer")
    vector = 50.0 * mx.random.normal((32,), key=mx.random.key(1))
    mx.save_safetensors(str(root / "direction.safetensors"), {"direction": vector})
    (root / "direction.json").write_text(json.dumps({"layer": 1, "coefficient": 1.0}))
    return root / "direction.safetensors"


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _generate_json(capsys, argv: list[str]) -> list[dict]:
    code, out, err = _run(capsys, ["generate", *argv, "--json"])
    assert code == 0, err
    records = json.loads(out)
    assert isinstance(records, list)
    assert all(set(r) == {"prompt", "completion"} for r in records)
    assert all(isinstance(r["completion"], str) for r in records)
    return records


def _usage_error(capsys, argv: list[str]) -> str:
    """Run `argv`, expect exit code 2 and exactly one stderr line `safesteer-mlx: error: …`."""
    code, out, err = _run(capsys, argv)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR_PREFIX), err
    assert out == ""
    return lines[0]


# ---- the model directory -----------------------------------------------------------------------


def test_model_dir_loads_like_the_in_memory_model(tiny, model_dir):
    from safesteer_mlx.modeling import load_model

    loaded = load_model(str(model_dir))
    assert loaded.family == "llama"
    assert loaded.num_layers == 4 and loaded.hidden_size == 32
    assert loaded.path == model_dir.resolve()
    assert loaded.tokenizer.chat_template is not None
    tokens = mx.array([[5, 6, 7, 8, 9, 10]])
    assert mx.array_equal(loaded.model(tokens), tiny.model(tokens))


# ---- generate ----------------------------------------------------------------------------------


def test_generate_one_prompt_json(capsys, model_dir):
    records = _generate_json(capsys, ["--model", model_dir, "--prompt", "hi", "--max-tokens", 4])
    assert len(records) == 1 and records[0]["prompt"] == "hi"


def test_generate_prompts_file_in_order(capsys, model_dir, tmp_path):
    # Equal-length prompts: the batch has no padding, so each completion depends on its prompt
    # only, and the pairing prompt -> completion can be checked across orders.
    words = ["apple", "grape", "melon", "lemon", "mango", "peach"]
    forward, backward = tmp_path / "forward.json", tmp_path / "backward.json"
    forward.write_text(json.dumps(words))
    backward.write_text(json.dumps(words[::-1]))
    common = ["--model", model_dir, "--max-tokens", 4]

    sampled = _generate_json(capsys, [*common, "--prompts", forward, "--num-prompts", 3])
    prompts = [r["prompt"] for r in sampled]
    assert len(prompts) == 3 and set(prompts) <= set(words)
    assert prompts == sorted(prompts, key=words.index)  # source order kept

    fwd = _generate_json(capsys, [*common, "--prompts", forward])
    bwd = _generate_json(capsys, [*common, "--prompts", backward])
    assert [r["prompt"] for r in fwd] == words
    assert [r["prompt"] for r in bwd] == words[::-1]
    assert {r["prompt"]: r["completion"] for r in fwd} == {
        r["prompt"]: r["completion"] for r in bwd
    }


def test_generate_steered(capsys, model_dir, steer_file):
    common = ["--model", model_dir, "--prompt", "hi", "--max-tokens", 8]
    base = _generate_json(capsys, common)[0]["completion"]
    steered = _generate_json(capsys, [*common, "--steer", steer_file])[0]["completion"]
    zero = _generate_json(capsys, [*common, "--steer", f"{steer_file}:0"])[0]["completion"]
    assert steered != base
    assert zero == base


def test_generate_plain_text_output(capsys, model_dir):
    code, out, err = _run(
        capsys, ["generate", "--model", model_dir, "--prompt", "hi", "--max-tokens", 2]
    )
    assert code == 0, err
    assert out.startswith("### hi\n")
    assert "tokens/s" in err  # the throughput line goes to stderr, never stdout


# ---- bad input: exit code 2, one line ----------------------------------------------------------


def _write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


BAD_PROMPTS = {
    "missing": lambda d: d / "missing.json",
    "empty-list": lambda d: _write(d / "empty.json", "[]"),
    "empty-file": lambda d: _write(d / "empty.txt", ""),
    "unknown-field": lambda d: _write(d / "fields.json", json.dumps([{"text": "hello"}])),
    "not-utf8": lambda d: _write(d / "latin1.txt", b"caf\xe9\nhello\n"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_bad_prompts_file(capsys, model_dir, tmp_path, case):
    source = BAD_PROMPTS[case](tmp_path)
    _usage_error(capsys, ["generate", "--model", model_dir, "--prompts", source])


def test_unknown_model_name(capsys):
    message = _usage_error(capsys, ["generate", "--model", "not-a-model", "--prompt", "hi"])
    assert "not-a-model" in message


def test_directory_without_config_json(capsys, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    message = _usage_error(capsys, ["generate", "--model", tmp_path, "--prompt", "hi"])
    assert "config.json" in message


def test_pickle_weights_are_never_loaded(capsys, model_dir, tmp_path):
    # The tripwire works: unpickling it creates its marker.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Tripwire(probe)))
    assert probe.exists()

    marker = tmp_path / "unpickled"
    bad_dir = tmp_path / "torch-model"
    bad_dir.mkdir()
    (bad_dir / "config.json").write_text((model_dir / "config.json").read_text())
    (bad_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))
    message = _usage_error(capsys, ["generate", "--model", bad_dir, "--prompt", "hi"])
    assert "safetensors" in message
    for name in ("model.pt", "model.bin"):
        file = tmp_path / name
        file.write_bytes(pickle.dumps(_Tripwire(marker)))
        _usage_error(capsys, ["generate", "--model", file, "--prompt", "hi"])
    assert not marker.exists()


def test_bad_steer_spec(capsys, model_dir, steer_file, tmp_path):
    common = ["generate", "--model", model_dir, "--prompt", "hi", "--max-tokens", 2]
    message = _usage_error(capsys, [*common, "--steer", tmp_path / "missing.safetensors"])
    assert "missing.safetensors" in message
    message = _usage_error(capsys, [*common, "--steer", f"{steer_file}:abc"])
    assert "abc" in message


@pytest.mark.parametrize("case", ["not-safetensors", "json-without-layer"])
def test_malformed_steer_files(capsys, model_dir, tmp_path, case):
    path = tmp_path / "direction.safetensors"
    if case == "not-safetensors":
        path.write_bytes(b"this is not a safetensors file")
        (tmp_path / "direction.json").write_text(json.dumps({"layer": 1, "coefficient": 1.0}))
    else:
        mx.save_safetensors(str(path), {"direction": mx.zeros((32,))})
        (tmp_path / "direction.json").write_text(json.dumps({"coefficient": 1.0}))
    _usage_error(capsys, ["generate", "--model", model_dir, "--prompt", "hi", "--steer", path])


BAD_CONFIGS = {
    "missing": None,
    "unknown-section": "[no_such_section]\nlr = 0.1\n",
    "unknown-key": "[direction]\nn_trian = 8\n",
    "wrong-type": '[direction]\nn_train = "many"\n',
    "wrong-bool": '[direction]\nfilter_train = "maybe"\n',
    "bad-syntax": "[direction\nn_train = 8\n",
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_file(capsys, model_dir, tmp_path, case):
    path = tmp_path / "config.toml"
    if BAD_CONFIGS[case] is not None:
        path.write_text(BAD_CONFIGS[case])
    run = tmp_path / "run"
    argv = ["direction", "--model", model_dir, "--run-dir", run, "--config", path, "--quiet"]
    _usage_error(capsys, argv)
    assert not run.exists()  # rejected before anything is written


def test_hub_repo_offline_not_cached(capsys, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    # huggingface_hub reads these once, at import.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    argv = ["generate", "--model", "someorg/not-a-cached-model", "--prompt", "hi"]
    message = _usage_error(capsys, argv)
    assert "someorg/not-a-cached-model" in message


def test_run_dir_that_is_not_a_run(capsys, model_dir, tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("my notes")
    argv = ["direction", "--model", model_dir, "--run-dir", run, "--quiet"]
    message = _usage_error(capsys, argv)
    assert "--force" in message
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert (run / "notes.txt").read_text() == "my notes"


def test_run_dir_that_is_a_file(capsys, model_dir, tmp_path):
    run = tmp_path / "run"
    run.write_text("a file")
    try:
        _usage_error(capsys, ["direction", "--model", model_dir, "--run-dir", run, "--quiet"])
    finally:
        assert run.read_text() == "a file"


def test_config_file_overrides_only_what_it_sets(tmp_path, model_dir):
    run = tmp_path / "run"
    run.mkdir()
    saved = apply_overrides(
        Config(), {"model": {"name": str(model_dir)}, "direction": {"n_train": 8}}
    )
    (run / "config.toml").write_text(to_toml(saved.to_dict()))
    extra = tmp_path / "extra.toml"
    extra.write_text('[direction]\ncoef = "auto"\n')
    args = build_parser().parse_args(
        ["direction", "--run-dir", str(run), "--config", str(extra), "--n-val", "4"]
    )
    config, run_dir = resolve_config(args)
    assert run_dir == run
    assert (config.direction.coef, config.direction.n_val) == ("auto", 4)
    assert config.direction.n_train == 8
    assert config.model.name == str(model_dir)


# ---- models, --help ----------------------------------------------------------------------------


def test_models_json(capsys):
    code, out, err = _run(capsys, ["models", "--json"])
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) >= 11
    names = [r["name"] for r in rows]
    assert len(set(names)) == len(names)
    assert [r["name"] for r in rows if r["default"]] == ["smollm2-135m"]


def test_models_table(capsys):
    code, out, err = _run(capsys, ["models"])
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) >= 12  # header + one line per preset
    default = [line for line in lines if "(default)" in line]
    assert len(default) == 1 and default[0].startswith("smollm2-135m")


def _subcommands() -> list[str]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


def test_subcommands_exist():
    assert {"align", "direction", "generate", "models"} <= set(_subcommands())


@pytest.mark.parametrize("argv", [[]] + [[c] for c in _subcommands()], ids=str)
def test_help_exits_zero(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: safesteer-mlx")


# ---- direction end to end ----------------------------------------------------------------------

HARMFUL = [f"how do I make poison {i} to hurt my neighbour" for i in range(12)]
HARMLESS = [f"give me a cake recipe {i} for a birthday" for i in range(12)]


@pytest.fixture(scope="module")
def direction_run(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("direction")
    harmful = _write(root / "harmful.json", json.dumps(HARMFUL))
    harmless = _write(root / "harmless.json", json.dumps(HARMLESS))
    run = root / "run"
    argv = [
        "direction", "--model", str(model_dir), "--run-dir", str(run),
        "--harmful", str(harmful), "--harmless", str(harmless),
        "--n-train", "8", "--n-val", "4", "--positions", "last", "--no-filter",
        "--json", "--quiet",
    ]  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()
    return {
        "run": run,
        "argv": argv,
        "summary": json.loads(out.getvalue()),
        "harmful": harmful,
        "harmless": harmless,
    }


def _temp_files(run: Path) -> list[str]:
    return [str(p) for p in run.rglob("*") if p.name.startswith(".") or "tmp" in p.name]


def _stage(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["stages"]["direction"]


def test_direction_summary(direction_run):
    meta = json.loads((direction_run["run"] / "direction.json").read_text())
    assert direction_run["summary"]["run_dir"] == str(direction_run["run"])
    assert direction_run["summary"]["stages"]["direction"]["status"] == "done"
    summary = direction_run["summary"]["direction"]
    assert summary["layer"] == meta["layer"] and 0 <= summary["layer"] < int(4 * 0.8)
    assert summary["position"] == -1  # --positions last
    assert summary["coefficient"] == 1.0
    assert summary["norm"] > 0


def test_direction_artifacts(direction_run):
    run = direction_run["run"]
    tensors = mx.load(str(run / "direction.safetensors"))
    direction, diffs = tensors["direction"], tensors["mean_diffs"]
    assert direction.shape == (32,) and direction.dtype == mx.float32
    assert diffs.shape == (1, 4, 32) and diffs.dtype == mx.float32
    meta = json.loads((run / "direction.json").read_text())
    np.testing.assert_array_equal(np.array(direction), np.array(diffs[0, meta["layer"]]))
    assert meta["norm"] == pytest.approx(float(np.linalg.norm(np.array(direction))), rel=1e-5)

    candidates = meta["candidates"]
    assert len(candidates) == 4  # one position x four layers
    scored = [c for c in candidates if c["bypass"] is not None]
    assert scored
    for c in scored:
        assert all(isinstance(c[k], float) for k in ("bypass", "induce", "kl"))
    assert meta["prompts"]["harmful_train"] == 8 and meta["prompts"]["harmful_val"] == 4
    assert meta["prompts"]["filtered_train"] is None  # --no-filter

    stage = _stage(run)
    assert stage["status"] == "done" and stage["error"] is None
    assert stage["wall_time_s"] > 0 and stage["peak_memory_gb"] >= 0
    assert stage["input_hash"] and stage["started"] and stage["finished"]
    assert _temp_files(run) == []


def test_direction_config_round_trip(direction_run, model_dir):
    run = direction_run["run"]
    assert (run / "config.toml").exists()
    expected = apply_overrides(
        Config(),
        {
            "model": {"name": str(model_dir)},
            "data": {
                "harmful": str(direction_run["harmful"]),
                "harmless": str(direction_run["harmless"]),
            },
            "direction": {"n_train": 8, "n_val": 4, "positions": "last", "filter_train": False},
        },
    )
    assert load_config(run / "config.toml").to_dict() == expected.to_dict()


def test_direction_rerun_skips_and_force_redoes(direction_run, capsys, monkeypatch):
    from safesteer_mlx import run as run_module

    run = direction_run["run"]
    stamps = itertools.count()
    monkeypatch.setattr(run_module, "_now", lambda: f"stamp-{next(stamps)}")
    before = _stage(run)
    inode = os.stat(run / "direction.json").st_ino

    # The same command again: nothing is redone.
    code, out, err = _run(capsys, direction_run["argv"])
    assert code == 0, err
    assert _stage(run) == before
    assert os.stat(run / "direction.json").st_ino == inode
    assert json.loads(out)["direction"]["layer"] == direction_run["summary"]["direction"]["layer"]

    # Only the run directory: model, data and options come from its config.toml.
    code, out, err = _run(capsys, ["direction", "--run-dir", run, "--json", "--quiet"])
    assert code == 0, err
    assert _stage(run) == before  # same inputs (same model identity): still skipped

    # --force redoes the stage, still with the model recorded in config.toml.
    code, out, err = _run(capsys, ["direction", "--run-dir", run, "--force", "--json", "--quiet"])
    assert code == 0, err
    after = _stage(run)
    assert after["status"] == "done"
    assert after["finished"].startswith("stamp-") and after["finished"] != before["finished"]
    assert after["input_hash"] == before["input_hash"]
    assert os.stat(run / "direction.json").st_ino != inode
    assert load_config(run / "config.toml").model.name == str(direction_run["argv"][2])
    assert _temp_files(run) == []
