"""Batched generation through mlx-lm's BatchGenerator (continuous batching, KV cache)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx


@dataclass
class Generations:
    texts: list[str]
    token_ids: list[list[int]]
    prompt_tokens: int
    generation_tokens: int
    seconds: float
    peak_memory_gb: float

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / max(self.seconds, 1e-9)


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
    stop_at_eos: bool = True,
    keep_stop_token: bool = False,
) -> Generations:
    """Complete every prompt (token ids), all in flight together in batches of `batch_size`;
    greedy when temperature is 0. With `stop_at_eos` a completion ends at the tokenizer's
    end-of-turn tokens (returned only with `keep_stop_token`, the texts never include them);
    without it every completion has `max_tokens`
    tokens. Results come back in prompt order."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    if seed is not None:
        mx.random.seed(seed)
    stops = [[t] for t in tokenizer.eos_token_ids] if stop_at_eos else None
    gen = BatchGenerator(
        model,
        stop_tokens=stops,
        sampler=make_sampler(temp=temperature, top_p=top_p),
        completion_batch_size=batch_size,
        prefill_batch_size=min(batch_size, 8),
    )
    t0 = time.perf_counter()
    try:
        uids = gen.insert(prompts, [max_tokens] * len(prompts))
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        while responses := gen.next_generated():
            for r in responses:
                if r.finish_reason != "stop" or keep_stop_token:
                    tokens[r.uid].append(r.token)
    finally:
        gen.close()
    seconds = time.perf_counter() - t0
    ids = [tokens[uid] for uid in uids]
    stops_set = set(tokenizer.eos_token_ids) if keep_stop_token else set()
    return Generations(
        texts=[tokenizer.decode([t for t in i if t not in stops_set]) for i in ids],
        token_ids=ids,
        prompt_tokens=sum(len(p) for p in prompts),
        generation_tokens=sum(len(t) for t in ids),
        seconds=seconds,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )
