"""Bind a fast BLAS before MLX loads on Linux.

MLX's Linux CPU wheel links a reference BLAS that is ~50x slower than OpenBLAS for matmuls.
Loading OpenBLAS with RTLD_GLOBAL before `mlx.core` is first imported makes MLX resolve its
BLAS symbols there. On macOS MLX uses Metal/Accelerate and nothing is done.
"""

from __future__ import annotations

import ctypes
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "libopenblas.so.0",
)

HINT = (
    "safesteer-mlx: OpenBLAS not found; MLX on Linux runs ~50x slower without it "
    "(fix: sudo apt-get install -y libopenblas0-pthread)"
)

_bound: bool | None = None


def bind_openblas() -> bool:
    """Load OpenBLAS globally if this is Linux and MLX is not imported yet.

    Returns True when a fast BLAS is (or need not be) in place, False on Linux without OpenBLAS.
    Set SAFESTEER_NO_OPENBLAS=1 to skip (e.g. to measure the difference).
    """
    global _bound
    if _bound is not None:
        return _bound
    if not sys.platform.startswith("linux") or os.environ.get("SAFESTEER_NO_OPENBLAS"):
        _bound = True
        return _bound
    _bound = False
    for name in _CANDIDATES:
        if name.startswith("/") and not os.path.exists(name):
            continue
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _bound = True
        break
    return _bound
