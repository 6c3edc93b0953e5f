"""Load a chat model once, find its decoder layers, and switch it between base, steered teacher
and LoRA student with context managers — always the same weights (DESIGN.md, "One copy").
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from safesteer_mlx.errors import SafeSteerError

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_HUB_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]


@dataclass
class LoadedModel:
    """A model, its tokenizer, and where it came from."""

    model: nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    config: dict
    source: str  # what the user asked for
    path: Path  # the local file or directory actually loaded
    identity: str  # repo@revision or absolute path, plus a weights hash
    family: str
    quantized: bool
    chat: dict = field(default_factory=dict)  # chat quirks from the preset (system prompt, ...)
    adapter_path: str | None = None

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])


def parse_dtype(name: str | None) -> mx.Dtype | None:
    if name is None or name in ("auto", ""):
        return None
    if name not in _DTYPES:
        raise SafeSteerError(f"unknown dtype {name!r} (use one of: {', '.join(_DTYPES)})")
    return _DTYPES[name]


def _weights_hash(path: Path) -> str:
    """sha256 of the weights index (or a single file's size and head): a cheap identity."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(str(path.stat().st_size).encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
        return h.hexdigest()[:16]
    index = path / "model.safetensors.index.json"
    if index.exists():
        h.update(index.read_bytes())
    for wf in sorted(path.glob("model*.safetensors")):
        h.update(f"{wf.name}:{wf.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _download(repo: str, revision: str | None, tqdm_class=None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo, revision=revision, allow_patterns=_HUB_PATTERNS, tqdm_class=tqdm_class
            )
        )
    except LocalEntryNotFoundError:
        raise SafeSteerError(
            f"model {repo!r} is not in the local Hugging Face cache and the hub is unreachable "
            "or HF_HUB_OFFLINE is set (fix: connect and retry, or pass a local path)"
        ) from None
    except HfHubHTTPError as e:
        raise SafeSteerError(
            f"cannot download {repo!r} from the Hugging Face hub: {str(e).splitlines()[0]} "
            "(fix: check the repo id, or log in with `hf auth login` for gated models)"
        ) from None
    except OSError as e:
        raise SafeSteerError(
            f"cannot download {repo!r}: {e} (fix: check the network, or pass a local path)"
        ) from None


def _load_dir(path: Path, dtype: mx.Dtype | None) -> tuple[nn.Module, Any, dict]:
    from mlx_lm.utils import load_model, load_tokenizer

    if not (path / "config.json").exists():
        raise SafeSteerError(
            f"{path} has no config.json (give a Hugging Face/MLX model directory, a .gguf file, "
            "a preset name from `safesteer-mlx models`, or a hub repo id)"
        )
    if not list(path.glob("*.safetensors")):
        raise SafeSteerError(
            f"{path} has no .safetensors weights (only safetensors and GGUF are loaded, never "
            "pickles; convert with `mlx_lm.convert` first)"
        )
    try:
        model, config = load_model(path)
    except ValueError as e:
        raise SafeSteerError(f"cannot build the model in {path}: {e}") from None
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    if dtype is not None:
        _cast(model, dtype)
    return model, tokenizer, config


