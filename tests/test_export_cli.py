"""`safesteer-mlx export` and `align --export`: exit codes, messages, nothing half-written, the
model card, and the hub upload's token handling."""

from __future__ import annotations

import json

import pytest
from test_align_tiny import _argv
from test_export import make_run
from tiny import tiny_run_inputs

from safesteer_mlx.cli import main


def test_export_cli_json_and_refuses_existing(tmp_path, capsys):
    run, _ = make_run(tmp_path, "qwen2")
    argv = ["export", "--run-dir", str(run.path), "--format", "mlx", "--dtype", "float32"]
    assert main([*argv, "--q-bits", "4", "--q-group-size", "32", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "mlx" and result["q_bits"] == 4 and result["bytes"] > 0
    assert run.stage("export")["status"] == "done"
    assert main([*argv, "--quiet"]) == 2
    assert "exists (pass --force" in capsys.readouterr().err
    assert main([*argv, "--force", "--quiet"]) == 0


def test_unsupported_family_writes_nothing(tmp_path, capsys):
    run, _ = make_run(tmp_path, "phi3")
    assert main(["export", "--run-dir", str(run.path), "--format", "gguf", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'phi3'" in err and "supported: gemma2, gemma3_text, llama, mistral, qwen2, qwen3" in err
    assert not run.export_dir.exists()
    # The same model exports fine where the family is supported.
    assert main(["export", "--run-dir", str(run.path), "--format", "hf", "--quiet"]) == 0


def test_upload_token_only_from_environment(tmp_path, monkeypatch):
    import huggingface_hub

    from safesteer_mlx.export import run_export

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo, exist_ok):
            calls["repo"] = repo

        def upload_folder(self, folder_path, repo_id, ignore_patterns=()):
            calls["files"] = sorted(
                p.name
                for p in __import__("pathlib").Path(folder_path).iterdir()
                if p.name not in ignore_patterns
            )
            return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")
    run, _ = make_run(tmp_path, "llama")
    result = run_export(run, "hf", upload_repo="me/aligned")
    assert calls["token"] == "hf_secret_token_123" and calls["repo"] == "me/aligned"
    assert "README.md" in calls["files"] and "config.json" in calls["files"]
    assert ".safesteer-export" not in calls["files"]  # the local marker stays local
    assert result["url"].startswith("https://huggingface.co/me/aligned")
    card = (run.export_dir / "hf" / "README.md").read_text()
    assert 'from_pretrained("me/aligned")' in card
    assert str(tmp_path) not in card  # a pushed card names local files without their paths
    for path in run.path.rglob("*"):
        if path.is_file():
            assert b"hf_secret_token_123" not in path.read_bytes(), path
    with pytest.raises(Exception, match="ORG/NAME"):
        run_export(run, "hf", upload_repo="no-slash", force=True)


def test_align_export_is_the_last_step(tmp_path):
    model_dir = tiny_run_inputs(tmp_path)
    run = tmp_path / "run"
    assert main(_argv("align", model_dir, run, tmp_path, "--export", "hf")) == 0
    card = (run / "export" / "hf" / "README.md").read_text()
    direction = json.loads((run / "direction.json").read_text())
    assert f"direction at layer {direction['layer']}" in card
    assert "## Safety tokens S (12)" in card
    assert json.loads((run / "manifest.json").read_text())["stages"]["export"]["status"] == "done"
    # With an evaluation in the run, the card shows its before/after table.
    (run / "eval.json").write_text(
        json.dumps(
            {
                "summary": [
                    {
                        "metric": "harmful refusal rate",
                        "judge": "substring",
                        "before": 0.25,
                        "after": 0.9,
                    }
                ]
            }
        )
    )
    assert main(["export", "--run-dir", str(run), "--format", "mlx", "--quiet"]) == 0
    card = (run / "export" / "mlx" / "README.md").read_text()
    assert "| harmful refusal rate | substring | 25.0% | 90.0% |" in card


def test_force_never_deletes_other_files(tmp_path):
    from safesteer_mlx.errors import SafeSteerError
    from safesteer_mlx.export import run_export

    run, _ = make_run(tmp_path, "llama")
    mine = tmp_path / "my-models"
    mine.mkdir()
    (mine / "precious.bin").write_bytes(b"x")
    with pytest.raises(SafeSteerError, match="not a safesteer-mlx export"):
        run_export(run, "gguf", out=mine, force=True)
    assert (mine / "precious.bin").exists()
    with pytest.raises(SafeSteerError, match="give a directory"):
        run_export(run, "gguf", out=tmp_path / "model.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_export(run, "hf", out=empty, force=True)["path"] == str(empty)


def test_control_vector_without_loading_the_model(tmp_path):
    """config.toml's resolved_model is enough: the weights are not loaded (the model path here
    no longer exists)."""
    import json as _json

    import mlx.core as mx

    from safesteer_mlx.config import Config, to_toml
    from safesteer_mlx.export import run_export
    from safesteer_mlx.run import RunDir

    run = RunDir(tmp_path / "run").ensure()
    config = Config()
    config.model.name = str(tmp_path / "gone")
    summary = {"family": "qwen2", "num_layers": 24, "hidden_size": 8}
    run.config.write_text(to_toml({**config.to_dict(), "resolved_model": summary}))
    mx.save_safetensors(str(run.direction_tensors), {"direction": mx.ones((8,))})
    run.direction_json.write_text(_json.dumps({"layer": 12, "coefficient": 2.0}))
    result = run_export(run, "control-vector")
    assert result["llama_cpp_layer"] == 11
    card = (run.export_dir / "control-vector" / "README.md").read_text()
    assert "qwen2, 24 layers" in card and "--control-vector" in card
