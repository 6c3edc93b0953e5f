"""Stage 3: localized on-policy distillation.

The student (the base with LoRA on) samples M responses per harmful prompt. Student and
teacher (the same weights with the adapters off and the steering vector on) are teacher-forced
on them, and the student minimises the reverse KL to the teacher restricted to the safety
tokens S, over the full-vocabulary log-softmax and without renormalisation:

    ℓ_t = Σ_{v∈S} π_s(v | x, y_<t) (log π_s(v | x, y_<t) − log π_t(v | x, y_<t)),

averaged over each response's tokens, then over responses.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from safesteer_mlx.config import loss_chunk
from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.progress import Callback, Reporter

LOSS_VARIANTS = ("restricted", "generalized", "renormalized", "full_vocab")



def restricted_reverse_kl(
    student_logits: mx.array,
    teacher_logits: mx.array,
    safety_ids: mx.array,
    variant: str = "restricted",
) -> mx.array:
    """Per-position loss [..., ] from logits [..., V].

    restricted:   Σ_{v∈S} π_s(v) (log π_s(v) − log π_t(v)), log-softmax over the full
                  vocabulary, no renormalisation (can be negative; per token it is lowest at
                  π_s = π_t / e, so it also pulls S tokens the student shares with the teacher
                  down);
    generalized:  Σ_{v∈S} π_s(v) (log π_s(v) − log π_t(v)) − π_s(v) + π_t(v), the generalized
                  (unnormalised) KL on S: ≥ 0, and zero exactly where π_s = π_t on S;
    renormalized: KL(q_s ‖ q_t) with q = softmax of the logits restricted to S;
    full_vocab:   KL(π_s ‖ π_t) over the whole vocabulary (the paper's ablation).
    """
    s = student_logits.astype(mx.float32)
    t = teacher_logits.astype(mx.float32)
    if variant == "renormalized":
        s = s[..., safety_ids]
        t = t[..., safety_ids]
    logp_s = s - mx.logsumexp(s, axis=-1, keepdims=True)
    logp_t = t - mx.logsumexp(t, axis=-1, keepdims=True)
    if variant in ("restricted", "generalized"):
        logp_s = logp_s[..., safety_ids]
        logp_t = logp_t[..., safety_ids]
    elif variant not in ("renormalized", "full_vocab"):
        raise SafeSteerError(f"loss variant {variant!r} (use one of {', '.join(LOSS_VARIANTS)})")
    p_s = mx.exp(logp_s)
    per_token = p_s * (logp_s - logp_t)
    if variant == "generalized":
        per_token = per_token - p_s + mx.exp(logp_t)
    return per_token.sum(axis=-1)


def masked_sequence_mean(per_position: mx.array, mask: mx.array) -> mx.array:
    """Mean over each sequence's masked positions, then over sequences with any."""
    mask = mask.astype(mx.float32)
    return _mean_of_sequence_means((per_position * mask).sum(axis=-1), mask.sum(axis=-1))


def _mean_of_sequence_means(sums: mx.array, counts: mx.array) -> mx.array:
    """Σ_b [n_b > 0] (s_b / n_b) / #{b : n_b > 0}, from per-sequence sums and counts."""
    has = (counts > 0).astype(mx.float32)
    return (sums / mx.maximum(counts, 1.0) * has).sum() / mx.maximum(has.sum(), 1.0)


def chunked_loss(
    model: nn.Module,
    student_hidden: mx.array,
    teacher_hidden: mx.array,
    mask: mx.array,
    safety_ids: mx.array,
    variant: str,
    chunk: int,
) -> tuple[mx.array, mx.array]:
    """The loss from final hidden states [B, T, D], projecting to the vocabulary `chunk`
    positions at a time under `mx.checkpoint`, so at most one chunk of full-vocabulary logits
    is alive at once, forward or backward; the chunk shrinks so it holds at most
    config.LOGITS_CHUNK_ELEMENTS logits (B x chunk x V). Returns (loss, restricted KL) — the
    second is the restricted sum whatever the training variant, for reporting."""
    from safesteer_mlx.modeling import lm_head, vocab_size

    def piece(hs, ht, m):
        ls, lt = lm_head(model, hs), mx.stop_gradient(lm_head(model, ht))
        per_pos = restricted_reverse_kl(ls, lt, safety_ids, variant)
        report = (
            per_pos
            if variant == "restricted"
            else restricted_reverse_kl(ls, lt, safety_ids, "restricted")
        )
        m = m.astype(mx.float32)
        return (per_pos * m).sum(axis=-1), mx.stop_gradient((report * m).sum(axis=-1))

    # mx.checkpoint differentiates only its arguments: the lm_head weights read inside get no
    # gradient, which is right only because the lm_head is never trained (adapters.attach).
    piece = mx.checkpoint(piece)
    # Only the span holding response positions is projected (prompts are masked out anyway).
    cols = np.flatnonzero(np.array(mask).any(axis=0))
    lo, hi = (int(cols[0]), int(cols[-1]) + 1) if cols.size else (0, 0)
    student_hidden = student_hidden[:, lo:hi]
    teacher_hidden = teacher_hidden[:, lo:hi]
    mask = mask[:, lo:hi]
    T = hi - lo
    rows = student_hidden.shape[0]
    chunk = loss_chunk(chunk, rows, vocab_size(model))
    sums = mx.zeros(student_hidden.shape[0])
    kl_sums = mx.zeros(student_hidden.shape[0])
    for t0 in range(0, T, chunk):
        s, k = piece(
            student_hidden[:, t0 : t0 + chunk],
            teacher_hidden[:, t0 : t0 + chunk],
            mask[:, t0 : t0 + chunk],
        )
        sums = sums + s
        kl_sums = kl_sums + k
    counts = mask.astype(mx.float32).sum(axis=-1)
    return _mean_of_sequence_means(sums, counts), _mean_of_sequence_means(kl_sums, counts)


@dataclass
class Batch:
    """Prompt + response token rows, right-padded, trimmed to the span the loss reads."""

    tokens: mx.array  # [B, T]
    mask: mx.array  # [B, T]: position predicts a response token
    response_tokens: int


def build_batch(prompts: list[list[int]], responses: list[list[int]]) -> Batch:
    from safesteer_mlx.modeling import pad_right

    rows = [p + r for p, r in zip(prompts, responses)]
    tokens, _ = pad_right(rows)
    T = tokens.shape[1]
    mask = np.zeros((len(rows), T), dtype=bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        # logits at position j predict token j+1: response tokens p..p+len(r)-1
        mask[i, len(p) - 1 : len(p) - 1 + len(r)] = True
    return Batch(tokens, mx.array(mask), int(mask.sum()))



def training_prompts(config, loaded) -> list[list[int]]:
    """The harmful prompts distilled on: the direction stage's harmful train split (its val
    split stays held out), up to `num_prompts`, chat-formatted."""
    from safesteer_mlx.prompting import encode_prompts, load_prompt_sets

    harmful = load_prompt_sets(config).harmful_train[: config.distill.num_prompts]
    return encode_prompts(loaded, harmful, config.data.system_prompt)


def steps_per_epoch(n_prompts: int, batch_size: int) -> int:
    return math.ceil(n_prompts / batch_size)


def run_distill(
    config,
    run,
    *,
    loaded=None,
    progress: Callback | None = None,
    force: bool = False,
    resume: bool = False,
    should_stop=None,
) -> dict:
    """Stage 3 over a run directory: adapters/ (final), adapters/checkpoints/step-N/ and
    metrics.jsonl. `resume` continues from the last checkpoint with the same optimizer and
    schedule state. `should_stop()` (for UIs) is polled between steps like Ctrl-C.

    Started by `mlx.launch` on n ranks (distributed.py), each step's prompts are split across
    them and the gradients summed, so all ranks apply the same updates; rank 0 alone reports
    and writes the run directory (a resumed run reads its checkpoint on every rank)."""
    from safesteer_mlx.checkpoints import Checkpoints
    from safesteer_mlx.direction import load_direction
    from safesteer_mlx.distributed import any_rank, rank0_decides, sum_scalars, world
    from safesteer_mlx.mining import safety_token_ids
    from safesteer_mlx.modeling import load_configured
    from safesteer_mlx.run import file_hash, input_hash
    from safesteer_mlx.trainer import Trainer, _Interrupt

    group = world()
    main = group.rank() == 0
    rep = Reporter("distill", progress if main else None)
    d = config.distill
    if min(d.batch_size, d.generations, d.max_tokens, d.micro_batch_size, d.epochs) < 1:
        raise SafeSteerError(
            "distill batch_size, generations, max_tokens, micro_batch_size and epochs must be >= 1"
        )
    direction, meta = load_direction(run.direction_tensors)
    safety = safety_token_ids(run)
    if loaded is None:
        rep.log(f"loading {config.model.name}")
        loaded = load_configured(config.model)
    prompts = training_prompts(config, loaded)
    total = steps_per_epoch(len(prompts), d.batch_size) * d.epochs
    inputs = input_hash(
        "distill-v1",
        config.section("distill"),
        config.seed,
        loaded.identity,
        loaded.adapter_path,
        file_hash(run.direction_tensors),
        (int(meta["layer"]), float(meta["coefficient"])),  # the teacher's layer and strength
        safety,
        prompts,
    )
    ckpts = Checkpoints(run, writes=main)
    final = [run.adapters / "adapters.safetensors", run.metrics]
    if not force and rank0_decides(run.is_current("distill", inputs, final), group):
        rep.log("adapters are up to date; skipping (use --force to redo)")
        return run.stage("distill")

    trainer = Trainer(loaded, config, direction, meta["layer"], meta["coefficient"], safety, total)
    start = 0
    if resume:
        start = ckpts.restore(trainer, inputs)
        if sum_scalars([start], group)[0] != start * group.size():
            raise SafeSteerError(
                f"--resume: the ranks found different checkpoints under {ckpts.root}; copy "
                "rank 0's adapters/checkpoints to the same path on every machine"
            )
        rep.log(f"resuming after step {start} of {total}")
    elif rank0_decides(ckpts.latest() is not None, group) and not force:
        raise SafeSteerError(
            f"{run.adapters} holds checkpoints of an earlier run "
            "(pass --resume to continue it, or --force to start over)"
        )
    else:
        ckpts.clear()

    rep.start(
        f"distilling {len(prompts)} harmful prompts x {d.generations} rollouts: {total} steps, "
        f"lr {trainer.lr:g}, |S| = {len(safety)}, {d.fine_tune_type}"
    )
    order = _prompt_order(len(prompts), d.epochs, config.seed)
    last: dict = {}
    recorded = run.stage_run("distill", inputs) if main else contextlib.nullcontext({})
    with recorded as stats, _Interrupt() as interrupt:
        with rep.task("training", total=total):
            if start:
                rep.advance(start)
            for step in range(start, total):
                idx = order[step * d.batch_size : (step + 1) * d.batch_size]
                metrics, grads = trainer.step(step, [prompts[i] for i in idx])
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    raise SafeSteerError(
                        f"loss or gradient is not finite at step {step + 1} (loss "
                        f"{metrics['loss']}, grad norm {metrics['grad_norm']}); the last good "
                        "checkpoint is kept: lower --lr and rerun with --resume"
                    )
                trainer.apply(grads)
                ckpts.append_metrics(metrics)
                last = metrics
                rep.advance(1, **metrics)
                done = step + 1
                stop = interrupt.hit or (should_stop is not None and should_stop())
                stop = any_rank(stop, group)  # every rank stops after the same step
                if stop or done == total or (d.save_every and done % d.save_every == 0):
                    ckpts.save(trainer, done, inputs)
                if stop and done < total:
                    raise KeyboardInterrupt
        ckpts.finalize(trainer)
        stats.update(
            steps=total,
            lr=trainer.lr,
            final_loss=last.get("loss"),
            final_kl_S=last.get("kl_S"),
            rollout_tokens_per_s=last.get("rollout_tokens_per_s"),
            train_tokens_per_s=last.get("train_tokens_per_s"),
        )
    rep.result(f"adapters written to {run.adapters}", steps=total)
    return run.stage("distill") if main else {"status": "done", "rank": group.rank(), **stats}


def _prompt_order(n: int, epochs: int, seed: int) -> list[int]:
    """A seeded permutation of the prompts per epoch, concatenated."""
    rng = np.random.default_rng(seed)
    return [int(i) for _ in range(epochs) for i in rng.permutation(n)]


def restricted_kl_on(
    model: nn.Module,
    teacher,
    safety_ids: list[int],
    prompts: list[list[int]],
    responses: list[list[int]],
    batch_size: int = 8,
    chunk: int = 128,
) -> float:
    """Mean restricted reverse KL of the model as it stands (the student) to `teacher()` — a
    context manager that turns the same model into the teacher — on given responses, e.g.
    held-out prompts' completions: the quantity distillation lowers."""
    from safesteer_mlx.modeling import forward_hidden

    ids = mx.array(safety_ids, dtype=mx.int32)
    total = 0.0
    for i in range(0, len(prompts), batch_size):
        batch = build_batch(prompts[i : i + batch_size], responses[i : i + batch_size])
        with teacher():
            teacher_hidden = forward_hidden(model, batch.tokens)
        mx.eval(teacher_hidden)
        hidden = forward_hidden(model, batch.tokens)
        _, kl = chunked_loss(model, hidden, teacher_hidden, batch.mask, ids, "restricted", chunk)
        total += float(kl) * batch.tokens.shape[0]
    return total / max(len(prompts), 1)
