"""Data-parallel distillation over `mx.distributed`: one process per rank (started by
`mlx.launch`), each rolling out its own share of the step's prompts; the gradients are summed
across ranks so every rank applies the same update and holds the same adapters.

Not launched, `mx.distributed.init()` returns a group of size 1 and every helper here is the
identity, so the single-process path is unchanged.

    mlx.launch --backend ring -n 2 -- safesteer-mlx distill --run-dir runs/x
    mlx.launch --backend ring --hosts mac1,mac2 -- safesteer-mlx distill --run-dir runs/x

Every rank reads the run directory's direction and safety tokens (run stages 1-2 once, then
copy the directory to the same path on each machine); rank 0 alone writes it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def world() -> mx.distributed.Group:
    """The process group mlx.launch set up (size 1 when not launched)."""
    return mx.distributed.init()


def shard(items: list, group: mx.distributed.Group) -> list:
    """Rank r's share of a list: items r, r + n, r + 2n, ... (n = group size); ranks beyond
    the list's length get none."""
    return items[group.rank() :: group.size()]


def sum_gradients(grads, group: mx.distributed.Group):
    """Σ over ranks of each gradient leaf. The ranks weight their micro-batches by their share of
    the global batch (rows / global rows), so the sum is the global batch's mean gradient.

    mlx's `nn.average_gradients` packs the leaves into a few large all-reduces but divides by
    the group size; multiplying by it first is exact for power-of-two sizes and within one
    rounding otherwise."""
    n = group.size()
    if n == 1:
        return grads
    from mlx.utils import tree_map

    return nn.average_gradients(tree_map(lambda g: g * n, grads), group=group)


def sum_scalars(values: list[float], group: mx.distributed.Group) -> list[float]:
    """Σ over ranks of a few floats (losses, token counts; summed in float32)."""
    if group.size() == 1:
        return list(values)
    total = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=group)
    return [float(v) for v in total.tolist()]


def rank0_decides(flag: bool, group: mx.distributed.Group) -> bool:
    """Rank 0's answer, on every rank: decisions about the run directory (skip, resume,
    refuse to overwrite) are made where it is written, so no rank waits on a collective the
    others skipped."""
    if group.size() == 1:
        return flag
    mine = 1.0 if (flag and group.rank() == 0) else 0.0
    return bool(mx.distributed.all_sum(mx.array([mine]), group=group).item() > 0)


def any_rank(flag: bool, group: mx.distributed.Group) -> bool:
    """True on every rank when it is true on any (a stop request seen by one rank)."""
    if group.size() == 1:
        return flag
    return bool(mx.distributed.all_sum(mx.array([float(flag)]), group=group).item() > 0)
