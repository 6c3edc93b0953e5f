"""PNG plots of a run's numbers (matplotlib is optional: without it, no plot and no error)."""

from __future__ import annotations


def plot_direction_scores(path, candidates: list, chosen) -> bool:
    """Scores per layer, one line per position; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from safesteer_mlx.run import atomic_path

    positions = sorted({c.position for c in candidates})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(
        axes,
        ("bypass", "induce", "kl"),
        (
            "refusal score under ablation (harmful, lower is better)",
            "refusal score under steering (harmless)",
            "KL under ablation (harmless)",
        ),
    ):
        for pos in positions:
            pts = [
                (c.layer, getattr(c, key))
                for c in candidates
                if c.position == pos and getattr(c, key) is not None
            ]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker=".", label=f"pos {pos}")
        ax.axvline(chosen.layer, color="k", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"refusal direction candidates (chosen: layer {chosen.layer}, pos {chosen.position})"
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return True
