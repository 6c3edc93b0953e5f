"""Benchmark `safesteer-mlx tui` start-up: a fresh interpreter imports the CLI and the app,
resolves the config of a run directory, mounts every screen headless at 80x24 and restores them
from the run's artifacts. Prints one JSON object: seconds to the first full screen (median of
--repeats fresh processes) and whether mlx / mlx_lm were imported on the way (they must not be).

    python bench/tui_startup.py [--run-dir runs/smollm2-135m] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import time
t0 = time.perf_counter()
import asyncio, json, sys
from safesteer_mlx.cli import build_parser, resolve_config
from safesteer_mlx.tui.app import SafeSteerApp

args = build_parser().parse_args(["tui", "--run-dir", sys.argv[1]])
config, run_dir = resolve_config(args)
imported = time.perf_counter() - t0

async def main():
    app = SafeSteerApp(config, run_dir)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        return time.perf_counter() - t0

shown = asyncio.run(main())
heavy = [m for m in ("mlx.core", "mlx_lm", "transformers") if m in sys.modules]
print(json.dumps({"import_s": imported, "first_screen_s": shown, "heavy_modules": heavy}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default="runs/smollm2-135m")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, args.run_dir],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({
        "bench": "tui_startup",
        "run_dir": args.run_dir,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "import_s_median": round(statistics.median(r["import_s"] for r in runs), 3),
        "first_screen_s_median": round(statistics.median(r["first_screen_s"] for r in runs), 3),
        "first_screen_s_max": round(max(r["first_screen_s"] for r in runs), 3),
        "heavy_modules_imported": sorted({m for r in runs for m in r["heavy_modules"]}),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
