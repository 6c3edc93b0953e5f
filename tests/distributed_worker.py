"""One rank of a distributed `distill` (started by mlx.launch in test_distributed.py): the CLI's
own steps (parse, resolve the config, load, prepare the run, run_distill), then this rank's
trainable weights written to OUT/rank-R.safetensors so the test can compare every rank."""

from __future__ import annotations

import sys
from pathlib import Path

from safesteer_mlx._blas import bind_openblas

bind_openblas()

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from safesteer_mlx.cli import _prepare_run, build_parser, resolve_config  # noqa: E402
from safesteer_mlx.distill import run_distill  # noqa: E402
from safesteer_mlx.distributed import world  # noqa: E402
from safesteer_mlx.modeling import load_configured  # noqa: E402


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    args = build_parser().parse_args(argv)
    config, run_dir = resolve_config(args)
    loaded = load_configured(config.model)
    run = _prepare_run(config, run_dir, args.force, loaded)
    run_distill(config, run, loaded=loaded)
    weights = dict(tree_flatten(loaded.model.trainable_parameters()))
    mx.save_safetensors(str(out / f"rank-{world().rank()}.safetensors"), weights)


if __name__ == "__main__":
    main()
