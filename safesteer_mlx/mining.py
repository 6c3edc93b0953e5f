"""Stage 2: mine the safety tokens S.

The steered teacher samples short induced refusals (H-1 tokens, M per prompt) on harmless
prompts. Teacher and base are teacher-forced on those same tokens, and at each of the last H
positions every vocabulary token gets

    Δ_t(v) = log π_teacher(v | x, y_<t) − log π_base(v | x, y_<t).

Each valid (trajectory, position) gives one vote to its top-K tokens by Δ; S is the
`num_tokens` most-voted tokens. A position is invalid once the base model's own greedy choice
at it, or at an earlier position, is an end-of-turn token: past that point its distribution is
the degenerate one after a finished reply.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.modeling import (
    LoadedModel,
    forward_hidden,
    lm_head,
    pad_right,
    steered,
    vocab_size,
)
from safesteer_mlx.progress import Callback, Reporter

CONTROL_MARKERS = ("<|", "|>", "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]")


@dataclass
class MiningStats:
    """What the teacher-forced passes accumulate over all trajectories."""

    votes: np.ndarray  # [V] int64
    delta_sum: np.ndarray  # [V] float64, Σ Δ over valid positions
    teacher_prob_sum: np.ndarray  # [V] float64
    base_prob_sum: np.ndarray  # [V] float64
    n_valid: int


def banned_token_ids(tokenizer, vocab_size: int) -> np.ndarray:
    """Special tokens and any token whose text contains a chat-template control marker."""
    banned = np.zeros(vocab_size, dtype=bool)
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    for i in getattr(hf, "all_special_ids", []) or []:
        if 0 <= i < vocab_size:
            banned[i] = True
    for i, added in (getattr(hf, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False) and 0 <= i < vocab_size:
            banned[i] = True
    for i in tokenizer.eos_token_ids:
        if 0 <= i < vocab_size:
            banned[i] = True
    pieces = hf.convert_ids_to_tokens(list(range(min(len(hf), vocab_size))))
    for i, piece in enumerate(pieces):
        if isinstance(piece, str) and any(m in piece for m in CONTROL_MARKERS):
            banned[i] = True
    return banned


def horizon_log_probs(model, sequences: list[list[int]], horizon: int) -> mx.array:
    """Float32 log-softmax over the full vocabulary at each sequence's last `horizon`
    positions: [B, H, V]. Right padding; only those positions go through the lm_head."""
    tokens, lengths = pad_right(sequences)
    hidden = forward_hidden(model, tokens)
    index = (lengths[:, None] - horizon + mx.arange(horizon)[None, :])[:, :, None]
    logits = lm_head(model, mx.take_along_axis(hidden, index, axis=1)).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def valid_positions(base_logp: mx.array, end_ids: list[int]) -> mx.array:
    """[B, H] bool: False from the first position where the base model's greedy token ends its
    turn (inclusive), True before."""
    top1 = mx.argmax(base_logp, axis=-1)  # [B, H]
    is_end = mx.zeros(top1.shape, dtype=mx.bool_)
    for i in end_ids:
        is_end = is_end | (top1 == i)
    ended = mx.cumsum(is_end.astype(mx.int32), axis=1) > 0
    return ~ended


def vote_counts(
    delta: np.ndarray, valid: np.ndarray, banned: np.ndarray, top_k: int
) -> np.ndarray:
    """Each valid (row, position) votes for its top-K tokens by Δ, banned tokens excluded.
    delta [B, H, V], valid [B, H], banned [V] -> votes [V]."""
    V = delta.shape[-1]
    votes = np.zeros(V, dtype=np.int64)
    rows = delta[valid]  # [n, V]
    if rows.shape[0] == 0:
        return votes
    allowed = int((~banned).sum())
    k = min(top_k, allowed)
    scores = np.where(banned[None, :], -np.inf, rows)
    top = np.argpartition(-scores, k - 1, axis=-1)[:, :k]
    np.add.at(votes, top.reshape(-1), 1)
    return votes


def select_safety_tokens(
    stats: MiningStats,
    banned: np.ndarray,
    min_teacher_prob: float,
    num_tokens: int,
    ranking: str,
) -> list[tuple[int, int, float]]:
    """S as (id, votes, mean Δ), best first. `votes`: most-voted with votes > 0 (ties broken by
    mean Δ); `mean`: highest mean Δ over valid positions. Banned and low-teacher-probability
    tokens never enter."""
    n = max(stats.n_valid, 1)
    mean_delta = stats.delta_sum / n
    excluded = banned | (stats.teacher_prob_sum / n < min_teacher_prob)
    ids = np.flatnonzero(~excluded)
    if ranking == "votes":
        ids = ids[stats.votes[ids] > 0]
        order = np.lexsort((-mean_delta[ids], -stats.votes[ids]))
    elif ranking == "mean":
        order = np.argsort(-mean_delta[ids], kind="stable")
    else:
        raise SafeSteerError(f"mining.ranking = {ranking!r} (use 'votes' or 'mean')")
    chosen = ids[order][:num_tokens]
    return [(int(i), int(stats.votes[i]), float(mean_delta[i])) for i in chosen]


def contrast(
    loaded: LoadedModel,
    direction: mx.array,
    layer: int,
    coef: float,
    trajectories: list[list[int]],
    horizon: int,
    banned: np.ndarray,
    top_k: int,
    batch_size: int,
    rep: Reporter,
) -> MiningStats:
    """Teacher-force teacher and base on the trajectories and accumulate votes, Σ Δ and the
    probabilities over valid positions."""
    model = loaded.model
    end_ids = sorted(loaded.tokenizer.eos_token_ids)
    stats = None
    with rep.task("contrast teacher vs base", total=len(trajectories)):
        for i in range(0, len(trajectories), batch_size):
            batch = trajectories[i : i + batch_size]
            with steered(model, direction, layer, coef):
                lp_t = horizon_log_probs(model, batch, horizon)
            lp_b = horizon_log_probs(model, batch, horizon)
            valid = valid_positions(lp_b, end_ids)
            mask = valid[..., None].astype(mx.float32)
            delta = lp_t - lp_b
            sums = [
                (delta * mask).sum(axis=(0, 1)),
                (mx.exp(lp_t) * mask).sum(axis=(0, 1)),
                (mx.exp(lp_b) * mask).sum(axis=(0, 1)),
            ]
            mx.eval(delta, valid, *sums)
            valid_np = np.array(valid)
            votes = vote_counts(np.array(delta), valid_np, banned, top_k)
            part = MiningStats(
                votes, *(np.array(s, dtype=np.float64) for s in sums), int(valid_np.sum())
            )
            if stats is None:
                stats = part
            else:
                stats.votes += part.votes
                stats.delta_sum += part.delta_sum
                stats.teacher_prob_sum += part.teacher_prob_sum
                stats.base_prob_sum += part.base_prob_sum
                stats.n_valid += part.n_valid
            rep.advance(len(batch))
    return stats


def run_mining(
    config,
    run,
    *,
    loaded: LoadedModel | None = None,
    progress: Callback | None = None,
    force: bool = False,
) -> dict:
    """Stage 2 over a run directory: write `safety_tokens.json`, or return the existing one
    when its inputs are unchanged."""
    from safesteer_mlx.direction import load_direction
    from safesteer_mlx.generation import generate_batch
    from safesteer_mlx.modeling import load_configured
    from safesteer_mlx.prompting import encode_prompts, load_prompt_sets
    from safesteer_mlx.run import atomic_write_json, file_hash, input_hash

    rep = Reporter("mining", progress)
    m = config.mining
    if m.horizon < 1 or m.generations < 1 or m.top_k < 1 or m.num_tokens < 1:
        raise SafeSteerError("mining horizon, generations, top_k and num_tokens must be >= 1")
    if not run.direction_tensors.exists():
        raise SafeSteerError(
            f"{run.direction_tensors} is missing (run `safesteer-mlx direction` on this run first)"
        )
    direction, meta = load_direction(run.direction_tensors)
    layer, coef = int(meta["layer"]), float(meta["coefficient"])
    harmless = load_prompt_sets(config).harmless_val
    if m.num_prompts is not None:
        harmless = harmless[: m.num_prompts]
    if loaded is None:
        rep.log(f"loading {config.model.name}")
        loaded = load_configured(config.model)
    seqs = encode_prompts(loaded, harmless, config.data.system_prompt)
    inputs = input_hash(
        "mining-v1",
        config.section("mining"),
        config.seed,
        loaded.identity,
        loaded.adapter_path,
        file_hash(run.direction_tensors),
        (layer, coef),  # the teacher: an override may change only the coefficient
        seqs,  # the chat-formatted prompts: system prompt and template included
    )
    if not force and run.is_current("mining", inputs, [run.safety_tokens]):
        rep.log("safety tokens are up to date; skipping (use --force to redo)")
        return json.loads(run.safety_tokens.read_text())

    rep.start(f"mining safety tokens on {len(harmless)} harmless prompts")
    with run.stage_run("mining", inputs) as stage_stats:
        repeated = [s for s in seqs for _ in range(m.generations)]
        t0 = time.perf_counter()
        rep.log(f"teacher samples {m.generations} x {m.horizon - 1} tokens per prompt")
        with steered(loaded.model, direction, layer, coef):
            gen = generate_batch(
                loaded.model,
                loaded.tokenizer,
                repeated,
                max_tokens=m.horizon - 1,
                temperature=m.temperature,
                top_p=m.top_p,
                seed=config.seed,
                batch_size=m.batch_size * 4,
                stop_at_eos=False,
            )
        sample_s = time.perf_counter() - t0
        trajectories = [s + g for s, g in zip(repeated, gen.token_ids)]

        t0 = time.perf_counter()
        vocab = vocab_size(loaded.model)
        banned = banned_token_ids(loaded.tokenizer, vocab)
        stats = contrast(
            loaded, direction, layer, coef, trajectories, m.horizon, banned, m.top_k,
            m.batch_size, rep,
        )  # fmt: skip
        contrast_s = time.perf_counter() - t0
        if stats.n_valid == 0:
            raise SafeSteerError(
                "no valid positions: the base model ends its turn at once on every trajectory "
                "(try a smaller --horizon or other harmless prompts)"
            )
        chosen = select_safety_tokens(stats, banned, m.min_teacher_prob, m.num_tokens, m.ranking)
        if not chosen:
            raise SafeSteerError("no safety token passed the filters (lower min_teacher_prob)")
        n = max(stats.n_valid, 1)
        tok = loaded.tokenizer
        tokens = [
            {
                "id": i,
                "token": tok.decode([i]),
                "votes": votes,
                "mean_delta": mean_delta,
                "teacher_prob": float(stats.teacher_prob_sum[i] / n),
                "base_prob": float(stats.base_prob_sum[i] / n),
            }
            for i, votes, mean_delta in chosen
        ]
        result = {
            "tokens": tokens,
            "excluded": [],
            "settings": {
                **config.section("mining"),
                "layer": layer,
                "coefficient": coef,
                "prompts": len(harmless),
                "trajectories": len(trajectories),
                "valid_positions": stats.n_valid,
                "total_positions": len(trajectories) * m.horizon,
                "banned_tokens": int(banned.sum()),
                "vocab_size": vocab,
            },
            "examples": [tok.decode(g) for g in gen.token_ids[: 2 * m.generations]],
        }
        atomic_write_json(run.safety_tokens, result)
        n_tokens = sum(len(t) for t in trajectories)
        stage_stats.update(
            sample_tokens_per_s=round(gen.generation_tokens / max(sample_s, 1e-9), 2),
            contrast_tokens_per_s=round(2 * n_tokens / max(contrast_s, 1e-9), 2),
            num_safety_tokens=len(tokens),
        )
    shown = " ".join(repr(t["token"]) for t in tokens[:20])
    rep.result(f"{len(tokens)} safety tokens; top: {shown}", count=len(tokens))
    return result


def safety_token_ids(run) -> list[int]:
    """S as used by distillation: the mined tokens minus those the user excluded."""
    if not run.safety_tokens.exists():
        raise SafeSteerError(f"{run.safety_tokens} is missing (run `safesteer-mlx mine` first)")
    data = json.loads(run.safety_tokens.read_text())
    excluded = set(data.get("excluded", []))
    return [t["id"] for t in data["tokens"] if t["id"] not in excluded]
