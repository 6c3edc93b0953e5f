"""Write fused weights as a llama.cpp GGUF with gguf-py (llama.cpp's own writer), and the steering
direction as a llama.cpp control vector.

What llama.cpp expects, per family (as its convert_hf_to_gguf.py writes them):

- tensor names `token_embd`, `blk.N.attn_q`, ... (`_TENSOR_NAMES`); tied embeddings: no `output`;
- llama/mistral: Q and K rows permuted for llama.cpp's interleaved RoPE (`permute_rows`; the
  inverse of `gguf_import._unpermute_rows`); qwen2/qwen3/gemma use the half-split RoPE as stored;
- gemma2/gemma3: every `*norm.weight` stored as 1 + w (Hugging Face and MLX multiply by 1 + w,
  llama.cpp by the stored weight); the sqrt(hidden) embedding scale is applied by llama.cpp
  itself, as by MLX and transformers, so the embedding is written as is;
- qwen3/gemma3 q_norm/k_norm as `attn_q_norm`/`attn_k_norm`;
- the tokenizer: byte-level BPE as `gpt2` (tokens, types, merges, `tokenizer.ggml.pre`), or
  SentencePiece-style BPE with byte fallback as `llama` (tokens, scores, types), with the special
  token ids and `tokenizer.chat_template`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from safesteer_mlx.errors import SafeSteerError

# Hugging Face model_type -> GGUF architecture.
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",  # llama.cpp runs Mistral as llama (convert_hf_to_gguf does the same)
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",  # Gemma 3 1B; the multimodal "gemma3" (4B+) nests the text model
}
_PERMUTED = ("llama",)  # GGUF archs whose Q/K rows llama.cpp expects interleaved
_GEMMA = ("gemma2", "gemma3")
DTYPE_TO_GGUF = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")

_TENSOR_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# post_attention_layernorm is the FFN's input norm in llama/qwen, an output norm in gemma.
_NORMS = {
    "default": {"post_attention_layernorm": "ffn_norm"},
    "gemma": {
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    },
}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _supported_list() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def check_supported(config: dict) -> str:
    """The GGUF architecture for this config, or a SafeSteerError naming the families that work
    (raised before anything is written)."""
    family = config.get("model_type")
    arch = ARCHITECTURES.get(family)
    if arch is None:
        raise SafeSteerError(
            f"GGUF export does not support model family {family!r} "
            f"(supported: {_supported_list()}; use --format hf or mlx for this model)"
        )
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "default", "linear"):
        raise SafeSteerError(
            f"GGUF export does not support rope_scaling type {kind!r} yet (linear only; "
            "use --format hf and llama.cpp's convert_hf_to_gguf.py for this model)"
        )
    return arch


def gguf_name(name: str, arch: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`."""
    stem, _, suffix = name.rpartition(".")
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.{suffix}"
    parts = stem.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 3:
        kind = ".".join(parts[3:])
        norms = _NORMS["gemma" if arch in _GEMMA else "default"]
        target = _TENSOR_NAMES.get(kind) or norms.get(kind)
        if target is not None:
            return f"blk.{parts[2]}.{target}.{suffix}"
    raise SafeSteerError(f"tensor {name} has no GGUF name for architecture {arch}")


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face's half-split RoPE rows (head, half, pair) -> llama.cpp's interleaved
    (head, pair, half), as convert_hf_to_gguf's `permute`."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tensor_data(name: str, w: mx.array, arch: str, config: dict) -> np.ndarray:
    data = np.array(w.astype(mx.float32))
    if arch in _PERMUTED and w.ndim >= 1:
        if ".self_attn.q_proj." in name:
            data = permute_rows(data, config["num_attention_heads"])
        elif ".self_attn.k_proj." in name:
            heads = config.get("num_key_value_heads") or config["num_attention_heads"]
            data = permute_rows(data, heads)
    if arch in _GEMMA and name.endswith("norm.weight"):
        data = data + 1.0
    return data


def _quantize(gguf, data: np.ndarray, gtype: str):
    """(array, raw_dtype) for one tensor: 1-D tensors stay F32 (as llama.cpp's converter keeps
    norms and biases); Q8_0 needs rows divisible by its block of 32 (else F16)."""
    q = gguf.GGMLQuantizationType
    if data.ndim == 1 or gtype == "f32":
        return data.astype(np.float32), q.F32
    if gtype == "f16" or (gtype == "q8_0" and data.shape[-1] % 32):
        return data.astype(np.float16), q.F16
    qtype = q.BF16 if gtype == "bf16" else q.Q8_0
    return gguf.quants.quantize(data, qtype), qtype


def _layout(gguf, shape: tuple, gtype: str) -> tuple:
    """(stored shape, numpy dtype, bytes, GGML type) of a tensor of `shape` once converted,
    from one converted row."""
    row = np.zeros(shape[-1:], dtype=np.float32) if len(shape) == 1 else np.zeros((1, shape[-1]))
    probe, raw_dtype = _quantize(gguf, row.astype(np.float32), gtype)
    if len(shape) == 1:
        return shape, probe.dtype, probe.nbytes, raw_dtype
    rows = int(np.prod(shape[:-1]))
    return (*shape[:-1], probe.shape[-1]), probe.dtype, probe.nbytes * rows, raw_dtype


