"""Export an aligned run where users run models: fuse the adapters into the base weights and write
a Hugging Face directory, an MLX directory (optionally re-quantized), a llama.cpp GGUF, or the
steering direction as a llama.cpp control vector, each with a model card.

Fusing (fusing.py) never touches the run's files or leaves adapters on the loaded model; a
quantized base is dequantized in float32 before fusing.

Everything is written into a temporary directory beside the output and renamed into place when
complete: a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.fusing import fused_weights
from safesteer_mlx.modeling import parse_dtype
from safesteer_mlx.progress import Reporter
from safesteer_mlx.run import input_hash

FORMATS = ("hf", "mlx", "gguf", "control-vector")
SHARD_BYTES = 4 << 30  # safetensors shards of at most 4 GiB (hub- and filesystem-friendly)
_QUANT_KEYS = ("quantization", "quantization_config")
# transformers' class per family, for configs that lack "architectures" (e.g. read from a GGUF).
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def export_config(config: dict, dtype: str) -> dict:
    """config.json for a float checkpoint: no MLX/HF quantization keys, the dtype recorded."""
    out = {k: v for k, v in config.items() if k not in _QUANT_KEYS}
    family = out.get("model_type", "")
    if "architectures" not in out and family in _ARCHITECTURES:
        out["architectures"] = [_ARCHITECTURES[family]]
    out["torch_dtype"] = dtype
    return out


def save_safetensors_shards(weights: dict[str, mx.array], path: Path, fmt: str) -> int:
    """`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`; returns bytes."""
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes
    index: dict[str, Any] = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())}}
    index["weight_map"] = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(path / fname), shard, metadata={"format": fmt})
        index["weight_map"].update({name: fname for name in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return index["metadata"]["total_size"]


def save_tokenizer(tokenizer, path: Path) -> None:
    """Tokenizer files, chat template and generation config as transformers writes them."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    hf.save_pretrained(str(path))
    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or {hf.eos_token_id} - {None})
    gen = {"bos_token_id": hf.bos_token_id, "eos_token_id": eos, "pad_token_id": hf.pad_token_id}
    (path / "generation_config.json").write_text(
        json.dumps({k: v for k, v in gen.items() if v not in (None, [])}, indent=2)
    )


def _write_hf(weights, config: dict, tokenizer, path: Path, dtype: str) -> None:
    save_safetensors_shards(weights, path, "pt")
    (path / "config.json").write_text(json.dumps(export_config(config, dtype), indent=2))
    save_tokenizer(tokenizer, path)


def _write_mlx(
    weights, config: dict, tokenizer, path: Path, dtype: str, q_bits: int | None, group: int
) -> None:
    config = export_config(config, dtype)
    if q_bits is not None:
        from mlx.utils import tree_flatten
        from mlx_lm.utils import _get_classes

        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
        if hasattr(model, "sanitize"):
            weights = model.sanitize(dict(weights))
        model.load_weights(list(weights.items()), strict=True)
        nn.quantize(
            model,
            group_size=group,
            bits=q_bits,
            class_predicate=lambda p, m: (
                hasattr(m, "to_quantized") and m.weight.shape[-1] % group == 0
            ),
        )
        weights = dict(tree_flatten(model.parameters()))
        config["quantization"] = {"group_size": group, "bits": q_bits}
    save_safetensors_shards(weights, path, "mlx")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer(tokenizer, path)


# ----------------------------------------------------------------------------- the stage


# Written into every export; --force replaces only directories that carry it (or empty ones).
MARKER = ".safesteer-export"


def _check_target(out: Path, force: bool) -> None:
    """An existing output is replaced only with --force, and only when it is an earlier export
    (it carries MARKER) or empty: --force never deletes a user's other files."""
    if not out.exists():
        return
    if not force:
        raise SafeSteerError(f"{out} exists (pass --force to replace it, or choose --out)")
    if not out.is_dir() or not ((out / MARKER).is_file() or not any(out.iterdir())):
        raise SafeSteerError(
            f"{out} is not a safesteer-mlx export; --force replaces only earlier exports "
            "(choose another --out)"
        )


