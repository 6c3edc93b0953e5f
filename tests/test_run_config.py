"""The run directory (atomic writes, the manifest, stage skipping, input hashes) and the config
tree (reference defaults, TOML round trip, checked overrides)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from safesteer_mlx import run as run_module
from safesteer_mlx.config import Config, apply_overrides, load_config, to_toml
from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.run import (
    RunDir,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    input_hash,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


# ---- atomic writes -----------------------------------------------------------------------------


def test_atomic_write_text_and_json(tmp_path):
    text = tmp_path / "sub" / "notes.txt"
    atomic_write_text(text, "héllo\n")
    assert text.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_text(text, "second")
    assert text.read_text() == "second"

    data = tmp_path / "data.json"
    obj = {"a": [1, 2.5, None], "b": "ünïcode", "c": {"d": True}}
    atomic_write_json(data, obj)
    assert json.loads(data.read_text(encoding="utf-8")) == obj
    assert _names(tmp_path) == ["data.json", "sub"]
    assert _names(tmp_path / "sub") == ["notes.txt"]


@pytest.mark.parametrize("failing", ["os.replace", "os.fsync"])
def test_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch, failing):
    target = tmp_path / "manifest.json"
    atomic_write_json(target, {"old": True})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(run_module.os, failing.split(".")[1], boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(target, {"new": True})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    assert _names(tmp_path) == ["manifest.json"]


def test_unserialisable_json_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_json(target, [1])
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    assert json.loads(target.read_text()) == [1]
    assert _names(tmp_path) == ["result.json"]


def test_atomic_path_success(tmp_path):
    target = tmp_path / "direction.safetensors"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        assert tmp.suffix == ".safetensors"  # writers that pick the format from the name
        assert not target.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert _names(tmp_path) == ["direction.safetensors"]


def test_atomic_path_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "direction.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer crashed"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["direction.safetensors"]


def test_atomic_path_interrupted_leaves_nothing(tmp_path):
    target = tmp_path / "plot.png"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert _names(tmp_path) == []


# ---- manifest, stages --------------------------------------------------------------------------


def test_fresh_run_dir(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.manifest() == {"stages": {}}
    assert run.stage("direction") == {}
    assert not run.is_current("direction", "h", [])
    assert not run.path.exists()  # reading creates nothing
    assert run.config == run.path / "config.toml"
    assert run.direction_tensors.name == "direction.safetensors"


def test_stage_run_records_running_then_done(tmp_path):
    run = RunDir(tmp_path / "run")
    artifact = run.path / "direction.json"
    with run.stage_run("direction", "hash-1") as stats:
        entry = run.stage("direction")
        assert entry["status"] == "running" and entry["input_hash"] == "hash-1"
        assert entry["started"]
        assert not run.is_current("direction", "hash-1", [])
        atomic_write_json(artifact, {"layer": 3})
        stats.update(candidates_scored=7, tokens_per_s=12.5)
    entry = run.stage("direction")
    assert entry["status"] == "done" and entry["error"] is None
    assert entry["input_hash"] == "hash-1"
    assert entry["finished"] >= entry["started"]
    assert entry["wall_time_s"] >= 0 and entry["peak_memory_gb"] >= 0
    assert entry["candidates_scored"] == 7 and entry["tokens_per_s"] == 12.5

    assert run.is_current("direction", "hash-1", [artifact])
    assert not run.is_current("direction", "hash-2", [artifact])  # inputs changed
    assert not run.is_current("mining", "hash-1", [])  # another stage
    artifact.unlink()
    assert not run.is_current("direction", "hash-1", [artifact])  # artifact gone
    assert _names(run.path) == ["manifest.json"]


def test_stage_run_keeps_other_stages(tmp_path):
    run = RunDir(tmp_path)
    with run.stage_run("direction", "a"):
        pass
    with run.stage_run("mining", "b"):
        pass
    stages = run.manifest()["stages"]
    assert set(stages) == {"direction", "mining"}
    assert stages["direction"]["status"] == stages["mining"]["status"] == "done"


def test_stage_run_failure(tmp_path):
    run = RunDir(tmp_path)
    with run.stage_run("direction", "a"):
        pass
    with pytest.raises(ValueError, match="boom"):
        with run.stage_run("direction", "b"):
            raise ValueError("boom")
    entry = run.stage("direction")
    assert entry["status"] == "failed" and entry["error"] == "boom"
    assert entry["input_hash"] == "b" and entry["finished"]
    assert not run.is_current("direction", "a", [])
    assert not run.is_current("direction", "b", [])

    # A successful rerun clears the error.
    with run.stage_run("direction", "b"):
        pass
    entry = run.stage("direction")
    assert entry["status"] == "done" and entry["error"] is None


def test_stage_run_interrupted(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with run.stage_run("distill", "a"):
            raise KeyboardInterrupt
    entry = run.stage("distill")
    assert entry["status"] == "interrupted"
    assert not run.is_current("distill", "a", [])


def test_stage_run_on_a_file_path(tmp_path):
    path = tmp_path / "run"
    path.write_text("not a directory")
    with pytest.raises(SafeSteerError) as info:
        with RunDir(path).stage_run("direction", "a"):
            pass
    assert "file" in _one_line_error(info)
    assert path.read_text() == "not a directory"


@pytest.mark.parametrize(
    "content",
    [
        b'{"stages": {"direction": ',
        b"",
        b"garbage",
        pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
        pytest.param(b"[]", id="list"),
        pytest.param(b"{}", id="no-stages"),
        pytest.param(b'{"stages": []}', id="stages-list"),
    ],
)
def test_corrupt_manifest(tmp_path, content):
    (tmp_path / "manifest.json").write_bytes(content)
    run = RunDir(tmp_path)
    with pytest.raises(SafeSteerError) as info:
        run.stage("direction")
    assert "manifest.json" in _one_line_error(info)
    with pytest.raises(SafeSteerError):
        run.is_current("direction", "a", [])
    assert (tmp_path / "manifest.json").read_bytes() == content  # left for the user to inspect


# ---- input hashes ------------------------------------------------------------------------------


def test_input_hash_is_stable_and_discriminating():
    a = {"n_train": 128, "n_val": 32, "nested": {"x": 1, "y": [1, 2]}}
    b = {"nested": {"y": [1, 2], "x": 1}, "n_val": 32, "n_train": 128}
    assert input_hash("direction-v1", a, "model#abc") == input_hash("direction-v1", b, "model#abc")
    h = input_hash("direction-v1", a, "model#abc")
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == input_hash("direction-v1", dict(a), "model#abc")  # same across calls

    others = [
        input_hash("direction-v1", {**a, "n_train": 64}, "model#abc"),
        input_hash("direction-v1", a, "model#abd"),
        input_hash("direction-v2", a, "model#abc"),
        input_hash("direction-v1", {**a, "nested": {"x": 1, "y": [2, 1]}}, "model#abc"),
        input_hash("direction-v1", a),
    ]
    assert len({h, *others}) == len(others) + 1
    assert input_hash(Path("/a/b")) == input_hash("/a/b")  # paths hash as their text


# ---- config ------------------------------------------------------------------------------------


def test_defaults_are_the_reference_values():
    c = Config()
    assert c.seed == 0
    assert c.model.name == "smollm2-135m"
    assert (c.data.harmful, c.data.harmless) == ("builtin:harmful", "builtin:harmless")
    d = c.direction
    assert (d.n_train, d.n_val) == (128, 32)
    assert d.kl_threshold == 0.1
    assert d.induce_threshold == 0.0
    assert d.max_layer_fraction == 0.8
    assert d.coef == "1.0"
    assert d.filter_train is True
    assert d.layer is None and d.position is None


def _custom_config() -> Config:
    return apply_overrides(
        Config(),
        {
            "seed": 7,
            "model": {"name": "/models/my model", "dtype": "bfloat16", "revision": None},
            "data": {
                "harmful": "hf:walledai/AdvBench:train#prompt",
                "system_prompt": 'Be "helpful".\nUse C:\\paths and\ttabs',
            },
            "direction": {
                "n_train": 16,
                "kl_threshold": 0.25,
                "coef": "auto",
                "layer": 3,
                "position": -2,
                "filter_train": False,
                "positions": "last",
            },
        },
    )


@pytest.mark.parametrize("make", [Config, _custom_config], ids=["defaults", "custom"])
def test_toml_round_trip(make, tmp_path):
    config = make()
    text = to_toml(config.to_dict())
    data = tomllib.loads(text)
    # TOML has no null: None values are left out (and so keep their None default).
    for section, values in config.to_dict().items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert (key in data[section]) == (value is not None), (section, key)
    again = apply_overrides(Config(), data)
    assert again == config
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert load_config(path) == config


def test_config_with_a_resolved_model_section(tmp_path):
    # What the CLI writes into a run's config.toml: the config plus the model it resolved.
    config = _custom_config()
    data = {**config.to_dict(), "resolved_model": {"identity": "/m#abc", "adapter_path": None}}
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    assert load_config(path) == config


def test_overrides_coerce_flag_strings():
    c = apply_overrides(
        Config(), {"direction": {"n_train": "8", "kl_threshold": "0.5", "filter_train": "no"}}
    )
    assert (c.direction.n_train, c.direction.kl_threshold, c.direction.filter_train) == (
        8,
        0.5,
        False,
    )
    c = apply_overrides(Config(), {"direction": {"layer": None}, "model": {"dtype": None}})
    assert c.direction.layer is None and c.model.dtype is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"direction": {"n_train": "many"}},
        {"direction": {"n_train": True}},
        {"direction": {"kl_threshold": "small"}},
        {"direction": {"filter_train": "maybe"}},
        {"direction": {"layer": [1, 2]}},
        {"model": {"name": None}},
        {"seed": "zero"},
        {"direction": {"n_trian": 8}},
        {"no_such_section": {"lr": 0.1}},
        {"model": {"path": "x"}},
    ],
    ids=repr,
)
def test_bad_overrides(overrides):
    config = Config()
    with pytest.raises(SafeSteerError) as info:
        apply_overrides(config, overrides)
    _one_line_error(info)


@pytest.mark.parametrize(
    "overrides",
    [{"sede": 5}, {"direction": 5}, {"direction": {"n_train": 1.5}}],
    ids=repr,
)
def test_bad_overrides_rejected(overrides):
    config = Config()
    with pytest.raises(SafeSteerError):
        apply_overrides(config, overrides)
    assert config == Config()


def test_bad_toml_files(tmp_path):
    # name -> (content, what the message names)
    cases = {
        "missing.toml": (None, "missing.toml"),
        "syntax.toml": ("[direction\n", "syntax.toml"),
        "latin1.toml": (b'[data]\nharmful = "caf\xe9"\n', "latin1.toml"),
        "unknown.toml": ("[direction]\nbogus = 1\n", "direction.bogus"),
        "type.toml": ('[direction]\nn_val = "x"\n', "direction.n_val"),
    }
    for name, (content, named) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(SafeSteerError) as info:
            load_config(path)
        message = _one_line_error(info)
        assert named in message, message
