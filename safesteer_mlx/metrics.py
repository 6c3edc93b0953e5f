"""The numbers evaluation reports, each a plain function: per-token KL between two models on
fixed responses, and perplexity on held-out text. Both in float32 through log-softmax."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import mlx.core as mx
import numpy as np

from safesteer_mlx.errors import SafeSteerError


def token_kl(base_logits: mx.array, other_logits: mx.array) -> mx.array:
    """KL(base ‖ other) at each position [...] from logits [..., V]:

        KL_t = Σ_v p_b(v) (log p_b(v) − log p_o(v)),   log p = logits − logsumexp(logits),

    in float32. It is ≥ 0 in exact arithmetic; the rounding residue (|x| ~ 1e-8) below zero
    is clipped so that no reported value is negative, and tokens the base gives probability 0
    (logit −inf, e.g. masked padding rows) contribute 0, not 0·∞ = NaN."""
    b = base_logits.astype(mx.float32)
    o = other_logits.astype(mx.float32)
    logp_b = b - mx.logsumexp(b, axis=-1, keepdims=True)
    logp_o = o - mx.logsumexp(o, axis=-1, keepdims=True)
    p_b = mx.exp(logp_b)
    terms = mx.where(p_b > 0, p_b * (logp_b - logp_o), 0.0)
    return mx.maximum(terms.sum(axis=-1), 0.0)


def response_kl(
    model,
    base: Callable[[], contextlib.AbstractContextManager],
    prompts: list[list[int]],
    responses: list[list[int]],
    batch_size: int = 4,
) -> list[list[float]]:
    """Per-token KL(base ‖ model as it stands) on each prompt's given response tokens (the
    distributions that predict response token j, for every j). `base()` is a context in which
    the same model is the base (adapters off)."""
    from safesteer_mlx.distill import build_batch
    from safesteer_mlx.modeling import forward_hidden, lm_head

    out: list[list[float]] = []
    for i in range(0, len(prompts), batch_size):
        ps, rs = prompts[i : i + batch_size], responses[i : i + batch_size]
        keep = [j for j, r in enumerate(rs) if r]
        result: list[list[float]] = [[] for _ in rs]
        if keep:
            batch = build_batch([ps[j] for j in keep], [rs[j] for j in keep])
            mask = np.array(batch.mask)
            cols = np.flatnonzero(mask.any(axis=0))
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            with base():
                hb = forward_hidden(model, batch.tokens)[:, lo:hi]
                mx.eval(hb)
            ha = forward_hidden(model, batch.tokens)[:, lo:hi]
            kl = np.array(token_kl(lm_head(model, hb), lm_head(model, ha)))
            for row, j in enumerate(keep):
                result[j] = [float(x) for x in kl[row][mask[row, lo:hi]]]
        out.extend(result)
    return out


def percentile(values: list[float], q: float) -> float:
    """numpy's linear-interpolation percentile (0.0 for no values)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


# ---- perplexity ---------------------------------------------------------------------------------


def read_text(source: str) -> str:
    """`builtin:heldout` (prose shipped in the package, written for this project and never
    trained on) or a local UTF-8 text file."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        path = resources.files("safesteer_mlx") / "prompts" / f"{name}.txt"
        if not path.is_file():
            raise SafeSteerError(f"unknown built-in text {source} (use builtin:heldout or a file)")
        return path.read_text("utf-8")
    p = Path(source).expanduser()
    if not p.is_file():
        raise SafeSteerError(f"perplexity text not found: {source} (give a UTF-8 .txt file)")
    try:
        return p.read_text("utf-8")
    except UnicodeDecodeError:
        raise SafeSteerError(f"{p} is not UTF-8 text (re-save it as UTF-8)") from None


def text_windows(tokenizer, text: str, max_tokens: int, window: int) -> list[list[int]]:
    """The text's first `max_tokens` tokens in non-overlapping windows of `window` tokens (a
    last window shorter than 2 tokens is dropped: it predicts nothing)."""
    if window < 2 or max_tokens < 2:
        raise SafeSteerError("ppl_window and ppl_max_tokens must be >= 2")
    ids = tokenizer.encode(text)[:max_tokens]
    wins = [ids[i : i + window] for i in range(0, len(ids), window)]
    wins = [w for w in wins if len(w) >= 2]
    if not wins:
        raise SafeSteerError("the perplexity text is shorter than 2 tokens (give a longer text)")
    return wins


def window_nll(model, windows: list[list[int]]) -> list[float]:
    """Σ_t −log p(x_{t+1} | x_≤t) over each window (float32 log-softmax); each window starts
    with no context, so it scores len(window) − 1 tokens."""
    out = []
    for w in windows:
        tokens = mx.array([w], dtype=mx.int32)
        logits = model(tokens[:, :-1]).astype(mx.float32)[0]
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logp, tokens[0, 1:, None], axis=-1)
        out.append(float(-picked.sum()))
    return out


def perplexity(nll_sums: list[float], windows: list[list[int]]) -> float:
    """exp(Σ NLL / Σ scored tokens)."""
    n = sum(len(w) - 1 for w in windows)
    return float(np.exp(sum(nll_sums) / max(n, 1)))