def _hparams(writer, config: dict, arch: str) -> None:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping") or 50.0))
        writer.add_final_logit_softcapping(float(config.get("final_logit_softcapping") or 30.0))
    if arch in _GEMMA and config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
    if arch == "gemma3" and (
        config.get("sliding_window_pattern", 6) != 6
        or config.get("rope_local_base_freq", 10000.0) != 10000.0
    ):
        raise SafeSteerError(
            "llama.cpp runs Gemma 3 with every 6th layer global and local RoPE base 10000; "
            "this config differs (use --format hf for this model)"
        )
    if arch in _GEMMA:
        scalar = config.get("query_pre_attn_scalar")
        if scalar is not None and int(scalar) != head_dim:
            # llama.cpp scales queries by 1/sqrt(head_dim) for these sizes
            raise SafeSteerError(
                f"query_pre_attn_scalar {scalar} != head_dim {head_dim}: llama.cpp would "
                "attend with a different scale (use --format hf for this model)"
            )


def _source_pre(loaded) -> str | None:
    """`tokenizer.ggml.pre` of a GGUF base, which names its pre-tokenizer exactly."""
    if Path(loaded.path).suffix != ".gguf":
        return None
    import gguf

    field = gguf.GGUFReader(str(loaded.path)).fields.get("tokenizer.ggml.pre")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else None


# Pre-tokenizer names by family, for Hugging Face bases (llama.cpp hashes a tokenization to
# find them; these are the ones its converter records for the families we export).
_PRE_BY_FAMILY = {"qwen2": "qwen2", "qwen3": "qwen2"}


def _split_regexes(pre: dict | None) -> list[str]:
    """The Split regexes of a tokenizer.json pre_tokenizer (a Sequence or a single one)."""
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [r for p in pre.get("pretokenizers", []) for r in _split_regexes(p)]
    pattern = pre.get("pattern") or {}
    return [pattern["Regex"]] if pre.get("type") == "Split" and "Regex" in pattern else []


def _pre_from_regex(pre: dict | None) -> str | None:
    """Llama 3's pre-tokenizer (digits in groups of up to three, case-insensitive
    contractions) is llama.cpp's `llama-bpe`; under `default` llama.cpp would tokenize some
    text unlike training (e.g. it splits the apostrophe off "'LL")."""
    if any(r"\p{N}{1,3}" in r for r in _split_regexes(pre)):
        return "llama-bpe"
    return None


