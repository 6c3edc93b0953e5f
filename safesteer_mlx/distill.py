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
import json
import math
import signal
import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

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
    is alive at once, forward or backward. Returns (loss, restricted KL) — the second is the
    restricted sum whatever the training variant, for reporting."""
    from safesteer_mlx.modeling import lm_head

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



def cosine_with_warmup(lr: float, total_steps: int, warmup_ratio: float):
    """Linear warm-up over the first `warmup_ratio` of the steps, then cosine decay to 0."""
    warmup = int(round(total_steps * warmup_ratio))
    decay = optim.cosine_decay(lr, max(total_steps - warmup, 1), end=0.0)
    if warmup == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(lr / warmup, lr, warmup), decay], [warmup])


# LoRA (rank 8, scale 20) on the fixture: 2e-3 collapses the student within 3 steps (it learns to
# avoid S altogether); the runs that improved it had lr x steps ~ 2e-4 (1e-4 x 2, 3e-5 x 8), and
# 1e-4 x 8 undid the refusals. 1e-5 keeps the default 25 steps in that budget (README, "Learning
# rate and loss").
DEFAULT_LORA_LR = 1e-5


def pick_lr(config, family: str) -> float:
    """--lr; else the preset's rate for this fine-tuning type; else the reference defaults."""
    d = config.distill
    if d.lr is not None:
        return float(d.lr)
    from safesteer_mlx.models import resolve

    key = "full_ft_lr" if d.fine_tune_type == "full" else "lora_lr"
    preset = resolve(config.model.name)
    if preset is not None and key in preset.defaults:
        return float(preset.defaults[key])
    if d.fine_tune_type == "full":
        return 1e-6 if family in ("llama", "mistral") else 1e-5
    return DEFAULT_LORA_LR


class Trainer:
    """The student, its optimizer, and the teacher switch — all on one loaded model."""

    def __init__(self, loaded, config, direction, layer: int, coef: float, safety_ids, steps):
        from safesteer_mlx.adapters import FrozenBase, adapter_config, attach

        d = config.distill
        if d.loss not in LOSS_VARIANTS:
            raise SafeSteerError(f"--loss {d.loss!r} (use one of {', '.join(LOSS_VARIANTS)})")
        self.loaded, self.config, self.d = loaded, config, d
        self.model = loaded.model
        self.direction, self.layer, self.coef = direction, layer, coef
        self.safety_ids = mx.array(safety_ids, dtype=mx.int32)
        self.total_steps = steps
        self.lr = pick_lr(config, loaded.family)
        n_layers = loaded.num_layers if d.num_layers in (None, -1) else d.num_layers
        self.adapter_config = adapter_config(
            d.fine_tune_type, n_layers, d.lora_rank, d.lora_scale, d.lora_dropout, d.lora_keys
        )
        mx.random.seed(config.seed)  # LoRA's random init: the same for every run of this seed
        attach(self.model, self.adapter_config)
        self._frozen = FrozenBase(self.model) if d.fine_tune_type == "full" else None
        if d.grad_checkpoint:
            _checkpoint_blocks(self.model)
        self.optimizer = optim.AdamW(
            learning_rate=cosine_with_warmup(self.lr, steps, d.warmup_ratio),
            weight_decay=d.weight_decay,
        )
        self.optimizer.init(self.model.trainable_parameters())
        self._loss_and_grad = nn.value_and_grad(self.model, self._loss)

    # The three roles of the one model
    @contextlib.contextmanager
    def teacher(self):
        """Adapters off, steering on."""
        from safesteer_mlx.modeling import steered

        with self.base(), steered(self.model, self.direction, self.layer, self.coef):
            yield self.model

    def base(self):
        """Adapters off (for full fine-tuning: the original weights swapped back in)."""
        from safesteer_mlx.adapters import adapters_disabled

        return self._frozen.active(self.model) if self._frozen else adapters_disabled(self.model)

    def rollouts(self, prompts: list[list[int]], seed: int):
        """M on-policy samples per prompt from the student, all prompts in one batched call;
        a response that ended its turn keeps its end-of-turn token (the student learns to stop).
        """
        from safesteer_mlx.generation import generate_batch

        d = self.d
        repeated = [p for p in prompts for _ in range(d.generations)]
        gen = generate_batch(
            self.model,
            self.loaded.tokenizer,
            repeated,
            max_tokens=d.max_tokens,
            temperature=d.temperature,
            top_p=d.top_p,
            seed=seed,
            batch_size=d.rollout_batch_size,
            keep_stop_token=True,
        )
        return repeated, gen

    def _loss(self, tokens, mask, teacher_hidden):
        global _CHECKPOINTING
        from safesteer_mlx.modeling import forward_hidden

        _CHECKPOINTING = self.d.grad_checkpoint
        try:
            hidden = forward_hidden(self.model, tokens)
        finally:
            _CHECKPOINTING = False
        return chunked_loss(
            self.model, hidden, teacher_hidden, mask, self.safety_ids, self.d.loss, self.d.chunk
        )

    def step(self, step: int, prompts: list[list[int]]) -> tuple[dict, dict]:
        """One optimizer step's rollouts, losses and clipped gradients (not yet applied)."""
        from safesteer_mlx.modeling import forward_hidden

        d = self.d
        seed = self.config.seed * 1_000_003 + step
        t0 = time.perf_counter()
        mx.random.seed(seed)
        rows, gen = self.rollouts(prompts, seed)
        rollout_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        n_rows = len(rows)
        grads, loss_sum, kl_sum, tokens_seen = None, 0.0, 0.0, 0
        teacher_s = 0.0
        for i in range(0, n_rows, d.micro_batch_size):
            j = i + d.micro_batch_size
            batch = build_batch(rows[i:j], gen.token_ids[i:j])
            tt = time.perf_counter()
            with self.teacher():
                teacher_hidden = mx.stop_gradient(forward_hidden(self.model, batch.tokens))
            mx.eval(teacher_hidden)
            teacher_s += time.perf_counter() - tt
            (loss, kl), g = self._loss_and_grad(batch.tokens, batch.mask, teacher_hidden)
            weight = (batch.tokens.shape[0]) / n_rows
            g = tree_map(lambda x, w=weight: x * w, g)
            grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
            mx.eval(grads, loss, kl)
            loss_sum += float(loss) * weight
            kl_sum += float(kl) * weight
            tokens_seen += int(batch.tokens.size)
        train_s = time.perf_counter() - t1
        grads, norm = optim.clip_grad_norm(grads, d.grad_clip)
        mx.eval(grads, norm)
        metrics = {
            "step": step + 1,
            "loss": loss_sum,
            "kl_S": kl_sum,
            "lr": float(self.optimizer.learning_rate),
            "grad_norm": float(norm),
            "rollout_tokens": gen.generation_tokens,
            "rollout_tokens_per_s": round(gen.generation_tokens / max(rollout_s, 1e-9), 2),
            "train_tokens_per_s": round(tokens_seen / max(train_s, 1e-9), 2),
            "rollout_s": round(rollout_s, 3),
            "teacher_s": round(teacher_s, 3),
            "train_s": round(train_s, 3),
            "peak_mem_gb": round(mx.get_peak_memory() / 1e9, 4),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return metrics, grads

    def apply(self, grads) -> None:
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)


