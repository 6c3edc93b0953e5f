"""Stage 1: the safety teacher by activation steering.

Candidate refusal directions are difference-of-means of the residual stream,

    r[p, l] = mean_{x in harmful} h_l(x)[p] - mean_{x in harmless} h_l(x)[p],

at the input of every decoder block l and every post-instruction template position p. One is
selected by Arditi et al.'s rule and the teacher is the base model with `coef * r` added to the
input of block l at every position.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from safesteer_mlx.config import Config
from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.judges import REFUSAL_STARTS, is_degenerate, is_refusal
from safesteer_mlx.modeling import (
    LoadedModel,
    ablated,
    capture_layer_inputs,
    forward_hidden,
    last_logits_batches,
    pad_right,
    steered,
)
from safesteer_mlx.plots import plot_direction_scores
from safesteer_mlx.progress import Callback, Reporter
from safesteer_mlx.prompting import encode_prompts, load_prompt_sets, post_instruction_tokens

COEF_LADDER = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
AUTO_COEF_TARGET = 0.8  # refuse at least this share of harmless val prompts
MIN_BASE_HARMFUL_REFUSAL = 0.2  # below: the premise of SafeSteer is weak (paper, limitation 1)


def refusal_token_ids(tokenizer) -> list[int]:
    """First tokens of the usual refusal openings ("I", "As", "Sorry", ...)."""
    ids = {tokenizer.encode(s, add_special_tokens=False)[0] for s in REFUSAL_STARTS}
    return sorted(ids)


def _batches(seqs: list[list[int]], size: int):
    for i in range(0, len(seqs), size):
        yield seqs[i : i + size]


def mean_activations(model, seqs: list[list[int]], n_pos: int, batch_size: int) -> np.ndarray:
    """Mean residual-stream input of every block at the last `n_pos` positions: [n_pos, L, D].

    Sums are accumulated in float64 on the host, so the mean is exact to float32 inputs."""
    total = None
    for batch in _batches(seqs, batch_size):
        tokens, lengths = pad_right(batch)
        # Right padding: row b's post-instruction positions are lengths[b]-n_pos .. lengths[b]-1.
        index = (lengths[:, None] - n_pos + mx.arange(n_pos)[None, :])[:, :, None]

        def select(h, index=index):
            return mx.take_along_axis(h, index, axis=1).astype(mx.float32).sum(axis=0)

        with capture_layer_inputs(model, select) as sink:
            forward_hidden(model, tokens)  # lazily built; only the captures are evaluated
            acts = mx.stack(sink, axis=1)  # [n_pos, L, D]
        mx.eval(acts)
        part = np.array(acts, dtype=np.float64)
        total = part if total is None else total + part
    return (total / len(seqs)).astype(np.float32)


def refusal_scores(
    model, seqs: list[list[int]], refusal_ids: list[int], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: the log-odds that the response starts with a refusal token,
    log P(refusal) - log(1 - P(refusal)), and the full log-probs at that position."""
    scores, logps = [], []
    ref = mx.array(refusal_ids)
    for logits in last_logits_batches(model, seqs, batch_size):
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        p_ref = mx.exp(logp[:, ref]).sum(axis=-1)
        eps = 1e-8
        score = mx.log(p_ref + eps) - mx.log(1 - p_ref + eps)
        mx.eval(score, logp)
        scores.append(np.array(score))
        logps.append(np.array(logp))
    return np.concatenate(scores), np.concatenate(logps)


def kl_last(base_logp: np.ndarray, other_logp: np.ndarray) -> float:
    """Mean over prompts of KL(base || other) at the first response position (float64)."""
    p = np.exp(base_logp.astype(np.float64))
    return float((p * (base_logp.astype(np.float64) - other_logp)).sum(-1).mean())


@dataclass
class Candidate:
    position: int  # negative index into the post-instruction tokens
    layer: int
    bypass: float | None = None
    induce: float | None = None
    kl: float | None = None
    filtered: str | None = None

    def as_dict(self) -> dict:
        return {
            "position": self.position,
            "layer": self.layer,
            "bypass": self.bypass,
            "induce": self.induce,
            "kl": self.kl,
            "filtered": self.filtered,
        }


