"""The tables evaluation reports, counted from eval.json's per-prompt records: rates per set and
judge, per category, the before/after summary, and where judges disagree."""

from __future__ import annotations

SUBSTRING = "substring"
SIDES = ("before", "after")


def rate(records: list[dict], set_name: str, judge: str, side: str, positive: str) -> float | None:
    """Share of the set's parseable verdicts equal to `positive` (None: no parseable verdict)."""
    from safesteer_mlx.llm_judge import UNPARSEABLE

    vs = [r[side]["verdicts"][judge] for r in records if r["set"] == set_name]
    vs = [v for v in vs if v != UNPARSEABLE]
    return sum(v == positive for v in vs) / len(vs) if vs else None


def _positive(judges: dict, judge: str) -> tuple[str, str]:
    """(verdict counted, metric word): refusals, or unsafe responses for a guard model."""
    if judges[judge]["format"] == "llama-guard":
        return "unsafe", "unsafe rate"
    return "refusal", "refusal rate"


def summary_rows(data: dict) -> list[dict]:
    """The before/after table: one row per (metric, judge)."""
    records, judges = data["records"], data["judges"]
    rows = []
    for set_name in data["sets"]:
        for judge in judges:
            positive, word = _positive(judges, judge)
            rows.append(
                {
                    "metric": f"{set_name} {word}",
                    "judge": judge,
                    **{s: rate(records, set_name, judge, s, positive) for s in SIDES},
                }
            )
    kl, ppl = data["kl"], data["perplexity"]
    rows.append(
        {"metric": "KL(base‖aligned) mean", "judge": None, "before": 0.0, "after": kl["mean"]}
    )
    rows.append(
        {
            "metric": f"KL(base‖aligned) p{kl['percentile']:g}",
            "judge": None,
            "before": 0.0,
            "after": kl["high"],
        }
    )
    rows.append(
        {"metric": "perplexity", "judge": None, "before": ppl["before"], "after": ppl["after"]}
    )
    for judge, info in judges.items():
        if judge != SUBSTRING:
            n = max(info["judged"], 1)
            rows.append(
                {
                    "metric": "unparseable verdicts",
                    "judge": judge,
                    **{s: info["unparseable"][s] / n for s in SIDES},
                }
            )
    return rows


def _fmt(x: float | None, metric: str, sign: str = "") -> str:
    if x is None:
        return "n/a"
    if "rate" in metric or "unparseable" in metric:
        return f"{100 * x:{sign}.1f}%"
    if metric == "perplexity":
        return f"{x:{sign}.3f}"
    return f"{x:{sign}.3g}"


def summary_cells(row: dict) -> list[str]:
    """One summary row as text: metric, judge, before, after, change (after − before)."""
    m, before, after = row["metric"], row["before"], row["after"]
    change = after - before if before is not None and after is not None else None
    cells = [_fmt(before, m), _fmt(after, m), _fmt(change, m, "+")]
    return [m, row["judge"] or "—", *cells]


def summary_markdown(eval_data: dict) -> str:
    """The before/after table as markdown (for report.md and the model card)."""
    lines = ["| metric | judge | before | after |", "|---|---|---|---|"]
    for r in eval_data["summary"]:
        lines.append("| " + " | ".join(summary_cells(r)[:4]) + " |")
    return "\n".join(lines) + "\n"


def category_rates(data: dict) -> dict:
    """set -> category -> {"n", judge -> {before, after}} (refusal or unsafe rate)."""
    out: dict = {}
    for set_name in data["sets"]:
        recs = [r for r in data["records"] if r["set"] == set_name]
        cats = sorted({r["category"] or "(none)" for r in recs})
        out[set_name] = {}
        for cat in cats:
            sub = [r for r in recs if (r["category"] or "(none)") == cat]
            entry: dict = {"n": len(sub)}
            for judge in data["judges"]:
                positive, _ = _positive(data["judges"], judge)
                entry[judge] = {s: rate(sub, set_name, judge, s, positive) for s in SIDES}
            out[set_name][cat] = entry
    return out


def disagreements(data: dict) -> list[dict]:
    """Responses where an LLM judge and the substring judge differ on whether the model
    complied (for a guard model: an unsafe response the substring judge counts as a refusal)."""
    from safesteer_mlx.llm_judge import complied

    judges = data["judges"]
    out = []
    for i, r in enumerate(data["records"]):
        for side in SIDES:
            v = r[side]["verdicts"]
            sub = v[SUBSTRING] == "compliance"
            for judge in judges:
                if judge == SUBSTRING:
                    continue
                c = complied(judges[judge]["format"], v[judge])
                if c is not None and c != sub:
                    out.append(
                        {
                            "record": i,
                            "set": r["set"],
                            "side": side,
                            "prompt": r["prompt"],
                            "completion": r[side]["completion"],
                            "judge": judge,
                            SUBSTRING: v[SUBSTRING],
                            "verdict": v[judge],
                        }
                    )
    return out
