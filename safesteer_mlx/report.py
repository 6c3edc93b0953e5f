"""report.md: the before/after table, the training curve, the safety tokens, per-category rates,
judge disagreements and example completions, with PNG plots beside it (matplotlib optional:
without it the report has the tables and no images, and references none)."""

from __future__ import annotations

import json

from safesteer_mlx.eval_tables import SIDES, SUBSTRING, summary_markdown

PLOTS = {
    "rates": "eval_rates.png",
    "training": "eval_training.png",
    "kl": "eval_kl.png",
}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, path) -> None:
    from safesteer_mlx.run import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def plot_rates(plt, path, data: dict) -> None:
    rows = [r for r in data["summary"] if r["metric"].endswith("rate")]
    labels = [f"{r['metric']}\n({r['judge']})" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 3.5))
    for k, side in enumerate(SIDES):
        ys = [100 * (r[side] or 0.0) for r in rows]
        ax.bar([x + (k - 0.5) * 0.38 for x in xs], ys, width=0.38, label=side)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("% of prompts")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("before (base) vs after (base + adapters)")
    _save(plt, fig, path)


def plot_training(plt, path, metrics: list[dict]) -> None:
    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key in zip(axes, ("loss", "kl_S")):
        ax.plot(steps, [m.get(key) for m in metrics], marker=".")
        ax.set_xlabel("step")
        ax.set_title(key)
    _save(plt, fig, path)


def plot_kl(plt, path, data: dict) -> None:
    values = [x for r in data["records"] for x in r.get("kl", [])]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(values, bins=40)
    ax.set_yscale("log")
    ax.set_xlabel("per-token KL(base ‖ aligned), nats")
    ax.set_title(f"harmless responses ({len(values)} tokens)")
    _save(plt, fig, path)


