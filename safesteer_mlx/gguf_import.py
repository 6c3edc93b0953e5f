"""Import a llama-architecture GGUF file as an mlx-lm model and tokenizer.

`mx.load` reads GGUF natively: F32/F16 tensors as they are, Q4_0/Q4_1/Q8_0 as MLX affine
quantized triples (weight, scales, biases; group size 32). What it does not do is undo
llama.cpp's conventions, which this module does:

- tensor names (`blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`);
- the Q/K row permutation llama.cpp's converter applies for its interleaved RoPE
  (we restore the Hugging Face half-split layout, so adapters and exports match HF checkpoints);
- the config, from `llama.*` metadata keys;
- the tokenizer and chat template, from `tokenizer.ggml.*` metadata, rebuilt with the
  `tokenizers` library through transformers' GGUF tokenizer converters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from safesteer_mlx.errors import SafeSteerError

SUPPORTED_ARCHITECTURES = ("llama",)
QUANT_GROUP_SIZE = 32  # GGUF's Q4_0/Q4_1/Q8_0 block size, as mx.load returns them

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def _scalar(meta: dict, key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if isinstance(value, mx.array):
        return value.item()
    return value


def _hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None when skipped."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, index, kind = stem.split(".", 2)
        if kind not in _LAYER_NAMES:
            return None
        return f"model.layers.{index}.{_LAYER_NAMES[kind]}.{suffix}"
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    return None  # e.g. rope_freqs: recomputed from the config


def _unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Invert llama.cpp's `permute`: rows (head, pair, half) -> (head, half, pair).

    Works on quantized triples too: it only moves whole output rows.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(meta: dict) -> dict:
    """An mlx-lm / Hugging Face style config dict from GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise SafeSteerError(
            f"GGUF architecture {arch!r} is not supported for import "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}; "
            "use the model's Hugging Face/MLX repo instead)"
        )
    n_heads = int(_scalar(meta, f"{arch}.attention.head_count"))
    hidden = int(_scalar(meta, f"{arch}.embedding_length"))
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(meta, f"{arch}.block_count")),
        "intermediate_size": int(_scalar(meta, f"{arch}.feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_scalar(meta, f"{arch}.attention.head_count_kv", n_heads)),
        "rms_norm_eps": float(_scalar(meta, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_scalar(meta, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_scalar(meta, f"{arch}.context_length", 4096)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "head_dim": int(
            _scalar(
                meta,
                f"{arch}.attention.key_length",
                _scalar(meta, f"{arch}.rope.dimension_count", hidden // n_heads),
            )
        ),
    }
    scaling_factor = _scalar(meta, f"{arch}.rope.scaling.factor")
    if scaling_factor:
        config["rope_scaling"] = {
            "type": _scalar(meta, f"{arch}.rope.scaling.type", "linear"),
            "factor": float(scaling_factor),
        }
    return config


def _weights(raw: dict[str, mx.array], config: dict, dtype: mx.Dtype | None) -> dict:
    """Rename, unpermute Q/K, and dequantize (when `dtype` is given)."""
    out: dict[str, mx.array] = {}
    quantized = {name.rpartition(".")[0] for name in raw if name.endswith(".scales")}
    for stem in sorted({name.rpartition(".")[0] for name in raw}):
        target = _hf_name(stem + ".weight")
        if target is None:
            continue
        target_stem = target.rpartition(".")[0]
        heads = None
        if stem.endswith("attn_q"):
            heads = config["num_attention_heads"]
        elif stem.endswith("attn_k"):
            heads = config["num_key_value_heads"]
        parts = ("weight", "scales", "biases") if stem in quantized else ("weight", "bias")
        tensors = {p: raw[f"{stem}.{p}"] for p in parts if f"{stem}.{p}" in raw}
        if stem in quantized:
            bits = (
                32 * tensors["weight"].shape[1] // (tensors["scales"].shape[1] * QUANT_GROUP_SIZE)
            )
            tensors["bits"] = bits
        if heads is not None:
            tensors = {
                k: _unpermute_rows(v, heads) if isinstance(v, mx.array) else v
                for k, v in tensors.items()
            }
        if stem in quantized and dtype is not None:
            # Dequantize in float32: GGUF's scales are float16, and scale * q + bias computed in
            # float16 would round every weight (5e-2 logit error on SmolLM2 vs transformers).
            biases = tensors.get("biases")
            w = mx.dequantize(
                tensors["weight"],
                tensors["scales"].astype(mx.float32),
                None if biases is None else biases.astype(mx.float32),
                group_size=QUANT_GROUP_SIZE,
                bits=tensors["bits"],
            )
            out[f"{target_stem}.weight"] = w.astype(dtype)
            continue
        for part, value in tensors.items():
            if part == "bits":
                continue
            if dtype is not None and value.dtype in (mx.float16, mx.bfloat16, mx.float32):
                value = value.astype(dtype)
            out[f"{target_stem}.{part}"] = value
    return out


def _quantization(raw: dict[str, mx.array]) -> dict | None:
    """The per-layer quantization mlx-lm needs to rebuild QuantizedLinear layers, or None."""
    per_layer: dict[str, Any] = {}
    bits_seen = set()
    for name, scales in raw.items():
        if not name.endswith(".scales"):
            continue
        stem = name.rpartition(".")[0]
        target = _hf_name(stem + ".weight")
        if target is None:
            continue
        w = raw[stem + ".weight"]
        bits = 32 * w.shape[1] // (scales.shape[1] * QUANT_GROUP_SIZE)
        bits_seen.add(bits)
        per_layer[target.rpartition(".")[0]] = {"group_size": QUANT_GROUP_SIZE, "bits": bits}
    if not per_layer:
        return None
    return {"group_size": QUANT_GROUP_SIZE, "bits": max(bits_seen), **per_layer}


def _tokenizer_dict(meta: dict) -> dict:
    def arr(key: str) -> list | None:
        value = meta.get(key)
        if value is None:
            return None
        if isinstance(value, mx.array):
            return np.array(value).tolist()
        return list(value)

    d = {
        "tokenizer_type": meta.get("tokenizer.ggml.model"),
        "pre_tokenizer_type": meta.get("tokenizer.ggml.pre"),
        "tokens": arr("tokenizer.ggml.tokens"),
        "scores": arr("tokenizer.ggml.scores"),
        "token_type": arr("tokenizer.ggml.token_type"),
        "merges": arr("tokenizer.ggml.merges"),
        "bos_token_id": _scalar(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _scalar(meta, "tokenizer.ggml.eos_token_id"),
        "unk_token_id": _scalar(meta, "tokenizer.ggml.unknown_token_id"),
        "pad_token_id": _scalar(meta, "tokenizer.ggml.padding_token_id"),
        "add_prefix_space": _scalar(meta, "tokenizer.ggml.add_space_prefix"),
    }
    return {k: v for k, v in d.items() if v is not None}


def gguf_tokenizer(meta: dict):
    """A `PreTrainedTokenizerFast` (vocabulary, merges, specials, chat template) from the
    GGUF metadata."""
    try:  # transformers >= 5: the converters moved into integrations.gguf
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:  # transformers 4.x
        from transformers.integrations.ggml import convert_gguf_tokenizer
    from transformers import PreTrainedTokenizerFast

    td = _tokenizer_dict(meta)
    backend, _ = convert_gguf_tokenizer(meta.get("general.architecture", "llama"), td)
    tokens = td["tokens"]

    def token(key: str) -> str | None:
        index = td.get(key)
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unk_token_id"),
        pad_token=token("pad_token_id"),
    )
    template = meta.get("tokenizer.chat_template")
    if template:
        tok.chat_template = template
    return tok


def load_gguf(path: str | Path, dtype: mx.Dtype | None = None) -> tuple[nn.Module, Any, dict]:
    """Load a llama-architecture GGUF as (mlx-lm model, TokenizerWrapper, config).

    `dtype=None` keeps quantized tensors quantized (QuantizedLinear, for QLoRA);
    a float dtype dequantizes every tensor to it.
    """
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from mlx_lm.utils import _get_classes

    path = Path(path)
    try:
        raw, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError with the parser's words
        raise SafeSteerError(
            f"cannot read GGUF file {path}: {e} (is it a complete .gguf file?)"
        ) from None
    config = gguf_config(meta)
    if "rope_freqs.weight" in raw:
        raise SafeSteerError(
            f"{path.name} uses Llama-3.1-style RoPE frequency factors (rope_freqs), which the GGUF "
            "import does not support yet (use the hub preset, e.g. --model llama-3.1-8b)"
        )
    weights = _weights(raw, config, dtype)
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    quant = None if dtype is not None else _quantization(raw)
    if quant is not None:
        config["quantization"] = quant

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if quant is not None:
        nn.quantize(
            model,
            group_size=QUANT_GROUP_SIZE,
            bits=quant["bits"],
            class_predicate=lambda p, m: quant.get(p, False),
        )
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()

    hf_tokenizer = gguf_tokenizer(meta)
    eos_ids = {i for i in (_scalar(meta, "tokenizer.ggml.eos_token_id"),) if i is not None}
    # Chat models end their turn with a marker that is often not the GGUF's eos token.
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        marker_id = hf_tokenizer.convert_tokens_to_ids(marker)
        if isinstance(marker_id, int) and marker_id != hf_tokenizer.unk_token_id:
            eos_ids.add(marker_id)
    detok = BPEStreamingDetokenizer if meta.get("tokenizer.ggml.model") == "gpt2" else None
    kwargs = {"detokenizer_class": detok} if detok else {}
    tokenizer = TokenizerWrapper(hf_tokenizer, eos_token_ids=sorted(eos_ids), **kwargs)
    config["eos_token_id"] = sorted(eos_ids)
    return model, tokenizer, config
