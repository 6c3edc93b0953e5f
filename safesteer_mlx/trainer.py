"""The training machinery of stage 3: the student, its optimizer and schedule, and the switch to
the teacher, all on one loaded model; gradient checkpointing; Ctrl-C handling."""

from __future__ import annotations

import contextlib
import signal
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from safesteer_mlx.config import checkpointing_by_default
from safesteer_mlx.distill import LOSS_VARIANTS, build_batch, chunked_loss
from safesteer_mlx.distributed import shard, sum_gradients, sum_scalars, world
from safesteer_mlx.errors import SafeSteerError


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
        self.group = world()  # size 1 unless started by mlx.launch (distributed.py)
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
        self.checkpointing = (
            checkpointing_by_default(loaded.num_layers, loaded.hidden_size)
            if d.grad_checkpoint is None
            else bool(d.grad_checkpoint)
        )
        if self.checkpointing:
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

        _CHECKPOINTING = self.checkpointing
        try:
            hidden = forward_hidden(self.model, tokens)
        finally:
            _CHECKPOINTING = False
        return chunked_loss(
            self.model, hidden, teacher_hidden, mask, self.safety_ids, self.d.loss, self.d.chunk
        )

    def step(self, step: int, prompts: list[list[int]]) -> tuple[dict, dict]:
        """One optimizer step's rollouts, losses and clipped gradients (not yet applied).

        `prompts` is the step's global batch. Launched on n ranks, rank r rolls out and trains
        on prompts r, r+n, ... (distributed.py); each rank samples with its own seed (seed +
        rank), and train_on makes the summed gradients the global batch's mean."""
        d = self.d
        # a distinct stream per (step, rank); one process keeps the single-process seeds
        seed = self.config.seed * 1_000_003 + step * self.group.size() + self.group.rank()
        local = shard(prompts, self.group)
        t0 = time.perf_counter()
        mx.random.seed(seed)
        rows, responses, generated = [], [], 0
        if local:
            rows, gen = self.rollouts(local, seed)
            responses, generated = gen.token_ids, gen.generation_tokens
        rollout_s = time.perf_counter() - t0
        mx.clear_cache()  # the rollouts' KV caches go back before the training passes

        part, grads = self.train_on(rows, responses, len(prompts) * d.generations)
        (generated,) = sum_scalars([generated], self.group)
        metrics = {
            "step": step + 1,
            "loss": part["loss"],
            "kl_S": part["kl_S"],
            "lr": float(self.optimizer.learning_rate),
            "grad_norm": part["grad_norm"],
            "rollout_tokens": int(generated),
            "rollout_tokens_per_s": round(generated / max(rollout_s, 1e-9), 2),
            "train_tokens_per_s": part["train_tokens_per_s"],
            "rollout_s": round(rollout_s, 3),
            "teacher_s": part["teacher_s"],
            "train_s": part["train_s"],
            "peak_mem_gb": round(mx.get_peak_memory() / 1e9, 4),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if self.group.size() > 1:
            metrics["ranks"] = self.group.size()
        return metrics, grads

    def train_on(
        self, rows: list[list[int]], responses: list[list[int]], global_rows: int
    ) -> tuple[dict, dict]:
        """Teacher and student passes, loss and gradients on given prompt rows and responses,
        in micro-batches; clipped gradients of the mean over the `global_rows` sequences of the
        step (this rank's rows weigh rows / global_rows; the ranks' sum is the global mean)."""
        from safesteer_mlx.modeling import forward_hidden

        d = self.d
        t1 = time.perf_counter()
        grads, loss_sum, kl_sum, tokens_seen = None, 0.0, 0.0, 0
        teacher_s = 0.0
        for i in range(0, len(rows), d.micro_batch_size):
            j = i + d.micro_batch_size
            batch = build_batch(rows[i:j], responses[i:j])
            tt = time.perf_counter()
            with self.teacher():
                teacher_hidden = mx.stop_gradient(forward_hidden(self.model, batch.tokens))
            mx.eval(teacher_hidden)
            teacher_s += time.perf_counter() - tt
            (loss, kl), g = self._loss_and_grad(batch.tokens, batch.mask, teacher_hidden)
            weight = (batch.tokens.shape[0]) / global_rows
            g = tree_map(lambda x, w=weight: x * w, g)
            grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
            mx.eval(grads, loss, kl)
            loss_sum += float(loss) * weight
            kl_sum += float(kl) * weight
            tokens_seen += int(batch.tokens.size)
        if grads is None:  # this rank drew no prompts (a short last step): it adds zeros
            grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
        grads = sum_gradients(grads, self.group)
        loss_sum, kl_sum = sum_scalars([loss_sum, kl_sum], self.group)
        train_s = time.perf_counter() - t1
        grads, norm = optim.clip_grad_norm(grads, d.grad_clip)
        mx.eval(grads, norm)
        mx.clear_cache()  # activations and logits chunks: not held across steps
        return {
            "loss": loss_sum,
            "kl_S": kl_sum,
            "grad_norm": float(norm),
            "train_tokens_per_s": round(tokens_seen * self.group.size() / max(train_s, 1e-9), 2),
            "teacher_s": round(teacher_s, 3),
            "train_s": round(train_s, 3),
        }, grads

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