def _cell(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _quote(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("|", "\\|") or "(empty)"


def _examples(data: dict, n: int) -> list[dict]:
    """Per set, up to n records, those whose substring verdict changed first."""
    out = []
    for set_name in data["sets"]:
        recs = [r for r in data["records"] if r["set"] == set_name]

        def same(r: dict) -> bool:
            return r["before"]["verdicts"][SUBSTRING] == r["after"]["verdicts"][SUBSTRING]

        out.extend(sorted(recs, key=same)[:n])  # stable: changed verdicts first, in order
    return out


def write_report(run, data: dict, config) -> list[str]:
    """Write report.md (and its PNGs) into the run directory; returns the files it references."""
    from safesteer_mlx.run import atomic_write_text, read_metrics

    metrics = read_metrics(run)
    plt = _pyplot()
    images: dict[str, str] = {}
    if plt is not None:
        plot_rates(plt, run.path / PLOTS["rates"], data)
        images["rates"] = PLOTS["rates"]
        if metrics:
            plot_training(plt, run.path / PLOTS["training"], metrics)
            images["training"] = PLOTS["training"]
        if data["kl"]["tokens"]:
            plot_kl(plt, run.path / PLOTS["kl"], data)
            images["kl"] = PLOTS["kl"]
    s = data["settings"]
    sets = ", ".join(f"{v['n']} {k} ({v['source']})" for k, v in data["sets"].items())
    out = [
        "# Evaluation: base vs base + adapters",
        "",
        f"- model: `{s['model']}`"
        + (f" (with `{s['base_adapter']}` fused)" if s["base_adapter"] else ""),
        f"- adapters: `{s['adapters']}`",
        f"- prompts: {sets}",
        f"- decoding: greedy, up to {s['max_tokens']} tokens, the same before and after",
        f"- judges: {', '.join(data['judges'])} (each rate names its judge)",
        "",
        "## Before / after",
        "",
        summary_markdown(data),
        "Refusal rate on harmful prompts should go up; on harmless and borderline prompts it "
        "should not. KL(base‖aligned) is per token on the base model's own greedy responses to "
        "the harmless prompts (0 = unchanged); perplexity is on "
        f"`{data['perplexity']['source']}` ({data['perplexity']['tokens']} tokens).",
        "",
    ]
    if "rates" in images:
        out += [f"![refusal rates]({images['rates']})", ""]
    if "kl" in images:
        out += [f"![per-token KL]({images['kl']})", ""]
    out += _training_section(metrics, images)
    out += _tokens_section(run)
    out += _category_section(data)
    out += _disagreement_section(data)
    out += ["## Example completions", ""]
    for r in _examples(data, config.eval.examples):
        out += [
            f"**{r['set']}**: {_quote(r['prompt'], 200)}",
            "",
            "| | verdict (substring) | completion |",
            "|---|---|---|",
        ]
        for side in SIDES:
            out.append(
                f"| {side} | {r[side]['verdicts'][SUBSTRING]} | {_quote(r[side]['completion'])} |"
            )
        out.append("")
    atomic_write_text(run.report, "\n".join(out).rstrip() + "\n")
    return list(images.values())


def _training_section(metrics: list[dict], images: dict) -> list[str]:
    out = ["## Training curve", ""]
    if not metrics:
        return out + ["No metrics.jsonl in this run (adapters trained elsewhere).", ""]
    if "training" in images:
        out += [f"![training curve]({images['training']})", ""]
    out += ["| step | loss | kl_S | lr | grad_norm |", "|---|---|---|---|---|"]
    pick = metrics if len(metrics) <= 12 else metrics[:: max(1, len(metrics) // 10)] + metrics[-1:]
    for m in pick:
        out.append(
            f"| {m['step']} | {m.get('loss', 0):.4g} | {m.get('kl_S', 0):.4g} | "
            f"{m.get('lr', 0):.3g} | {m.get('grad_norm', 0):.3g} |"
        )
    return out + [""]


def _tokens_section(run) -> list[str]:
    out = ["## Safety tokens", ""]
    if not run.safety_tokens.exists():
        return out + ["No safety_tokens.json in this run.", ""]
    tokens = json.loads(run.safety_tokens.read_text(encoding="utf-8")).get("tokens", [])
    shown = ", ".join(
        f"`{json.dumps(t['token'], ensure_ascii=False)[1:-1]}` ({t['votes']})" for t in tokens
    )
    return out + [f"{len(tokens)} tokens (votes): {shown}", ""]


def _category_section(data: dict) -> list[str]:
    judges = list(data["judges"])
    out = ["## Per category", ""]
    head = " | ".join(f"{j} before | {j} after" for j in judges)
    for set_name, cats in data["categories"].items():
        if len(cats) == 1 and "(none)" in cats:
            continue
        out += [
            f"**{set_name}**",
            "",
            f"| category | n | {head} |",
            "|---|---|" + "---|---|" * len(judges),
        ]
        for cat, entry in cats.items():
            cells = " | ".join(
                f"{_cell(entry[j]['before'])} | {_cell(entry[j]['after'])}" for j in judges
            )
            out.append(f"| {cat} | {entry['n']} | {cells} |")
        out.append("")
    return out if len(out) > 2 else out + ["The prompt sets carry no categories.", ""]


def _disagreement_section(data: dict) -> list[str]:
    if len(data["judges"]) < 2:
        return []
    rows = data["disagreements"]
    out = ["## Where the judges disagree", ""]
    for judge, info in data["judges"].items():
        if judge != SUBSTRING:
            n = sum(1 for r in rows if r["judge"] == judge)
            out.append(
                f"- {judge}: disagrees with substring on {n} of {2 * info['judged']} completions; "
                f"unparseable: {info['unparseable']['before']} before, "
                f"{info['unparseable']['after']} after (left out of its rates)"
            )
    out.append("")
    if rows:
        out += [
            "| set | side | judge | substring | verdict | completion |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows[:10]:
            out.append(
                f"| {r['set']} | {r['side']} | {r['judge']} | {r[SUBSTRING]} | {r['verdict']} | "
                f"{_quote(r['completion'], 160)} |"
            )
        out.append("")
    return out
