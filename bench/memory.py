"""Memory budget of one distillation step on a Qwen2.5-7B-shaped model, 4-bit. Prints one JSON
object: the measured peak of a full step (rollouts, teacher and student passes, loss, backward,
optimizer update) at a few depths, a least-squares line peak(depth), its value at the full 28
layers (`extrapolated_peak_gb`) next to the full model's quantized weights (`weights_gb`).

The models have the real widths, head counts and vocabulary of Qwen2.5-7B-Instruct (random
weights, nothing downloaded) and only the first few decoder blocks; each block of a 7B is the
same size, so the step's peak grows linearly with depth (its weights, LoRA and optimizer state,
and the hidden state kept per block under gradient checkpointing).

    python bench/memory.py            # defaults: 1 prompt x M=8 rollouts x 64 tokens, float16
    python bench/memory.py --generations 2 --max-tokens 8 --dtype float32   # a CPU-sized run

MLX's 4-bit matmuls run at ~1 GFLOP/s on its CPU backend (measured on a 2-core Linux machine),
so there the defaults take hours: shorten the step with the flags. The defaults are for a Mac.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import safesteer_mlx  # noqa: F401  (binds OpenBLAS on Linux before mlx loads)

# Qwen2.5-7B-Instruct's config.json (the fields that size the model).
QWEN25_7B = {
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "num_hidden_layers": 28,
    "vocab_size": 152064,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}
GB = 1e9


class _Tokenizer:
    """What the rollouts ask of a tokenizer: no end-of-turn token (every rollout runs its full
    length, the worst case for memory) and text that is not needed here."""

    eos_token_ids: list[int] = []

    def decode(self, ids) -> str:
        return ""


def build(depth: int, dtype: str, bits: int, group_size: int):
    """A Qwen2.5-7B-shaped model with `depth` blocks, 4-bit (embedding and lm_head too, as in
    mlx-community's 4-bit conversions), quantized block by block so the float weights of only
    one matrix are alive at once."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import qwen2

    from safesteer_mlx.modeling import LoadedModel, decoder_layers

    config = {**QWEN25_7B, "num_hidden_layers": depth}
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    for block in decoder_layers(model):
        nn.quantize(block, group_size=group_size, bits=bits)
        mx.eval(block.parameters())
    for name in ("model.embed_tokens", "lm_head"):  # leaf modules: quantized through the model
        nn.quantize(model, group_size, bits, class_predicate=lambda path, _, n=name: path == n)
        mx.eval(model.parameters())
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=_Tokenizer(),
        config=config,
        source="qwen2.5-7b-shaped",
        path=None,
        identity=f"random-qwen2.5-7b-{depth}",
        family="qwen2",
        quantized=True,
    )


def nbytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def step_peak(loaded, args, grad_checkpoint: bool) -> dict:
    """One full distill step through the engine's Trainer; its peak memory and timings."""
    import mlx.core as mx
    import numpy as np

    from safesteer_mlx.config import Config
    from safesteer_mlx.trainer import Trainer

    config = Config()
    d = config.distill
    d.generations, d.max_tokens = args.generations, args.max_tokens
    d.grad_checkpoint, d.lr = grad_checkpoint, 1e-5
    rng = np.random.default_rng(0)
    hidden = loaded.hidden_size
    direction = mx.array(rng.normal(size=hidden).astype(np.float32)).astype(getattr(mx, args.dtype))
    safety = rng.choice(QWEN25_7B["vocab_size"], 50, replace=False).tolist()
    prompts = [
        rng.integers(0, QWEN25_7B["vocab_size"], args.prompt_tokens).tolist()
        for _ in range(args.prompts)
    ]
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    trainer = Trainer(loaded, config, direction, 0, 1.0, safety, steps=10)
    t0 = time.perf_counter()
    metrics, grads = trainer.step(0, prompts)
    trainer.apply(grads)
    seconds = time.perf_counter() - t0
    peak = mx.get_peak_memory()
    out = {
        "depth": loaded.num_layers,
        "peak_gb": round(peak / GB, 4),
        "weights_gb": round(before / GB, 4),
        "step_over_weights_gb": round((peak - before) / GB, 4),
        "step_s": round(seconds, 2),
        "rollout_tokens": metrics["rollout_tokens"],
        "loss": metrics["loss"],
    }
    del trainer, grads
    gc.collect()  # the Trainer holds its model in a reference cycle (value_and_grad's closure)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="1,2,3", help="decoder blocks of the measured models")
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--generations", type=int, default=8, help="M rollouts per prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument(
        "--grad-checkpoint", choices=["auto", "on", "off"], default="auto",
        help="auto: the engine's default for the full 28-block model",
    )  # fmt: skip
    args = ap.parse_args()

    import mlx.core as mx
    import numpy as np

    from safesteer_mlx.config import checkpointing_by_default
    from safesteer_mlx.modeling import decoder_layers

    full = QWEN25_7B["num_hidden_layers"]
    if args.grad_checkpoint == "auto":
        checkpointing = checkpointing_by_default(full, QWEN25_7B["hidden_size"])
    else:
        checkpointing = args.grad_checkpoint == "on"
    depths = [int(x) for x in args.depths.split(",")]
    runs, block_bytes, other_bytes = [], 0, 0
    for depth in depths:
        loaded = build(depth, args.dtype, args.bits, args.group_size)
        block_bytes = nbytes(decoder_layers(loaded.model)[0])
        other_bytes = nbytes(loaded.model) - depth * block_bytes
        runs.append(step_peak(loaded, args, checkpointing))
        print(f"depth {depth}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
        del loaded
        gc.collect()
        mx.clear_cache()
    peaks = np.array([r["peak_gb"] for r in runs])
    slope, intercept = np.polyfit(depths, peaks, 1) if len(depths) > 1 else (0.0, peaks[0])
    fit = slope * np.array(depths) + intercept
    weights_gb = (other_bytes + full * block_bytes) / GB

    print(
        json.dumps(
            {
                "model": "Qwen2.5-7B-shaped (random weights)",
                "quantization": f"{args.bits}-bit affine, group {args.group_size}",
                "dtype": args.dtype,
                "device": str(mx.default_device()),
                "step": {
                    "prompts": args.prompts,
                    "prompt_tokens": args.prompt_tokens,
                    "generations": args.generations,
                    "max_tokens": args.max_tokens,
                    "grad_checkpoint": checkpointing,
                },
                "runs": runs,
                "fit": {
                    "gb_per_block": round(float(slope), 4),
                    "gb_at_depth_0": round(float(intercept), 4),
                    "max_residual_gb": round(float(np.abs(fit - peaks).max()), 4),
                },
                "full_depth": full,
                "extrapolated_peak_gb": round(float(slope * full + intercept), 3),
                "weights_gb": round(weights_gb, 3),
                "block_weights_gb": round(block_bytes / GB, 4),
                "fits_8gb": bool(slope * full + intercept <= 8.0),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
