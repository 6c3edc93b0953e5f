"""Tiny random models of every family the export supports, built with mlx-lm's own model classes
and saved as real Hugging Face/MLX directories (config.json, model.safetensors, tokenizer files).

Every family uses one byte-level BPE tokenizer (tests/tiny.py's bytes and chat specials plus a
few merges, since llama.cpp requires merges; written to GGUF as a `gpt2` tokenizer): the
tokenizer is independent of the architecture in all three runtimes, and one tokenizer keeps the
token ids comparable across them; `spm_tokenizer` (SentencePiece-style, byte fallback) covers
llama.cpp's other vocabulary type. Norm weights are randomised so that a missing Gemma "+1" or a
swapped norm would change the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from tests.tiny import CHAT_TEMPLATE, tiny_tokenizer

MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a"), ("o", "u")]


def bpe_tokenizer():
    """tests/tiny.py's byte-level tokenizer with a few merges (llama.cpp requires them)."""
    return tiny_tokenizer(MERGES)


HIDDEN = 64

_COMMON = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "intermediate_size": 2 * HIDDEN,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 512,
}

FAMILIES: dict[str, dict] = {
    "llama": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "mistral": {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "rope_theta": 1000000.0,
        "head_dim": 16,
        "sliding_window": None,
        "tie_word_embeddings": False,
    },
    "qwen2": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    "qwen3": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "rope_theta": 1000000.0,
        "head_dim": 32,  # != hidden / heads: exercises key_length/value_length
        "tie_word_embeddings": True,
    },
    "gemma2": {
        "model_type": "gemma2",
        "architectures": ["Gemma2ForCausalLM"],
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
    "gemma3": {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 256,
        "sliding_window_pattern": 6,  # llama.cpp hard-codes 6: 5 sliding layers, 1 global
        "num_hidden_layers": 6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
    },
}


# A family mlx-lm and transformers run but the GGUF export does not.
UNSUPPORTED = {"phi3": {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}}


SPM_MERGES = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("e", "r"), ("▁", "a")]


def spm_tokenizer():
    """SentencePiece-style BPE as `tokenizers` writes llama 2's: "▁" for spaces, byte fallback
    `<0xNN>` pieces, the vocabulary in score order, `<s>` added in front."""
    import string

    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["▁"] + list(string.ascii_letters + string.digits + string.punctuation)
    tokens += [a + b for a, b in SPM_MERGES]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=SPM_MERGES, unk_token="<unk>", byte_fallback=True)
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    hf.chat_template = CHAT_TEMPLATE
    return TokenizerWrapper(hf, eos_token_ids=[2])


def family_config(family: str, vocab_size: int, layers: int | None = None) -> dict:
    config = {**_COMMON, **{**FAMILIES, **UNSUPPORTED}[family], "vocab_size": vocab_size}
    if layers is not None:
        config["num_hidden_layers"] = layers
    return config


def build_family_dir(
    family: str, path: Path, *, seed: int = 0, layers: int | None = None, tokenizer=None
) -> Path:
    """A random float32 model of `family` saved at `path` as an HF/MLX model directory."""
    from mlx_lm.utils import _get_classes

    tok = tokenizer or bpe_tokenizer()
    config = family_config(family, len(tok.get_vocab()), layers)
    config["eos_token_id"] = tok.eos_token_id
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    gemma = family.startswith("gemma")
    for name, w in list(weights.items()):
        if name.endswith("embed_tokens.weight"):
            weights[name] = mx.random.normal(w.shape)
        elif name.endswith("lm_head.weight"):
            weights[name] = 0.5 * mx.random.normal(w.shape)
        elif "norm" in name and w.ndim == 1:
            # Gemma stores w and multiplies by (1 + w); the others multiply by w.
            weights[name] = (0.0 if gemma else 1.0) + 0.2 * mx.random.normal(w.shape)
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    model.update(tree_unflatten(list(weights.items())), strict=False)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    tok._tokenizer.save_pretrained(str(path))
    return path