@contextlib.contextmanager
def _staging(out: Path, force: bool, fmt: str) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed onto it on success, removed on failure. An
    earlier export is moved aside first and deleted only once the new one is in place."""
    _check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = tmp.with_suffix(".old")
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"format": fmt}) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _resolved_model(run) -> dict | None:
    """What config.toml records about the run's model (family, layers): enough for a control
    vector, so the weights need not be loaded."""
    from safesteer_mlx.config import tomllib

    try:
        data = tomllib.loads(run.config.read_text(encoding="utf-8")).get("resolved_model")
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and {"family", "num_layers"} <= set(data)
    return data if ok else None


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _check_args(
    fmt: str, dtype: str, q_bits: int | None, group: int, gguf_type: str | None, repo: str | None
) -> None:
    if repo is not None and (repo.count("/") != 1 or not all(repo.split("/"))):
        raise SafeSteerError(f"--upload-repo {repo!r}: give ORG/NAME")
    if fmt not in FORMATS:
        raise SafeSteerError(f"unknown export format {fmt!r} (use one of: {', '.join(FORMATS)})")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise SafeSteerError(f"--dtype {dtype!r}: use float16, bfloat16 or float32")
    if q_bits is not None:
        if fmt != "mlx":
            raise SafeSteerError("--q-bits re-quantizes MLX exports only (use --format mlx)")
        if q_bits not in (4, 8) or group not in (32, 64, 128):
            raise SafeSteerError(
                f"--q-bits {q_bits} --q-group-size {group}: use 4 or 8 bits, group 32/64/128"
            )
    if gguf_type is not None and fmt != "gguf":
        raise SafeSteerError("--gguf-type applies to --format gguf only")


def run_export(
    run,
    fmt: str,
    *,
    out: str | os.PathLike | None = None,
    dtype: str = "float16",
    q_bits: int | None = None,
    q_group_size: int = 64,
    force: bool = False,
    progress=None,
    loaded=None,
    upload_repo: str | None = None,
    gguf_type: str | None = None,
) -> dict:
    """Export run `run` (a RunDir) as `fmt` to `out` (default `run.export_dir / fmt`).

    `loaded` reuses a model already in memory (the base of the run, e.g. after `align`);
    otherwise the run's [model] section is loaded. Returns path, format, dtype, bytes, seconds.
    """
    from safesteer_mlx.config import load_config
    from safesteer_mlx.model_card import write_model_card

    rep = Reporter("export", progress)
    _check_args(fmt, dtype, q_bits, q_group_size, gguf_type, upload_repo)
    if not run.config.exists():
        raise SafeSteerError(
            f"{run.path} has no config.toml (give the --run-dir of a safesteer-mlx run)"
        )
    config = load_config(run.config)
    target_dir = Path(out) if out is not None else run.export_dir / fmt
    if target_dir.suffix == ".gguf":
        raise SafeSteerError(
            f"--out {target_dir}: give a directory (the export holds the .gguf and its README.md)"
        )
    out_path = target_dir / {"gguf": "model.gguf", "control-vector": "control_vector.gguf"}.get(
        fmt, ""
    )
    if fmt == "control-vector" and not run.direction_tensors.exists():
        raise SafeSteerError(f"{run.path} has no direction.safetensors (run `direction` first)")
    if fmt in ("hf", "mlx", "gguf") and not run.adapters.exists():
        rep.warn(f"{run.adapters} is absent: exporting the base model without adapters")
    _check_target(target_dir, force)

    t0 = time.perf_counter()
    inputs = input_hash(fmt, dtype, q_bits, q_group_size, gguf_type, str(out_path))
    rep.start(f"export {fmt} to {target_dir}")
    summary = _resolved_model(run) if fmt == "control-vector" and loaded is None else None
    if loaded is None and summary is None:
        from safesteer_mlx.modeling import load_configured

        rep.log(f"loading {config.model.name}")
        loaded = load_configured(config.model)

    if summary is None:
        summary = {
            "family": loaded.family,
            "num_layers": loaded.num_layers,
            "hidden_size": loaded.hidden_size,
        }
    from safesteer_mlx import gguf_export

    if fmt == "gguf":
        gguf_export.check_supported(loaded.config)  # before anything is written
    with run.stage_run("export", inputs) as stats:
        with _staging(target_dir, force, fmt) as tmp:
            if fmt == "control-vector":
                info = gguf_export.write_control_vector(run, summary, tmp / out_path.name)
            else:
                adapters = run.adapters if run.adapters.exists() else None
                rep.log("fusing adapters" if adapters else "collecting weights")
                weights = fused_weights(loaded.model, adapters, parse_dtype(dtype))
                rep.log(f"writing {fmt}")
                if fmt == "hf":
                    _write_hf(weights, loaded.config, loaded.tokenizer, tmp, dtype)
                    info = {}
                elif fmt == "mlx":
                    _write_mlx(
                        weights, loaded.config, loaded.tokenizer, tmp, dtype, q_bits, q_group_size
                    )
                    info = {"q_bits": q_bits, "q_group_size": q_group_size if q_bits else None}
                else:
                    gtype = gguf_type or gguf_export.DTYPE_TO_GGUF[dtype]
                    info = gguf_export.write_gguf(
                        weights, loaded, tmp / out_path.name, gtype, name=run.path.name
                    )
                del weights
            write_model_card(
                tmp / "README.md",
                run,
                config,
                summary,
                fmt,
                dtype,
                info,
                where=str(out_path),
                repo=upload_repo,
            )
            size = _dir_bytes(tmp)
        stats.update(format=fmt, path=str(out_path), bytes=size)
    result = {
        "path": str(out_path),
        "format": fmt,
        "dtype": dtype,
        "bytes": size,
        "seconds": round(time.perf_counter() - t0, 3),
        **info,
    }
    if upload_repo:
        result["url"] = upload(target_dir, upload_repo, rep)
    rep.result(f"wrote {out_path} ({size / 1e6:.1f} MB in {result['seconds']:.1f}s)", **result)
    return result


def upload(path: Path, repo: str, rep: Reporter) -> str:
    """Push the export to the hub; the token comes only from the environment (HF_TOKEN) or the
    user's huggingface-hub login, and is never written anywhere."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=os.environ.get("HF_TOKEN"))
    rep.log(f"uploading {path} to {repo}")
    try:
        api.create_repo(repo, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(path), repo_id=repo, ignore_patterns=[MARKER]
        )
    except HfHubHTTPError as e:
        raise SafeSteerError(
            f"upload to {repo} failed: {str(e).splitlines()[0]} "
            f"(set HF_TOKEN or run `hf auth login`; the export stays at {path})"
        ) from None
    return str(getattr(commit, "commit_url", f"https://huggingface.co/{repo}"))
