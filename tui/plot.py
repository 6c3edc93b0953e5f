"""The per-layer plot of stage 1's candidate scores, drawn with block characters (no plotting
dependency). Rendering only: the scores come from direction.json."""

from __future__ import annotations

BLOCKS = " ▁▂▃▄▅▆▇█"


def _column(value: float, low: float, high: float, height: int) -> list[str]:
    """One bar, top row first, in eighths of a cell."""
    frac = 0.0 if high <= low else (value - low) / (high - low)
    eighths = round(max(0.0, min(1.0, frac)) * height * 8)
    cells = []
    for row in range(height):
        filled = eighths - row * 8
        cells.append(BLOCKS[max(0, min(8, filled))])
    return cells[::-1]


def _sparkline(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "·" * len(values)
    low, high = min(known), max(known)
    out = []
    for v in values:
        if v is None:
            out.append("·")
        else:
            frac = 0.0 if high <= low else (v - low) / (high - low)
            out.append(BLOCKS[1 + round(frac * 7)])
    return "".join(out)


def layer_plot(meta: dict, height: int = 5, width: int = 72) -> str:
    """Bars, one column group per layer (`width` characters in all): the refusal-score drop
    when the layer's candidate at the chosen position is ablated from harmful prompts
    (baseline - bypass; taller = removes more refusal), shaded `░` where it fails a filter at the
    configured thresholds (the selection may have relaxed the KL one: noted), `·` at the foot
    where it was not scored; the chosen layer marked `^`. Rows below: induce
    (refusal score when steering harmless prompts) and KL (harmless drift under ablation) as
    sparklines."""
    position = meta["position"]
    by_layer = {c["layer"]: c for c in meta.get("candidates", []) if c["position"] == position}
    layers = list(range(meta.get("num_layers", max(by_layer, default=-1) + 1)))
    base = meta.get("baseline", {}).get("harmful_val_refusal_score", 0.0)
    drops = [
        base - by_layer[i]["bypass"] if by_layer.get(i, {}).get("bypass") is not None else None
        for i in layers
    ]
    known = [d for d in drops if d is not None]
    if not known:
        return "no scored candidates"
    low, high = min(0.0, *known), max(known)
    cols = [_column(d, low, high, height) if d is not None else [" "] * height for d in drops]
    for i, d in enumerate(drops):
        if d is not None and by_layer[i].get("filtered"):
            cols[i] = ["░" if ch != " " else " " for ch in cols[i]]
        if cols[i][-1] == " ":
            cols[i][-1] = "·"
    w = max(1, min(3, (width - 8) // max(len(layers), 1)))  # characters per layer
    labels = [f"{high:>7.2f} "] + ["        "] * (height - 2) + [f"{low:>7.2f} "]
    lines = [labels[r] + "".join(c[r] * w for c in cols) for r in range(height)]
    # the tens digit under every tenth layer, `|` under every fifth
    ticks = "".join(
        (str(i // 10 % 10) if i % 10 == 0 else ("|" if i % 5 == 0 else " ")).ljust(w)
        for i in layers
    )
    lines.append("  layer " + ticks)
    marker = "".join(("^" if i == meta["layer"] else " ") * w for i in layers)
    lines.append("        " + marker)
    f = meta.get("filters", {})
    relaxed = f.get("kl_threshold_used")
    note = f" (KL limit relaxed to {relaxed:g})" if relaxed and relaxed > f["kl_threshold"] else ""
    lines.append(f"        ^ layer {meta['layer']} chosen   ░ failed a filter{note}")
    for name in ("induce", "kl"):
        values = [by_layer.get(i, {}).get(name) for i in layers]
        lines.append(f"{name:>7} " + "".join(ch * w for ch in _sparkline(values)))
    return "\n".join(lines)