def _cast(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast floating-point parameters (quantized weights keep their integer storage)."""
    model.set_dtype(dtype, predicate=lambda t: mx.issubdtype(t, mx.floating))
    mx.eval(model.parameters())


def load_model(
    source: str,
    *,
    dtype: str | None = None,
    adapter_path: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load `source`: a preset short name, a local .gguf file, a local HF/MLX directory, or a hub
    repo id. `dtype` casts float weights (and dequantizes a GGUF); `adapter_path` fuses an mlx-lm
    LoRA adapter into the weights, so the result is the base model for SafeSteer."""
    from safesteer_mlx.models import resolve

    chat: dict = {}
    preset = resolve(source)
    target = source
    if preset is not None and not Path(source).exists():
        chat = dict(preset.chat)
        dtype = dtype or preset.defaults.get("dtype")
        local = preset.local_path()
        if local is None and preset.repo is None:
            raise SafeSteerError(
                f"preset {preset.name!r} is not installed (fix: {preset.install_hint()})"
            )
        target = str(local) if local is not None else preset.repo
    mx_dtype = parse_dtype(dtype)

    path = Path(target).expanduser()
    if path.suffix == ".gguf" or path.exists():
        if not path.exists():
            raise SafeSteerError(f"model file not found: {path} (give an existing path)")
        path = path.resolve()
        identity = str(path)
    elif "/" in target and not target.startswith((".", "/")) and target.count("/") == 1:
        path = _download(target, revision)
        identity = f"{target}@{revision or path.name}"
    else:
        raise SafeSteerError(
            f"unknown model {source!r} (give a preset from `safesteer-mlx models`, a local "
            "directory or .gguf file, or a Hugging Face repo id ORG/NAME)"
        )

    if path.is_file():
        if path.suffix != ".gguf":
            raise SafeSteerError(
                f"{path} is not a .gguf file or a model directory (only safetensors directories "
                "and GGUF files are loaded)"
            )
        from safesteer_mlx.gguf_import import load_gguf

        model, tokenizer, config = load_gguf(path, mx_dtype)
    else:
        model, tokenizer, config = _load_dir(path, mx_dtype)

    if adapter_path is not None:
        fuse_adapter(model, adapter_path)
    wire_memory()
    quantized = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        source=source,
        path=path,
        identity=f"{identity}#{_weights_hash(path)}",
        family=str(config.get("model_type", "unknown")),
        quantized=quantized,
        chat=chat,
        adapter_path=str(Path(adapter_path).resolve()) if adapter_path else None,
    )


def wire_memory() -> None:
    """On Metal, let MLX keep up to the recommended working set wired (resident), as mlx-lm
    does for large models: without it macOS may page weights out between the rollouts and
    the training passes. A no-op elsewhere."""
    if mx.metal.is_available():
        mx.set_wired_limit(mx.metal.device_info()["max_recommended_working_set_size"])


def load_configured(model_config) -> LoadedModel:
    """`load_model` with the [model] section of the config tree."""
    return load_model(
        model_config.name,
        dtype=model_config.dtype,
        adapter_path=model_config.adapter_path,
        revision=model_config.revision,
    )


def fuse_adapter(model: nn.Module, adapter_path: str | os.PathLike) -> None:
    """Apply an mlx-lm LoRA/DoRA adapter directory and fuse it into the weights."""
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import load_adapters

    adapter_path = Path(adapter_path)
    if not (adapter_path / "adapter_config.json").exists():
        raise SafeSteerError(
            f"no adapter_config.json in {adapter_path} (give an mlx-lm adapter directory)"
        )
    load_adapters(model, str(adapter_path))
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    mx.eval(model.parameters())
    model.eval()


def decoder_layers(model: nn.Module) -> list:
    """The model's list of decoder blocks (the same list object the model iterates)."""
    for owner in (model, getattr(model, "language_model", None)):
        inner = getattr(owner, "model", None)
        if inner is not None and isinstance(getattr(inner, "layers", None), list):
            return inner.layers
    layers = getattr(model, "layers", None)
    if isinstance(layers, list):
        return layers
    raise SafeSteerError(
        f"cannot find the decoder layers of {type(model).__name__} (unsupported architecture)"
    )


class _LayerWrapper(nn.Module):
    """A decoder block in a wrapper that reads every attribute the model reads from its blocks
    (e.g. `use_sliding`) from the block itself."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer" or "layer" not in self:
                raise
            return getattr(self["layer"], name)


class SteeredLayer(_LayerWrapper):
    """Adds `coef * direction` to the block's input hidden state at every position."""

    def __init__(self, layer: nn.Module, vector: mx.array):
        super().__init__(layer)
        self.vector = vector
        self.freeze(keys=["vector"], recurse=False)

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        return self.layer(x + self.vector.astype(x.dtype), *args, **kwargs)


