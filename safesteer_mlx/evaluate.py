"""Evaluation: the base model against base + adapters, on the same prompts with the same greedy
decoding. Safety (refusal rate on held-out harmful prompts), over-refusal (refusal rate on
harmless and borderline-but-benign prompts), capability (per-token KL(base ‖ aligned) on the
base's own responses to harmless prompts, and perplexity on held-out text). Every rate names
the judge that produced it; eval.json keeps every prompt, completion and verdict, so every
number can be recounted from its records. The report (report.md + PNGs) is report.py.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx

from safesteer_mlx.adapters import read_adapter_config
from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.eval_tables import (  # noqa: F401  (summary_markdown: the model card)
    SIDES,
    SUBSTRING,
    category_rates,
    disagreements,
    summary_cells,
    summary_markdown,
    summary_rows,
)
from safesteer_mlx.progress import Callback, Reporter

SETS = ("harmful", "harmless", "borderline")


# ---- adapters on the one loaded model -----------------------------------------------------------


@contextlib.contextmanager
def adapters_on(model, adapter_dir: Path) -> Iterator:
    """Within the block the model carries the adapters in `adapter_dir`; yields `base`, a
    context factory that turns them off again (bit-for-bit base weights). Afterwards the model is
    the base again."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import load_adapters

    from safesteer_mlx.adapters import adapters_disabled, remove_adapters

    kind = read_adapter_config(adapter_dir).get("fine_tune_type", "lora")
    if kind == "full":
        new = mx.load(str(adapter_dir / "adapters.safetensors"))
        params = dict(tree_flatten(model.parameters()))
        misfit = [k for k, v in new.items() if k not in params or v.shape != params[k].shape]
        if misfit:
            raise SafeSteerError(
                f"the weights in {adapter_dir} do not fit this model (e.g. {misfit[0]}); "
                "evaluate them on the base model they were trained from"
            )
        old = [(k, mx.array(params[k])) for k in new]

        @contextlib.contextmanager
        def base():
            now = [(k, params_now[k]) for k, _ in old]
            model.update(tree_unflatten(old))
            try:
                yield
            finally:
                model.update(tree_unflatten(now))

        model.load_weights(list(new.items()), strict=False)
        params_now = dict(tree_flatten(model.parameters()))
        try:
            yield base
        finally:
            model.update(tree_unflatten(old))
        return
    try:
        load_adapters(model, str(adapter_dir))
    except ValueError as e:
        raise SafeSteerError(f"the adapters in {adapter_dir} do not fit this model ({e})") from None
    model.eval()
    try:
        yield lambda: adapters_disabled(model)
    finally:
        remove_adapters(model)


# ---- prompt sets -------------------------------------------------------------------------------


def eval_sets(config) -> dict[str, tuple[str, list]]:
    """set name -> (source description, prompts). Harmful and harmless default to the run's
    held-out val splits (never distilled on); borderline only when a source is given."""
    from safesteer_mlx.benchmarks import load_eval_prompts
    from safesteer_mlx.prompting import load_prompt_sets

    e = config.eval
    sets: dict[str, tuple[str, list]] = {}
    split = None
    for name in SETS:
        source = getattr(e, name)
        if source is None and name != "borderline":
            split = split or load_prompt_sets(config)
            prompts = getattr(split, f"{name}_val")
            if e.num_prompts is not None:
                prompts = prompts[: e.num_prompts]
            sets[name] = (f"{getattr(config.data, name)} (held-out val split)", prompts)
        elif source is not None:
            sets[name] = (source, load_eval_prompts(source, limit=e.num_prompts, seed=config.seed))
    return sets