_CHECKPOINTING = False


def _checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing: in the training forward, each block's activations are recomputed
    in the backward pass instead of stored (mlx-lm's scheme, switched off for generation)."""
    from safesteer_mlx.modeling import decoder_layers

    cls = type(decoder_layers(model)[0])
    if getattr(cls, "_safesteer_checkpointed", False):
        return
    call = cls.__call__

    def maybe_checkpointed(self, *args, **kwargs):
        if not _CHECKPOINTING:
            return call(self, *args, **kwargs)

        def inner(params, *a, **k):
            self.update(params)
            return call(self, *a, **k)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    cls.__call__ = maybe_checkpointed
    cls._safesteer_checkpointed = True


class _Interrupt:
    """SIGINT sets a flag checked between steps, so Ctrl-C saves a checkpoint first; a second
    Ctrl-C stops at once."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.hit:
                raise KeyboardInterrupt
            self.hit = True

        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (a TUI worker): the caller stops us instead
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def training_prompts(config, loaded) -> list[list[int]]:
    """The harmful prompts distilled on: the direction stage's harmful train split (its val
    split stays held out), up to `num_prompts`, chat-formatted."""
    from safesteer_mlx.direction import encode_prompts, load_prompt_sets

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
    schedule state. `should_stop()` (for UIs) is polled between steps like Ctrl-C."""
    from safesteer_mlx.checkpoints import Checkpoints
    from safesteer_mlx.direction import load_direction
    from safesteer_mlx.mining import safety_token_ids
    from safesteer_mlx.modeling import load_configured
    from safesteer_mlx.run import file_hash, input_hash

    rep = Reporter("distill", progress)
    d = config.distill
    if min(d.batch_size, d.generations, d.max_tokens, d.micro_batch_size, d.epochs) < 1:
        raise SafeSteerError("distill batch_size, generations, max_tokens, epochs must be >= 1")
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
        safety,
        prompts,
    )
    ckpts = Checkpoints(run)
    final = [run.adapters / "adapters.safetensors", run.metrics]
    if not force and run.is_current("distill", inputs, final):
        rep.log("adapters are up to date; skipping (use --force to redo)")
        return run.stage("distill")

    trainer = Trainer(loaded, config, direction, meta["layer"], meta["coefficient"], safety, total)
    start = 0
    if resume:
        start = ckpts.restore(trainer, inputs)
        rep.log(f"resuming after step {start} of {total}")
    elif ckpts.latest() is not None and not force:
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
    with run.stage_run("distill", inputs) as stats, _Interrupt() as interrupt:
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
    return run.stage("distill")


def _prompt_order(n: int, epochs: int, seed: int) -> list[int]:
    """A seeded permutation of the prompts per epoch, concatenated."""
    rng = np.random.default_rng(seed)
    return [int(i) for _ in range(epochs) for i in rng.permutation(n)]


def read_metrics(run) -> list[dict]:
    if not run.metrics.exists():
        return []
    return [json.loads(line) for line in run.metrics.read_text().splitlines() if line.strip()]


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
