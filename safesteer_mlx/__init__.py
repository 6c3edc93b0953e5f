"""safesteer-mlx: SafeSteer (activation-steered safety teacher, safety-token mining,
localized on-policy distillation) on MLX."""

from safesteer_mlx._blas import bind_openblas

# Before anything imports mlx.core: on Linux, MLX's own BLAS is ~50x slower than OpenBLAS.
bind_openblas()

__version__ = "0.1.0"