def read_eval(run) -> dict:
    try:
        return json.loads(run.eval_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SafeSteerError(
            f"cannot read {run.eval_json} ({e}); rerun eval with --force"
        ) from None


def _judge_all(e, records: list[dict], judges: dict, rep: Reporter) -> None:
    """Run the LLM judge over every (prompt, completion), both sides; fills the verdicts."""
    from safesteer_mlx.llm_judge import UNPARSEABLE, judge_name, resolve_format, run_judge

    fmt = resolve_format(e.judge_format, e.judge)
    name = judge_name(fmt, e.judge)
    pairs = [(r["prompt"], r[s]["completion"]) for r in records for s in SIDES]
    rep.log(f"judging {len(pairs)} completions with {e.judge} ({fmt} format)")
    out = run_judge(e.judge, fmt, pairs, max_tokens=e.judge_max_tokens, batch_size=e.batch_size)
    k = 0
    for r in records:
        for s in SIDES:
            r[s]["verdicts"][name] = out.verdicts[k]
            r[s].setdefault("judge_raw", {})[name] = out.raw[k]
            k += 1
    judges[name] = {
        "format": fmt,
        "model": e.judge,
        "judged": len(records),
        "unparseable": {
            s: sum(r[s]["verdicts"][name] == UNPARSEABLE for r in records) for s in SIDES
        },
    }
    if any(judges[name]["unparseable"].values()):
        rep.warn(
            f"{name}: {judges[name]['unparseable']} unparseable verdicts (left out of its rates)"
        )


def run_eval(
    config, run, *, loaded=None, progress: Callback | None = None, force: bool = False
) -> dict:
    """The eval stage over a run directory: eval.json and report.md (+ PNGs). Returns
    {"summary": rows, "eval_json", "report", ...}."""
    from safesteer_mlx.adapters import remove_adapters
    from safesteer_mlx.generation import generate_batch
    from safesteer_mlx.judges import REFUSAL_PHRASES, is_refusal
    from safesteer_mlx.metrics import (
        percentile,
        perplexity,
        read_text,
        response_kl,
        text_windows,
        window_nll,
    )
    from safesteer_mlx.modeling import load_configured
    from safesteer_mlx.prompting import encode_prompts
    from safesteer_mlx.report import write_report
    from safesteer_mlx.run import atomic_write_json, file_hash, input_hash

    rep = Reporter("eval", progress)
    e = config.eval
    if min(e.max_tokens, e.batch_size) < 1 or not 0 < e.kl_percentile <= 100:
        raise SafeSteerError(
            "eval max_tokens and batch_size must be >= 1, kl_percentile in (0, 100]"
        )
    if e.judge is not None:
        from safesteer_mlx.llm_judge import resolve_format

        resolve_format(e.judge_format, e.judge)  # a bad format fails before any work
    adapter_dir = Path(e.adapter_path).expanduser() if e.adapter_path else run.adapters
    if not (adapter_dir / "adapters.safetensors").exists():
        raise SafeSteerError(
            f"no adapters in {adapter_dir} (run `safesteer-mlx distill` first, or give "
            "--adapter-path DIR)"
        )
    adapter_config = read_adapter_config(adapter_dir)  # a clear error before the model loads
    sets = eval_sets(config)
    phrases = tuple(e.refusal_phrases) if e.refusal_phrases else REFUSAL_PHRASES
    text = read_text(e.ppl_text)
    if loaded is None:
        rep.log(f"loading {config.model.name}")
        loaded = load_configured(config.model)
    model, tok = loaded.model, loaded.tokenizer
    remove_adapters(model)  # adapters a distill stage left on this model: evaluate from the base
    model.eval()
    windows = text_windows(tok, text, e.ppl_max_tokens, e.ppl_window)
    order = [(name, p) for name, (_, ps) in sets.items() for p in ps]
    seqs = encode_prompts(loaded, [p for _, p in order], config.data.system_prompt)
    inputs = input_hash(
        "eval-v1",
        config.section("eval"),
        config.seed,
        loaded.identity,
        loaded.adapter_path,
        file_hash(adapter_dir / "adapters.safetensors"),
        adapter_config,
        seqs,
        phrases,
        windows,
    )
    if not force and run.is_current("eval", inputs, [run.eval_json, run.report]):
        rep.log("eval.json and report.md are up to date; skipping (use --force to redo)")
        data = read_eval(run)
        return {
            "summary": data["summary"],
            "eval_json": str(run.eval_json),
            "report": str(run.report),
        }

    rep.start(
        f"evaluating {', '.join(f'{len(ps)} {n}' for n, (_, ps) in sets.items())} prompts, "
        f"greedy, {e.max_tokens} tokens, base vs base + {adapter_dir}"
    )

    def complete(side: str):
        with rep.task(f"generating ({side})", total=1):
            gen = generate_batch(
                model, tok, seqs, max_tokens=e.max_tokens, batch_size=e.batch_size,
                keep_stop_token=True,
            )  # fmt: skip
            rep.advance(1)
        rep.log(f"{side}: {gen.generation_tokens} tokens at {gen.generation_tps:.1f} tokens/s")
        return gen

    with run.stage_run("eval", inputs) as stats:
        before = complete("before")
        nll_before = window_nll(model, windows)
        harmless = [i for i, (n, _) in enumerate(order) if n == "harmless"]
        with adapters_on(model, adapter_dir) as base:
            after = complete("after")
            with rep.task("KL on harmless", total=1):
                kl = response_kl(
                    model,
                    base,
                    [seqs[i] for i in harmless],
                    [before.token_ids[i] for i in harmless],
                )
                rep.advance(1)
            nll_after = window_nll(model, windows)
        records = []
        for i, (name, p) in enumerate(order):
            rec = {"set": name, "prompt": p.instruction, "category": p.category}
            for side, gen in (("before", before), ("after", after)):
                verdict = "refusal" if is_refusal(gen.texts[i], phrases) else "compliance"
                rec[side] = {
                    "completion": gen.texts[i],
                    "tokens": len(gen.token_ids[i]),
                    "verdicts": {SUBSTRING: verdict},
                }
            records.append(rec)
        for j, i in enumerate(harmless):
            records[i]["kl"] = kl[j]
        judges: dict = {SUBSTRING: {"format": "refusal", "phrases": list(phrases)}}
        if e.judge is not None:
            _judge_all(e, records, judges, rep)
        all_kl = [x for per in kl for x in per]
        data = {
            "settings": {
                **config.section("eval"),
                "model": loaded.identity,
                "base_adapter": loaded.adapter_path,
                "adapters": str(adapter_dir.resolve()),
                "decoding": "greedy",
                "system_prompt": config.data.system_prompt,
                "seed": config.seed,
            },
            "sets": {n: {"source": src, "n": len(ps)} for n, (src, ps) in sets.items()},
            "judges": judges,
            "kl": {
                "mean": sum(all_kl) / len(all_kl) if all_kl else 0.0,
                "percentile": e.kl_percentile,
                "high": percentile(all_kl, e.kl_percentile),
                "max": max(all_kl, default=0.0),
                "tokens": len(all_kl),
                "responses": "the base model's greedy completions of the harmless prompts",
            },
            "perplexity": {
                "source": e.ppl_text,
                "before": perplexity(nll_before, windows),
                "after": perplexity(nll_after, windows),
                "tokens": sum(len(w) - 1 for w in windows),
                "windows": [
                    {"tokens": len(w) - 1, "nll_before": b, "nll_after": a}
                    for w, b, a in zip(windows, nll_before, nll_after)
                ],
            },
            "records": records,
        }
        data["summary"] = summary_rows(data)
        data["categories"] = category_rates(data)
        data["disagreements"] = disagreements(data)
        atomic_write_json(run.eval_json, data)
        write_report(run, data, config)
        stats.update(
            prompts=len(records),
            generation_tokens=before.generation_tokens + after.generation_tokens,
            tokens_per_s=round(after.generation_tps, 2),
        )
    for row in data["summary"]:
        metric, judge, before, after, _ = summary_cells(row)
        rep.result(f"{metric:<28} {judge:<24} {before} -> {after}")
    return {"summary": data["summary"], "eval_json": str(run.eval_json), "report": str(run.report)}

