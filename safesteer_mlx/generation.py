"""Batched generation through mlx-lm's BatchGenerator (continuous batching, KV cache)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass
class Generations:
    texts: list[str]
    token_ids: list[list[int]]
    prompt_tokens: int
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float


def generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 32,
) -> Generations:
    """Complete every prompt (token ids) in batches; greedy when temperature is 0. Generation
    stops at the tokenizer's end-of-turn tokens."""
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temperature, top_p=top_p)
    response = batch_generate(
        model,
        tokenizer,
        prompts,
        max_tokens=max_tokens,
        return_token_ids=True,
        sampler=sampler,
        completion_batch_size=batch_size,
        prefill_batch_size=min(batch_size, 8),
    )
    stats = response.stats
    return Generations(
        texts=list(response.texts),
        token_ids=[list(t) for t in response.token_ids],
        prompt_tokens=stats.prompt_tokens,
        generation_tokens=stats.generation_tokens,
        generation_tps=stats.generation_tps,
        peak_memory_gb=stats.peak_memory,
    )