@contextlib.contextmanager
def _wrapped(model: nn.Module, wrappers: dict[int, nn.Module]) -> Iterator[None]:
    layers = decoder_layers(model)
    originals = {i: layers[i] for i in wrappers}
    try:
        for i, w in wrappers.items():
            layers[i] = w
        yield
    finally:
        for i, layer in originals.items():
            layers[i] = layer


@contextlib.contextmanager
def steered(
    model: nn.Module, direction: mx.array, layer: int, coef: float = 1.0
) -> Iterator[nn.Module]:
    """Within the block, `model` is the steered teacher: `coef * direction` is added to the input
    of decoder block `layer` at every position (prompt, cached and generated tokens alike)."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise SafeSteerError(f"steering layer {layer} out of range (model has {len(layers)})")
    vector = (coef * direction.astype(mx.float32)).astype(mx.float32)
    with _wrapped(model, {layer: SteeredLayer(layers[layer], vector)}):
        yield model


class _CaptureLayer(_LayerWrapper):
    def __init__(self, layer: nn.Module, sink: list, index: int, select):
        super().__init__(layer)
        self._sink = sink
        self._index = index
        self._select = select

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        self._sink[self._index] = self._select(x)
        return self.layer(x, *args, **kwargs)


@contextlib.contextmanager
def capture_layer_inputs(model: nn.Module, select=lambda x: x) -> Iterator[list]:
    """Record `select(h)` for the input `h` of every decoder block (the residual stream) during
    calls in the block. MLX is lazy: evaluating only the captures skips the unused rest."""
    layers = decoder_layers(model)
    sink: list = [None] * len(layers)
    with _wrapped(model, {i: _CaptureLayer(lay, sink, i, select) for i, lay in enumerate(layers)}):
        yield sink


def _project_out(x: mx.array, unit: mx.array) -> mx.array:
    """x - (x . r̂) r̂ : remove the component along the unit direction r̂."""
    u = unit.astype(x.dtype)
    return x - (x @ u)[..., None] * u


class _AblatedOutput(nn.Module):
    def __init__(self, module: nn.Module, unit: mx.array):
        super().__init__()
        self.module = module
        self._unit = unit

    def __call__(self, *args, **kwargs):
        return _project_out(self.module(*args, **kwargs), self._unit)


class _AblatedLayer(_LayerWrapper):
    def __init__(self, layer: nn.Module, unit: mx.array):
        super().__init__(layer)
        self._unit = unit

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        return self.layer(_project_out(x, self._unit), *args, **kwargs)


@contextlib.contextmanager
def ablated(model: nn.Module, direction: mx.array) -> Iterator[nn.Module]:
    """Directional ablation (Arditi et al.): the direction is projected out of every block's input
    and of every attention and MLP output, so no block can read or write it."""
    unit = direction.astype(mx.float32)
    unit = unit / mx.linalg.norm(unit)
    layers = decoder_layers(model)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for block in layers:
            while isinstance(block, _LayerWrapper):  # inside steered()/capture: the real block
                block = block.layer
            for name in ("self_attn", "mlp"):
                sub = getattr(block, name, None)
                if isinstance(sub, nn.Module):
                    setattr(block, name, _AblatedOutput(sub, unit))
                    swapped.append((block, name, sub))
        with _wrapped(model, {i: _AblatedLayer(lay, unit) for i, lay in enumerate(layers)}):
            yield model
    finally:
        for block, name, sub in swapped:
            setattr(block, name, sub)


def last_logits(
    model: nn.Module, tokens: mx.array, lengths: mx.array, cache: list | None = None
) -> mx.array:
    """Logits at each sequence's last real token, for a right-padded batch [B, T].

    Right padding needs no attention mask: causal attention never lets a real token see the pads
    after it, and positions start at 0 for every row (or at the shared prefix's length when
    `cache` holds that prefix's keys and values)."""
    hidden = _inner(model)(tokens, cache=cache)
    last = mx.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    return lm_head(model, last)[:, 0, :].astype(mx.float32)


def common_prefix(seqs: list[list[int]]) -> list[int]:
    """The longest prefix every sequence shares, leaving each at least one token of its own."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return first[: max(n, 0)]


def prefix_kv(model: nn.Module, prefix: list[int]) -> list[tuple[mx.array, mx.array]] | None:
    """Keys and values of a shared prompt prefix (system prompt, template header), computed
    once under whatever steering/ablation is active; None when the model's cache is not a plain
    KV cache (e.g. sliding-window layers), where callers recompute the prefix."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    cache = make_prompt_cache(model)
    if len(prefix) < 2 or not all(type(c) is KVCache for c in cache):
        return None
    _inner(model)(mx.array([prefix]), cache=cache)
    kv = [(c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in cache]
    mx.eval(kv)
    return kv


def batch_cache(kv: list[tuple[mx.array, mx.array]], batch: int) -> list:
    """A fresh KV cache holding the shared prefix for every row of a batch."""
    from mlx_lm.models.cache import KVCache

    caches = []
    for k, v in kv:
        c = KVCache()
        c.keys, c.values = mx.repeat(k, batch, axis=0), mx.repeat(v, batch, axis=0)
        c.offset = k.shape[2]
        caches.append(c)
    return caches


def last_logits_batches(model: nn.Module, seqs: list[list[int]], batch_size: int):
    """Yield last-token logits [b, V] for each batch of `seqs`, computing the prompts' shared
    prefix once (a chat template's system prompt is often half of every prompt)."""
    prefix = common_prefix(seqs)
    kv = prefix_kv(model, prefix)
    skip = len(prefix) if kv is not None else 0
    for i in range(0, len(seqs), batch_size):
        batch = [s[skip:] for s in seqs[i : i + batch_size]]
        tokens, lengths = pad_right(batch)
        cache = batch_cache(kv, len(batch)) if kv is not None else None
        yield last_logits(model, tokens, lengths, cache)


def _inner(model: nn.Module) -> nn.Module:
    for owner in (model, getattr(model, "language_model", None)):
        inner = getattr(owner, "model", None)
        if inner is not None and isinstance(getattr(inner, "layers", None), list):
            return inner
    raise SafeSteerError(f"unsupported architecture {type(model).__name__}")


def forward_hidden(model: nn.Module, tokens: mx.array) -> mx.array:
    """Final-norm hidden states [B, T, D] (the lm_head is applied separately, so logits can be
    computed for only the positions that need them)."""
    return _inner(model)(tokens)


def lm_head(model: nn.Module, hidden: mx.array) -> mx.array:
    """Project hidden states to vocabulary logits the way the model's own __call__ does."""
    owner = getattr(model, "language_model", model)
    head = getattr(owner, "lm_head", None)
    if head is not None:
        logits = head(hidden)
    else:  # tied embeddings
        logits = _inner(model).embed_tokens.as_linear(hidden)
    cap = getattr(getattr(owner, "args", None), "final_logit_softcapping", None)
    if cap:
        logits = mx.tanh(logits / cap) * cap
    return logits


def vocab_size(model: nn.Module) -> int:
    """Rows of the output projection (may exceed the tokenizer's vocabulary: padded tables)."""
    owner = getattr(model, "language_model", model)
    head = getattr(owner, "lm_head", None)
    table = head if head is not None else _inner(model).embed_tokens
    return int(table.weight.shape[0])


def pad_right(sequences: list[list[int]], pad_id: int = 0) -> tuple[mx.array, mx.array]:
    """Right-pad token lists into [B, T] with their lengths."""
    width = max(len(s) for s in sequences)
    padded = [s + [pad_id] * (width - len(s)) for s in sequences]
    return mx.array(padded, dtype=mx.int32), mx.array([len(s) for s in sequences], dtype=mx.int32)


def model_summary(loaded: LoadedModel) -> dict:
    """What config.toml and the UI record about the loaded model."""
    return {
        "source": loaded.source,
        "identity": loaded.identity,
        "path": str(loaded.path),
        "family": loaded.family,
        "quantized": loaded.quantized,
        "num_layers": loaded.num_layers,
        "hidden_size": loaded.hidden_size,
        "adapter_path": loaded.adapter_path,
    }
