"""Fuse a run's adapters into the base weights, for export.

A quantized base is dequantized one layer at a time in float32, fused in float32 with mlx-lm's
own `fuse()` (LoRA: W' = W + s * B^T A^T; DoRA: the same, rows rescaled to the learned
magnitudes m / ||W'||), and cast to the requested dtype at once, so peak memory is the base plus
the output, never a float32 copy of the whole model. Neither the run's files nor the model's
attached adapters are changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from safesteer_mlx.errors import SafeSteerError


def _dequantized(layer: nn.QuantizedLinear) -> nn.Linear:
    """A float32 nn.Linear with the quantized layer's weights (scales upcast first: float16
    scale * q + bias would round every weight)."""
    biases = getattr(layer, "biases", None)
    w = mx.dequantize(
        layer.weight,
        layer.scales.astype(mx.float32),
        None if biases is None else biases.astype(mx.float32),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=getattr(layer, "mode", "affine"),
    )
    out = nn.Linear(w.shape[1], w.shape[0], bias="bias" in layer)
    out.weight = w
    if "bias" in layer:
        out.bias = layer.bias.astype(mx.float32)
    return out


def _float32_linear(layer: nn.Module) -> nn.Linear:
    if isinstance(layer, nn.QuantizedLinear):
        return _dequantized(layer)
    out = nn.Linear(layer.weight.shape[1], layer.weight.shape[0], bias="bias" in layer)
    out.weight = layer.weight.astype(mx.float32)
    if "bias" in layer:
        out.bias = layer.bias.astype(mx.float32)
    return out


def _fuse_float32(adapter: nn.Module) -> nn.Module:
    """mlx-lm's own `fuse()` of a LoRA/DoRA layer, over a float32 copy of the layer it wraps."""
    if not hasattr(adapter, "linear"):  # e.g. LoRA on an embedding: mlx-lm's fuse as it is
        return adapter.fuse(dequantize=True)
    base = adapter.linear
    adapter.linear = _float32_linear(base)
    try:
        return adapter.fuse(dequantize=True)
    finally:
        adapter.linear = base


def _module_weights(module: nn.Module, prefix: str, out: dict, dtype: mx.Dtype) -> None:
    """Float weights of `module` and its children, LoRA/DoRA fused, quantized layers expanded."""
    if hasattr(module, "lora_a") and hasattr(module, "fuse"):
        module = _fuse_float32(module)
    elif isinstance(module, nn.QuantizedLinear):
        module = _dequantized(module)
    elif isinstance(module, nn.QuantizedEmbedding):
        w = mx.dequantize(
            module.weight,
            module.scales.astype(mx.float32),
            None if module.biases is None else module.biases.astype(mx.float32),
            group_size=module.group_size,
            bits=module.bits,
            mode=getattr(module, "mode", "affine"),
        )
        out[f"{prefix}weight"] = w.astype(dtype)
        mx.eval(out[f"{prefix}weight"])
        return
    for key, value in module.items():
        if key.startswith("_"):
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            name = f"{prefix}{key}." + (f"{i}." if isinstance(value, list) else "")
            if isinstance(item, nn.Module):
                _module_weights(item, name, out, dtype)
            elif isinstance(item, mx.array) and not isinstance(value, list):
                out[f"{prefix}{key}"] = item.astype(dtype)
                mx.eval(out[f"{prefix}{key}"])


@contextlib.contextmanager
def _adapters_on(model: nn.Module, adapter_dir: Path | None) -> Iterator[dict]:
    """Within the block the model carries the run's adapters, freshly read from `adapter_dir`
    (any adapters already attached, e.g. by a distill run in this process, are set aside), and
    the dict holds full fine-tuning weights that replace base weights. Restored on exit."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from safesteer_mlx.adapters import (
        _adapter_modules,
        _set,
        adapters_disabled,
        read_adapter_config,
    )

    overlay: dict = {}
    with adapters_disabled(model):
        if adapter_dir is None:
            yield overlay
            return
        config = read_adapter_config(adapter_dir)
        weights = mx.load(str(adapter_dir / "adapters.safetensors"))
        kind = config.get("fine_tune_type", "lora")
        if kind == "full":
            yield weights
            return
        linear_to_lora_layers(
            model, config["num_layers"], config["lora_parameters"], use_dora=(kind == "dora")
        )
        attached = _adapter_modules(model)
        try:
            names = {k for k, _ in tree_flatten(model.parameters())}
            unknown = sorted(set(weights) - names)
            if unknown:
                raise SafeSteerError(
                    f"{adapter_dir}/adapters.safetensors has weights this model lacks "
                    f"({unknown[:3]}...): the adapters belong to another base model"
                )
            model.load_weights(list(weights.items()), strict=False)
            yield overlay
        finally:
            for parent, name, adapter in attached:
                _set(parent, name, adapter.linear)


def fused_weights(
    model: nn.Module, adapter_dir: Path | None, dtype: mx.Dtype = mx.float16
) -> dict[str, mx.array]:
    """The model's weights with the adapters in `adapter_dir` fused in, dequantized, in `dtype`
    (names as mlx-lm and Hugging Face checkpoints use them)."""
    out: dict[str, mx.array] = {}
    with _adapters_on(model, adapter_dir) as overlay:
        _module_weights(model, "", out, dtype)
        for name, w in overlay.items():
            if name not in out:
                raise SafeSteerError(f"full fine-tuning weight {name} is not in the base model")
            out[name] = w.astype(dtype)
    return out