def _filter_reason(
    c: Candidate, kl_threshold: float, induce_threshold: float, max_layer: int
) -> str | None:
    if c.layer >= max_layer:
        return "last layers"
    if c.kl is not None and not c.kl <= kl_threshold:  # NaN fails too
        return "kl"
    if c.induce is not None and not c.induce >= induce_threshold:
        return "induce"
    return None


def select_direction(
    candidates: list[Candidate],
    kl_threshold: float,
    induce_threshold: float,
    max_layer: int,
    max_kl_relax: int = 5,
) -> tuple[Candidate, float | None]:
    """Arditi et al.'s rule: drop candidates whose ablation moves harmless KL above the
    threshold, whose steering does not induce refusal (score below the threshold), or that sit
    at or after `max_layer`; take the lowest refusal score under ablation (bypass).

    Small models are disrupted by any ablation, so when nothing passes, the KL threshold is
    doubled (up to `max_kl_relax` times) before giving up on it. Returns the choice and the KL
    threshold it passed (None: no candidate passed; the lowest-bypass early one is returned)."""
    scored = [c for c in candidates if c.bypass is not None]
    if not scored:
        raise SafeSteerError("no candidate direction was scored (check the layer/position options)")
    threshold = kl_threshold
    for _ in range(max_kl_relax + 1):
        passing = [
            c for c in scored if _filter_reason(c, threshold, induce_threshold, max_layer) is None
        ]
        if passing:
            break
        threshold *= 2
    for c in candidates:
        if c.filtered is None or c.filtered in ("kl", "induce", "last layers"):
            c.filtered = _filter_reason(c, kl_threshold, induce_threshold, max_layer)
    if passing:
        return min(passing, key=lambda c: c.bypass), threshold
    early = [c for c in scored if c.layer < max_layer] or scored
    return min(early, key=lambda c: c.bypass), None


def _generate_texts(loaded: LoadedModel, seqs, max_tokens: int, batch_size: int):
    from safesteer_mlx.generation import generate_batch

    return generate_batch(
        loaded.model, loaded.tokenizer, seqs, max_tokens=max_tokens, batch_size=batch_size
    )


def teacher_check(
    loaded: LoadedModel,
    direction: mx.array,
    layer: int,
    coef: float,
    seqs: list[list[int]],
    max_tokens: int,
    batch_size: int,
) -> dict:
    """Greedy completions of the steered teacher: refusal rate and fluency (share of
    completions that are not degenerate repetition)."""
    with steered(loaded.model, direction, layer, coef):
        gen = _generate_texts(loaded, seqs, max_tokens, batch_size)
    refused = [is_refusal(t) for t in gen.texts]
    fluent = [not is_degenerate(ids) for ids in gen.token_ids]
    return {
        "coef": coef,
        "refusal_rate": sum(refused) / len(refused),
        "fluent_rate": sum(fluent) / len(fluent),
        "examples": gen.texts[:3],
        "tokens_per_s": gen.generation_tps,
    }


def auto_coefficient(
    loaded: LoadedModel, direction, layer: int, seqs, max_tokens: int, batch_size: int, rep
) -> tuple[float, list[dict]]:
    """The smallest coefficient on the ladder whose teacher refuses at least 80% of harmless val
    prompts while at least 80% of its completions stay fluent; the best-refusing fluent one
    otherwise."""
    trials = []
    with rep.task("auto coefficient", total=len(COEF_LADDER)):
        for coef in COEF_LADDER:
            trial = teacher_check(loaded, direction, layer, coef, seqs, max_tokens, batch_size)
            trials.append(trial)
            rep.advance(coef=coef, refusal_rate=trial["refusal_rate"])
            if trial["refusal_rate"] >= AUTO_COEF_TARGET and trial["fluent_rate"] >= 0.8:
                return coef, trials
    fluent = [t for t in trials if t["fluent_rate"] >= 0.8] or trials
    best = max(fluent, key=lambda t: (t["refusal_rate"], -t["coef"]))
    return best["coef"], trials


