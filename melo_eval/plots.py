"""PNG plots of quality runs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)

ACCURACY = ("es_tf", "es_em", "gen_tf", "gen_em", "loc_tf", "loc_em", "es", "loc", "dev_acc", "preq_acc", "preq_base")
COUNTERS = ("clusters", "conflicts", "forgotten")
PERPLEXITY = ("es_ppl", "err_ppl", "arr_ppl")


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["n_edits"], r[key]) for r in rows if r.get(key) is not None]
    return [x for x, _ in points], [y for _, y in points]


def plot_quality(rows: list[dict], out: Path, title: str) -> Path:
    """quality.png: accuracies (or perplexities) and the cluster counters against edits applied."""
    metric_keys = [k for k in ACCURACY if any(r.get(k) is not None for r in rows)]
    ppl_keys = [k for k in PERPLEXITY if any(r.get(k) is not None for r in rows)]
    panels = 2 + bool(ppl_keys)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    for key in metric_keys:
        axes[0].plot(*_series(rows, key), marker="o", label=key)
    axes[0].set(xlabel="edits applied", ylabel="accuracy", ylim=(-0.02, 1.02), title=title)
    axes[0].legend(fontsize=8)
    for key in COUNTERS:
        axes[1].plot(*_series(rows, key), marker="o", label=key)
    axes[1].set(xlabel="edits applied", ylabel="count", title="clusters / conflicts / forgotten")
    axes[1].legend(fontsize=8)
    if ppl_keys:
        for key in ppl_keys:
            axes[2].plot(*_series(rows, key), marker="o", label=key)
        axes[2].set(xlabel="edits applied", ylabel="perplexity", yscale="log", title="perplexity")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    path = out / "quality.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_comparison(runs: dict[str, list[dict]], key: str, out: Path, title: str) -> Path:
    """One metric of several methods against edits applied (compare_<key>.png)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in runs.items():
        ax.plot(*_series(rows, key), marker="o", label=name)
    ax.set(xlabel="edits applied", ylabel=key, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"compare_{key}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