def _tokenizer(writer, loaded, vocab_size: int) -> None:
    import gguf

    hf = getattr(loaded.tokenizer, "_tokenizer", loaded.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        tj = json.loads((Path(tmp) / "tokenizer.json").read_text())
        model = tj["model"]
        added = {t["id"]: t for t in tj.get("added_tokens", [])}
        if model["type"] == "BPE" and not model.get("byte_fallback"):
            vocab = {i: t for t, i in hf.get_vocab().items()}
            tokens, types = [], []
            for i in range(vocab_size):
                if i not in vocab:
                    tokens.append(f"[PAD{i}]")
                    types.append(gguf.TokenType.UNUSED)
                elif i in added:
                    tokens.append(vocab[i])
                    special = added[i]["special"]
                    types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
                else:
                    tokens.append(vocab[i])
                    types.append(gguf.TokenType.NORMAL)
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
            if not merges:
                raise SafeSteerError("the BPE tokenizer has no merges, which llama.cpp requires")
            writer.add_tokenizer_model("gpt2")
            pre = (
                _source_pre(loaded)
                or _pre_from_regex(tj.get("pre_tokenizer"))
                or _PRE_BY_FAMILY.get(loaded.config.get("model_type"))
            )
            writer.add_tokenizer_pre(pre or "default")
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            if merges:
                writer.add_token_merges(merges)
        elif model["type"] == "BPE":  # SentencePiece as tokenizers writes it (llama 2, gemma)
            # tokenizers orders an SPM vocabulary by piece score, so -id ranks the merges the
            # way llama.cpp's SPM tokenizer applies them (highest score first).
            vocab = {i: t for t, i in hf.get_vocab().items()}
            tokens, scores, types = [], [], []
            for i in range(vocab_size):
                text = vocab.get(i)
                if text is None:
                    tokens.append(f"[PAD{i}]")
                    scores.append(-1e9)
                    types.append(gguf.TokenType.UNUSED)
                    continue
                tokens.append(text)
                if i in added:
                    special = added[i]["special"]
                    scores.append(0.0)
                    types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
                elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                    scores.append(0.0)
                    types.append(gguf.TokenType.BYTE)
                else:
                    scores.append(-float(i))
                    types.append(gguf.TokenType.NORMAL)
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            writer.add_add_space_prefix(_prepends_space(tj))
        else:
            raise SafeSteerError(
                f"GGUF export supports BPE tokenizers (byte-level or SentencePiece-style); this "
                f"one is {model['type']} (use --format hf and llama.cpp's converter)"
            )
    for key, tid in (
        ("bos", hf.bos_token_id),
        ("eos", hf.eos_token_id),
        ("unk", hf.unk_token_id),
        ("pad", hf.pad_token_id),
    ):
        if tid is not None:
            writer.add_uint32(f"tokenizer.ggml.{key}_token_id", int(tid))
    probe = hf.encode("a", add_special_tokens=True)
    writer.add_add_bos_token(bool(probe) and probe[0] == hf.bos_token_id is not None)
    writer.add_add_eos_token(bool(probe) and probe[-1] == hf.eos_token_id is not None)
    if getattr(hf, "chat_template", None):
        writer.add_chat_template(hf.chat_template)


def _prepends_space(tokenizer_json: dict) -> bool:
    """Whether the SPM normalizer/pre-tokenizer puts "\u2581" before the text (llama.cpp's
    `add_space_prefix`): a Prepend normalizer, or a Metaspace that prepends."""

    def walk(node) -> bool:
        if isinstance(node, list):
            return any(walk(n) for n in node)
        if not isinstance(node, dict):
            return False
        if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
            return True
        if node.get("type") == "Metaspace" and (
            node.get("prepend_scheme") in ("always", "first") or node.get("add_prefix_space")
        ):
            return True
        return any(walk(v) for v in node.values())

    return walk(tokenizer_json.get("normalizer")) or walk(tokenizer_json.get("pre_tokenizer"))


def write_gguf(weights: dict, loaded, path: Path, gtype: str, *, name: str = "") -> dict:
    """Write `weights` (fused, Hugging Face names) as one GGUF file of type `gtype`. Consumes
    `weights`: each tensor leaves the dict once written."""
    import gguf

    if gtype not in GGUF_TYPES:
        raise SafeSteerError(f"--gguf-type {gtype!r} (use one of: {', '.join(GGUF_TYPES)})")
    config = loaded.config
    arch = check_supported(config)
    names = {n: gguf_name(n, arch) for n in weights}  # every name mapped before writing
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gtype]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    if name:
        writer.add_name(name)
    _hparams(writer, config, arch)
    writer.add_file_type(ftype)
    vocab_size = int(weights["model.embed_tokens.weight"].shape[0])
    writer.add_vocab_size(vocab_size)
    _tokenizer(writer, loaded, vocab_size)
    # Stream: declare every tensor's layout, then convert and write one tensor at a time
    # (each is dropped from `weights` once written), so peak memory stays near one model copy.
    order = sorted(weights, key=_tensor_order)
    for hf_name in order:
        shape, dtype, nbytes, raw_dtype = _layout(gguf, tuple(weights[hf_name].shape), gtype)
        writer.add_tensor_info(names[hf_name], shape, dtype, nbytes, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name in order:
        data = _tensor_data(hf_name, weights.pop(hf_name), arch, config)
        writer.write_tensor_data(_quantize(gguf, data, gtype)[0])
    writer.close()
    return {"gguf_type": gtype, "architecture": arch}


def _tensor_order(name: str) -> tuple:
    parts = name.split(".")
    layer = int(parts[2]) if parts[:2] == ["model", "layers"] else -1
    return (layer, name)


def control_vector_layer(layer: int, num_layers: int) -> int:
    """llama.cpp's index for our steering layer.

    We add the vector to the *input* of decoder block `layer` (0-based). llama.cpp adds
    `direction.N` to the *output* of block N (`build_cvec(cur, il)` after the block's residual
    add), i.e. the input of block N + 1; it never applies N = 0 (the loader rejects it). So our
    layer L is llama.cpp's N = L - 1, defined for 2 <= L < num_layers.
    """
    if not 2 <= layer < num_layers:
        raise SafeSteerError(
            f"steering layer {layer} has no llama.cpp control-vector equivalent (llama.cpp adds "
            f"vectors after blocks 1..{num_layers - 1}, i.e. to the inputs of blocks "
            f"2..{num_layers - 1}); rerun `direction` with --layer in that range"
        )
    return layer - 1


def write_control_vector(run, model: dict, path: Path) -> dict:
    """The run's teacher direction, times its coefficient, as a llama.cpp control vector GGUF:
    `controlvector.model_hint`, `controlvector.layer_count` and one F32 tensor `direction.N`.
    `model` holds the base's `family` and `num_layers` (as config.toml's resolved_model)."""
    import gguf

    from safesteer_mlx.direction import load_direction

    direction, meta = load_direction(run.direction_tensors)
    layer, coef = int(meta["layer"]), float(meta["coefficient"])
    n = control_vector_layer(layer, int(model["num_layers"]))
    vector = np.array((coef * direction.astype(mx.float32)).astype(mx.float32))
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", str(model.get("family") or "llama"))
    writer.add_uint32("controlvector.layer_count", 1)
    writer.add_tensor(f"direction.{n}", vector.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"steering_layer": layer, "llama_cpp_layer": n, "coefficient": coef}