def _filter_by_refusal(
    model, seqs: list[list[int]], ref_ids, batch_size: int, keep_positive: bool
) -> list[list[int]]:
    scores, _ = refusal_scores(model, seqs, ref_ids, batch_size)
    keep = scores > 0 if keep_positive else scores < 0
    return [s for s, k in zip(seqs, keep) if k]


def run_direction(
    config: Config,
    run,
    *,
    loaded: LoadedModel | None = None,
    progress: Callback | None = None,
    force: bool = False,
) -> dict:
    """Stage 1 over a run directory: write `direction.safetensors` and `direction.json`
    (and a PNG of the scores), or return the existing result when its inputs are unchanged."""
    import json

    from safesteer_mlx.modeling import load_configured
    from safesteer_mlx.run import atomic_path, atomic_write_json, input_hash

    rep = Reporter("direction", progress)
    d = config.direction
    sets = load_prompt_sets(config)
    coef_setting = d.coef.strip().lower()
    if coef_setting != "auto":
        try:
            float(coef_setting)
        except ValueError:
            raise SafeSteerError(f"--coef {d.coef!r} is not a number or 'auto'") from None
    if d.positions not in ("all", "last"):
        raise SafeSteerError(f"direction.positions = {d.positions!r} (use 'all' or 'last')")
    if loaded is None:
        rep.log(f"loading {config.model.name}")
        loaded = load_configured(config.model)
    inputs = input_hash(
        "direction-v1",
        config.section("direction"),
        config.section("data"),
        config.seed,
        loaded.identity,
        loaded.adapter_path,
        [[p.instruction for p in s] for s in vars(sets).values()],
    )
    artifacts = [run.direction_tensors, run.direction_json]
    if not force and run.is_current("direction", inputs, artifacts):
        rep.log("direction is up to date; skipping (use --force to redo)")
        return json.loads(run.direction_json.read_text())

    model = loaded.model
    rep.start(f"finding the refusal direction of {loaded.source}")
    with run.stage_run("direction", inputs) as stats:
        system = config.data.system_prompt
        bs = d.batch_size
        harmful_train = encode_prompts(loaded, sets.harmful_train, system)
        harmless_train = encode_prompts(loaded, sets.harmless_train, system)
        harmful_val = encode_prompts(loaded, sets.harmful_val, system)
        harmless_val = encode_prompts(loaded, sets.harmless_val, system)
        eoi = post_instruction_tokens(loaded, system)
        n_pos = len(eoi) if d.positions == "all" else 1
        ref_ids = refusal_token_ids(loaded.tokenizer)
        n_layers = loaded.num_layers

        filtered_counts = None
        if d.filter_train:
            kept_h = _filter_by_refusal(model, harmful_train, ref_ids, bs, keep_positive=True)
            kept_s = _filter_by_refusal(model, harmless_train, ref_ids, bs, keep_positive=False)
            filtered_counts = {"harmful": len(kept_h), "harmless": len(kept_s)}
            if min(len(kept_h), len(kept_s)) < 8:
                rep.warn(
                    f"refusal-score filter kept only {len(kept_h)} harmful / {len(kept_s)} "
                    "harmless train prompts; using all train prompts instead"
                )
            else:
                harmful_train, harmless_train = kept_h, kept_s

        t0 = time.perf_counter()
        n_collect = len(harmful_train) + len(harmless_train)
        with rep.task("activations", total=2):
            mean_harmful = mean_activations(model, harmful_train, n_pos, bs)
            rep.advance()
            mean_harmless = mean_activations(model, harmless_train, n_pos, bs)
            rep.advance()
        collect_s = time.perf_counter() - t0
        # r[p, l] = mean harmful - mean harmless; p indexes the last n_pos template positions
        mean_diffs = mean_harmful - mean_harmless

        base_harmful, _ = refusal_scores(model, harmful_val, ref_ids, bs)
        base_harmless, base_harmless_logp = refusal_scores(model, harmless_val, ref_ids, bs)

        max_layer = int(n_layers * d.max_layer_fraction)
        positions = [d.position] if d.position is not None else list(range(-n_pos, 0))
        layers = [d.layer] if d.layer is not None else list(range(n_layers))
        for p in positions:
            if not -n_pos <= p < 0:
                raise SafeSteerError(f"position {p} out of range (-{n_pos}..-1)")
        for layer in layers:
            if not 0 <= layer < n_layers:
                raise SafeSteerError(f"layer {layer} out of range (0..{n_layers - 1})")
        candidates = [Candidate(p, layer) for p in positions for layer in layers]
        to_score = [c for c in candidates if c.layer < max_layer or d.layer is not None]
        for c in candidates:
            if c not in to_score:
                c.filtered = "last layers"
        # A position whose token and context are the same for every prompt (e.g. the first
        # template token at the embedding layer) has no difference of means to steer with.
        norms = np.linalg.norm(mean_diffs, axis=-1)
        for c in list(to_score):
            if norms[c.position + n_pos, c.layer] <= 1e-6 * max(float(norms.max()), 1e-30):
                c.filtered = "zero norm"
                to_score.remove(c)

        t0 = time.perf_counter()
        n_h = len(harmful_val)
        with rep.task("scoring candidates", total=len(to_score)):
            for c in to_score:
                r = mx.array(mean_diffs[c.position + n_pos, c.layer])
                with ablated(model, r):
                    scores, logps = refusal_scores(model, harmful_val + harmless_val, ref_ids, bs)
                c.bypass = float(scores[:n_h].mean())
                c.kl = kl_last(base_harmless_logp, logps[n_h:])
                with steered(model, r, c.layer, 1.0):
                    induce, _ = refusal_scores(model, harmless_val, ref_ids, bs)
                c.induce = float(induce.mean())
                if not all(np.isfinite([c.bypass, c.kl, c.induce])):
                    c.filtered = "non-finite score"
                    c.bypass = None
                rep.advance(layer=c.layer, position=c.position, bypass=c.bypass)
        score_s = time.perf_counter() - t0
        n_scored = len(to_score) * (len(harmful_val) + 2 * len(harmless_val))

        chosen, kl_used = select_direction(
            candidates, d.kl_threshold, d.induce_threshold, max_layer
        )
        if kl_used is None:
            rep.warn(
                "no candidate passed the filters (KL, induce, layer) even with a relaxed KL "
                "threshold; taking the best refusal drop among the early layers"
            )
        elif kl_used > d.kl_threshold:
            rep.warn(
                f"no candidate kept harmless KL under {d.kl_threshold:g} when ablated; "
                f"relaxed the threshold to {kl_used:g}"
            )
        direction = mx.array(mean_diffs[chosen.position + n_pos, chosen.layer])
        norm = float(mx.linalg.norm(direction))

        trials: list[dict] = []
        if coef_setting == "auto":
            coef, trials = auto_coefficient(
                loaded, direction, chosen.layer, harmless_val, d.check_tokens, bs, rep
            )
            teacher = next(t for t in trials if t["coef"] == coef)
        else:
            coef = float(coef_setting)
            rep.log("checking the steered teacher on harmless val prompts")
            teacher = teacher_check(
                loaded, direction, chosen.layer, coef, harmless_val, d.check_tokens, bs
            )
        rep.log("checking the base model on harmful val prompts")
        base_gen = _generate_texts(loaded, harmful_val, d.check_tokens, bs)
        base_harmful_rate = sum(is_refusal(t) for t in base_gen.texts) / len(base_gen.texts)

        warnings = []
        if base_harmful_rate < MIN_BASE_HARMFUL_REFUSAL:
            warnings.append(
                f"the base model refuses only {base_harmful_rate:.0%} of harmful val prompts: "
                "it shows too little refusal behaviour for SafeSteer to work well (the paper's "
                "first limitation); consider a safety-tuned model"
            )
        if teacher["refusal_rate"] < 0.5:
            hint = " (try --coef auto)" if coef_setting != "auto" else ""
            warnings.append(
                f"the steered teacher refuses only {teacher['refusal_rate']:.0%} of harmless "
                f"val prompts at coefficient {coef:g}{hint}"
            )
        for w in warnings:
            rep.warn(w)

        tensors = {"direction": direction, "mean_diffs": mx.array(mean_diffs)}
        with atomic_path(run.direction_tensors) as tmp:
            mx.save_safetensors(str(tmp), tensors, metadata={"layer": str(chosen.layer)})
        plotted = plot_direction_scores(run.direction_plot, candidates, chosen)
        result = {
            "layer": chosen.layer,
            "position": chosen.position,
            "coefficient": coef,
            "coefficient_setting": d.coef,
            "norm": norm,
            "num_layers": n_layers,
            "hidden_size": loaded.hidden_size,
            "post_instruction_tokens": eoi,
            "post_instruction_text": loaded.tokenizer.decode(eoi),
            "refusal_token_ids": ref_ids,
            "refusal_tokens": [loaded.tokenizer.decode([i]) for i in ref_ids],
            "chosen_scores": chosen.as_dict(),
            "passed_filters": kl_used is not None,
            "filters": {
                "kl_threshold": d.kl_threshold,
                "kl_threshold_used": kl_used,
                "induce_threshold": d.induce_threshold,
                "max_layer_fraction": d.max_layer_fraction,
                "max_layer": max_layer,
            },
            "baseline": {
                "harmful_val_refusal_score": float(base_harmful.mean()),
                "harmless_val_refusal_score": float(base_harmless.mean()),
            },
            "premise": {
                "teacher_harmless_refusal_rate": teacher["refusal_rate"],
                "teacher_fluent_rate": teacher["fluent_rate"],
                "base_harmful_refusal_rate": base_harmful_rate,
                "check_tokens": d.check_tokens,
                "teacher_examples": teacher["examples"],
                "warnings": warnings,
            },
            "coefficient_trials": [{k: v for k, v in t.items() if k != "examples"} for t in trials],
            "prompts": {
                "harmful_train": len(harmful_train),
                "harmless_train": len(harmless_train),
                "harmful_val": len(harmful_val),
                "harmless_val": len(harmless_val),
                "filtered_train": filtered_counts,
            },
            "plot": run.direction_plot.name if plotted else None,
            "candidates": [c.as_dict() for c in candidates],
        }
        atomic_write_json(run.direction_json, result)
        stats.update(
            collect_prompts_per_s=round(n_collect / collect_s, 2),
            score_prompts_per_s=round(n_scored / max(score_s, 1e-9), 2),
            candidates_scored=len(to_score),
            generation_tokens_per_s=round(teacher["tokens_per_s"], 2),
        )
    rep.result(
        f"layer {chosen.layer}, position {chosen.position}, coefficient {coef:g}: teacher refuses "
        f"{teacher['refusal_rate']:.0%} of harmless val prompts; base refuses "
        f"{base_harmful_rate:.0%} of harmful val prompts",
        **{k: result[k] for k in ("layer", "position", "coefficient", "norm")},
    )
    return result


def load_direction(path) -> tuple[mx.array, dict]:
    """A saved direction and the direction.json beside it."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise SafeSteerError(f"steering file not found: {path} (give a direction.safetensors)")
    meta_path = path.with_suffix(".json")
    if not meta_path.exists():
        raise SafeSteerError(f"{meta_path} is missing (it records the layer and coefficient)")
    try:
        tensors = mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise SafeSteerError(f"cannot read {path}: {e} (give a direction.safetensors)") from None
    if "direction" not in tensors:
        raise SafeSteerError(f"{path} has no 'direction' tensor")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta["layer"], meta["coefficient"] = int(meta["layer"]), float(meta["coefficient"])
    except (ValueError, KeyError, TypeError):
        raise SafeSteerError(f"{meta_path} has no valid 'layer' and 'coefficient'") from None
    return tensors["direction"], meta
