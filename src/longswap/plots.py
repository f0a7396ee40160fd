"""Pictures of patterns: block-level masks over a few thousand tokens."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from longswap.patterns import BlockTopK, Pattern  # noqa: E402


def pattern_density_map(
    pattern: Pattern, length: int, tile: int, num_heads: int = 2, seed: int = 0
) -> torch.Tensor:
    """``(Hs, length/tile, length/tile)`` share of visible pairs per tile.

    A data-dependent pattern is shown on seeded random queries and keys with a slowly
    drifting mean, so that nearby tokens tend to pick similar blocks, as in real text; a
    learned selector is shown as it starts, scoring blocks by their mean key (MoBA).
    """
    if pattern.data_dependent:
        g = torch.Generator().manual_seed(seed)
        drift = torch.cumsum(torch.randn(1, 1, length, 16, generator=g) * 0.03, dim=2)
        q = drift + torch.randn(1, 1, length, 16, generator=g)
        k = drift + torch.randn(1, 1, length, 16, generator=g)
        scores = BlockTopK.block_scores(pattern, q, k)  # (MoBA's, and an untrained gate's)
        mask = pattern.token_mask(q, k, block_scores=scores)[0]
    else:
        mask = pattern.dense_mask(length, length, num_heads)
    n = length // tile
    return mask[:, : n * tile, : n * tile].float().view(-1, n, tile, n, tile).mean((2, 4))


def plot_pattern(
    pattern: Pattern, path: Path, length: int = 2048, tile: int = 32, title: str | None = None
) -> Path:
    """Write a PNG of ``pattern``'s block-level mask (one panel per distinct head mask)."""
    heads = 2 if pattern.head_dependent else 1
    density = pattern_density_map(pattern, length, tile, num_heads=heads)
    panels = density.shape[0]
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.8), squeeze=False)
    for h, ax in enumerate(axes[0]):
        ax.imshow(
            density[h].numpy(),
            cmap="Blues",
            vmin=0,
            vmax=1,
            interpolation="nearest",
            extent=(0, length, length, 0),
        )
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        side = density.shape[-1] * tile
        share = float(density[h].sum()) * tile * tile / (side * (side + 1) / 2)
        label = f"{'shifted' if h else 'unshifted'} heads, " if panels > 1 else ""
        ax.set_title(f"{label}density {share:.1%} of causal pairs", fontsize=8)
    fig.suptitle(title or str(pattern), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
