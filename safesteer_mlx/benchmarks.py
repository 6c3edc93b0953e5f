"""Evaluation prompt sets by name: the usual safety benchmarks, each a Hugging Face dataset read
through data.py's `hf:` loader (network needed once; then HF_HUB_OFFLINE=1 reads the cache).

A name may also be written NAME:SUBSET where a benchmark has two sides (JailbreakBench's
harmful and benign behaviors, XSTest's safe and unsafe prompts). Anything that is not a name
is an ordinary prompt source (a local file, builtin:…, hf:…).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from safesteer_mlx.data import Prompt, load_prompts, parse_hf_spec
from safesteer_mlx.errors import SafeSteerError


@dataclass(frozen=True)
class Benchmark:
    name: str
    source: str  # hf:ORG/NAME[:SPLIT]#COLUMN
    kind: str  # harmful | harmless | borderline: the set it is meant for
    keep: dict = field(default_factory=dict)  # row filter: field -> required value
    category: str | None = None  # the field holding the category
    about: str = ""


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "advbench",
            "hf:walledai/AdvBench#prompt",
            "harmful",
            about="AdvBench harmful behaviors (Zou et al. 2023), 520 prompts",
        ),
        Benchmark(
            "harmbench",
            "hf:walledai/HarmBench:standard#prompt",
            "harmful",
            category="category",
            about="HarmBench standard behaviors (Mazeika et al. 2024), 200 prompts",
        ),
        Benchmark(
            "jailbreakbench",
            "hf:JailbreakBench/JBB-Behaviors:harmful#Goal",
            "harmful",
            category="Category",
            about="JailbreakBench JBB-Behaviors, harmful side (Chao et al. 2024), 100 prompts",
        ),
        Benchmark(
            "jailbreakbench:benign",
            "hf:JailbreakBench/JBB-Behaviors:benign#Goal",
            "borderline",
            category="Category",
            about="JailbreakBench JBB-Behaviors, benign side: look-alike harmless requests",
        ),
        Benchmark(
            "strongreject",
            "hf:walledai/StrongREJECT#prompt",
            "harmful",
            category="category",
            about="StrongREJECT forbidden prompts (Souly et al. 2024), 313 prompts",
        ),
        Benchmark(
            "xstest",
            "hf:walledai/XSTest#prompt",
            "borderline",
            keep={"label": "safe"},
            category="type",
            about="XSTest safe prompts (Röttger et al. 2024): benign but refusal-bait, 250",
        ),
        Benchmark(
            "xstest:unsafe",
            "hf:walledai/XSTest#prompt",
            "harmful",
            keep={"label": "unsafe"},
            category="type",
            about="XSTest unsafe contrast prompts, 200",
        ),
        Benchmark(
            "alpaca",
            "hf:tatsu-lab/alpaca#instruction",
            "harmless",
            keep={"input": ""},
            about="Alpaca instructions without an input field (Taori et al. 2023)",
        ),
    )
}


def benchmark(name: str) -> Benchmark | None:
    """The preset called `name` (case-insensitive), or None when it is not a preset name."""
    return BENCHMARKS.get(name.strip().lower())


def load_eval_prompts(source: str, *, limit: int | None = None, seed: int = 0) -> list[Prompt]:
    """A benchmark by name, or any prompt source `load_prompts` reads."""
    preset = benchmark(source)
    if preset is None:
        return load_prompts(source, limit=limit, seed=seed)
    return _load_benchmark(preset, limit, seed)


def _load_benchmark(b: Benchmark, limit: int | None, seed: int) -> list[Prompt]:
    from safesteer_mlx.data import _hf_rows

    spec = parse_hf_spec(b.source)
    rows = _hf_rows(spec)
    prompts = rows_to_prompts(b, rows)
    if not prompts:
        raise SafeSteerError(
            f"benchmark {b.name} ({b.source}) gave no prompts after its filter {b.keep} "
            "(the dataset's columns may have changed; give the set as a local file)"
        )
    if limit is not None and limit < len(prompts):
        import numpy as np

        keep = np.sort(np.random.default_rng(seed).choice(len(prompts), limit, replace=False))
        prompts = [prompts[i] for i in keep]
    return prompts


def rows_to_prompts(b: Benchmark, rows: list) -> list[Prompt]:
    """Apply the preset's row filter, prompt column and category column to raw dataset rows."""
    column = parse_hf_spec(b.source).column
    out, seen = [], set()
    for row in rows:
        if not isinstance(row, dict):
            continue
        if any(str(row.get(k, "")).strip() != v for k, v in b.keep.items()):
            continue
        if column not in row:
            raise SafeSteerError(
                f"benchmark {b.name}: rows have no {column!r} field (fields: "
                f"{', '.join(map(str, row))}; give the set as a local file)"
            )
        text = str(row[column] or "").strip()
        if not text or text in seen:
            continue
        seen.add(text)
        cat = row.get(b.category) if b.category else None
        out.append(Prompt(text, str(cat).strip() or None if cat is not None else None))
    return out
