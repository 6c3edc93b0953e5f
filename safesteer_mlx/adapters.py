"""LoRA / DoRA / full fine-tuning on the one loaded model, through mlx-lm's own layers, and the
switch that turns the adapters off for teacher and base passes."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from safesteer_mlx.errors import SafeSteerError

# All linear maps of a decoder block (attention and MLP), as mlx-lm names them.
DEFAULT_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def adapter_config(
    fine_tune_type: str, num_layers: int, rank: int, scale: float, dropout: float, keys
) -> dict:
    """The adapter_config.json mlx-lm's `load(..., adapter_path=...)` reads."""
    return {
        "fine_tune_type": fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": rank,
            "scale": scale,
            "dropout": dropout,
            "keys": list(keys) if keys else None,
        },
    }


def attach(model: nn.Module, config: dict) -> None:
    """Freeze the model and make the adapters (or, for full fine-tuning, every weight outside
    embeddings and norms) the trainable parameters. On a quantized base, LoRA wraps the
    QuantizedLinear layers as they are: QLoRA."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    kind = config["fine_tune_type"]
    if kind not in ("lora", "dora", "full"):
        raise SafeSteerError(f"fine_tune_type {kind!r} (use lora, dora or full)")
    model.freeze()
    if kind == "full":
        if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise SafeSteerError(
                "full fine-tuning needs float weights; this base is quantized "
                "(use --fine-tune-type lora for QLoRA, or load with --dtype to dequantize)"
            )
        from safesteer_mlx.modeling import decoder_layers

        for layer in decoder_layers(model):
            layer.unfreeze()
            for _, m in layer.named_modules():
                if isinstance(m, (nn.RMSNorm, nn.LayerNorm)):
                    m.freeze()
        return
    params = dict(config["lora_parameters"])
    keys = params.get("keys")
    if keys:
        present = {name for layer in _layers(model) for name, _ in layer.named_modules()}
        missing = [k for k in keys if k not in present]
        if missing:
            raise SafeSteerError(
                f"LoRA keys {missing} are not in this model's blocks "
                f"(examples of names: {sorted(present)[:8]})"
            )
    linear_to_lora_layers(model, config["num_layers"], params, use_dora=(kind == "dora"))


def _layers(model: nn.Module) -> list:
    from safesteer_mlx.modeling import decoder_layers

    return decoder_layers(model)


def _adapter_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, adapter layer) for every LoRA/DoRA layer."""
    found = []

    def visit(parent: nn.Module):
        for name, child in parent.children().items():
            items = child if isinstance(child, list) else [child]
            for i, c in enumerate(items):
                if not isinstance(c, nn.Module):
                    continue
                if hasattr(c, "lora_a") and hasattr(c, "linear"):
                    found.append((parent, name if not isinstance(child, list) else (name, i), c))
                else:
                    visit(c)

    visit(model)
    return found


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every LoRA/DoRA layer is replaced by the layer it wraps: the base
    weights, bit for bit. (Full fine-tuning has no separate base: see `FrozenBase`.)"""
    swapped = _adapter_modules(model)
    try:
        for parent, name, adapter in swapped:
            _set(parent, name, adapter.linear)
        yield model
    finally:
        for parent, name, adapter in swapped:
            _set(parent, name, adapter)


def _set(parent: nn.Module, name, module: nn.Module) -> None:
    if isinstance(name, tuple):
        getattr(parent, name[0])[name[1]] = module
    else:
        setattr(parent, name, module)


class FrozenBase:
    """For full fine-tuning: a copy of the trainable weights as they were, swapped in for
    teacher/base passes (costs one extra copy of those weights)."""

    def __init__(self, model: nn.Module):
        self.weights = [(k, mx.array(v)) for k, v in tree_flatten(model.trainable_parameters())]
        mx.eval([v for _, v in self.weights])

    @contextlib.contextmanager
    def active(self, model: nn.Module) -> Iterator[nn.Module]:
        current = [(k, v) for k, v in tree_flatten(model.trainable_parameters())]
        model.update(tree_unflatten(self.weights))
        try:
            yield model
        finally:
            model.update(tree_unflatten(current))


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(path: Path, model: nn.Module, config: dict) -> None:
    """Write adapters.safetensors + adapter_config.json into `path`, each atomically."""
    from safesteer_mlx.run import atomic_path, atomic_write_json

    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "adapters.safetensors") as tmp:
        mx.save_safetensors(str(tmp), trainable_weights(model))
    atomic_write_json(path / "adapter_config.json", config)


def read_adapter_config(path: Path) -> dict:
    try:
        return json.loads((path / "adapter_config.json").read_text())
    except FileNotFoundError:
        raise SafeSteerError(
            f"no adapter_config.json in {path} (give the adapters/ directory of a distilled run)"
        ) from None


def remove_adapters(model: nn.Module) -> None:
    """Replace every LoRA/DoRA layer by the layer it wraps, for good: the base model again
    (e.g. for evaluation after distillation trained adapters on the loaded model)."""
    for parent, name, adapter in _adapter_modules(model):
        _set(parent, name, adapter.linear)
