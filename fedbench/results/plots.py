"""Figures with matplotlib (Agg, no display needed): validation learning curves per round and
site, predictions and datasets, and the helpers every figure shares (the board pictures are
fedbench/results/heatmap.py and fedbench/results/ranking.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.storage import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from fedbench.data import FederatedData

FIGURE_SUFFIXES = (".png", ".svg", ".pdf")
DPI = 130


def pyplot() -> Any:
    """pyplot on the Agg backend (no display, same output everywhere), with mathtext off: names
    in the pictures come from records and plugins, and `a$x$b` is a name, not a formula."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def check_figure_path(path: Path) -> Path:
    """A writable figure path with a known suffix, or one clear error."""
    path = Path(path)
    if path.suffix.lower() not in FIGURE_SUFFIXES:
        raise FedbenchError(f"figure file {path} must end in one of {', '.join(FIGURE_SUFFIXES)}")
    if not path.parent.is_dir():
        raise FedbenchError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.exists() and not path.is_file():
        raise FedbenchError(f"cannot write {path}: it exists and is not a regular file")
    return path


def save(fig: Figure, path: Path, **options: Any) -> None:
    """Save at the figure's own size (its constrained layout keeps everything inside) through
    a temp file and a rename over `path`."""
    plt = pyplot()
    options = {"dpi": DPI, **options}
    try:
        write_atomic(path, lambda handle: fig.savefig(handle, format=path.suffix[1:], **options))
    finally:
        plt.close(fig)


def colours(names: list[str]) -> dict[str, Any]:
    """A distinct colour per name, stable in the order given."""
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def curve_panel(ax: Any, record: dict[str, Any], site_colours: dict[str, Any]) -> None:
    """Validation score per round, one line per site, for one run."""
    history = (record.get("history") or {}).get("inside") or []
    for site in site_colours:
        points = [(h["round"], h["val"][site]) for h in history if site in h.get("val", {})]
        if points:
            xs, ys = zip(*points)
            ax.plot(
                xs,
                ys,
                marker="o",
                markersize=3,
                linewidth=1.4,
                color=site_colours[site],
                label=site,
            )
    adapter = f" + {record['adapter']}" if record.get("adapter") else ""
    ax.set_title(f"{record['method']}{adapter}, seed {record['seed']}", fontsize=11, pad=16)
    ax.text(
        0.5,
        1.02,
        record["run_id"],
        transform=ax.transAxes,
        fontsize=7.5,
        color="0.4",
        ha="center",
        va="bottom",
    )
    ax.set_xlabel("round", fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)


def curves_grid(runs: int) -> tuple[int, int]:
    """Rows and columns of panels for `runs` learning-curve panels (at most three across)."""
    cols = runs if runs <= 3 else min(3, math.ceil(math.sqrt(runs)))
    return math.ceil(runs / cols), cols


def curves_figsize(runs: int) -> tuple[float, float]:
    """Inches for `runs` panels plus the site legend."""
    rows, cols = curves_grid(runs)
    return 4.6 * cols + 1.4, 3.6 * rows


def curves_figure(records: list[dict[str, Any]], path: Path) -> Path:
    """Learning curves (validation Dice per round and site), one panel per run."""
    plt = pyplot()
    path = check_figure_path(path)
    for record in records:
        if not (record.get("history") or {}).get("inside"):
            raise FedbenchError(
                f"run {record['run_id']} has no learning curve: it ran with eval.history=false "
                "or failed before its first round"
            )
    sites = list(
        dict.fromkeys(s for r in records for h in r["history"]["inside"] for s in h.get("val", {}))
    )
    rows, cols = curves_grid(len(records))
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=curves_figsize(len(records)),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    site_colours = colours(sites)
    for ax, record in zip(axes.flat, records):
        curve_panel(ax, record, site_colours)
    for ax in axes[:, 0]:
        ax.set_ylabel("validation Dice", fontsize=10)
    for ax in list(axes.flat)[len(records) :]:
        ax.set_visible(False)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=c, marker="o", markersize=3, label=s) for s, c in site_colours.items()
    ]
    fig.legend(handles=handles, loc="outside right center", title="site", frameon=False)
    save(fig, path)
    return path


TRUTH_COLOUR, PREDICTION_COLOUR = "#00d000", "#ff3030"


OUTLINE_COLOURS = ("#00e5ff", "#ffd600", "#ff4081")


def outline(ax: Any, mask: Any, colours: tuple[str, ...]) -> None:
    """Contours of every foreground level of an integer mask, level k in colours[k - 1]
    (cycling when there are more levels than colours)."""
    for level in range(1, int(mask.max()) + 1):
        colour = colours[(level - 1) % len(colours)]
        ax.contour(mask >= level, levels=[0.5], colors=[colour], linewidths=0.9)


def examples_figure(
    record: dict[str, Any], examples: dict[tuple[str, str], dict[str, Any]], path: Path
) -> Path:
    """One row per site: its kept images with the ground truth (green) and the run's prediction
    (red) outlined, inside the federation and, where the site was held out, outside it."""
    plt = pyplot()
    sites = list(dict.fromkeys(site for _, site in examples))
    regimes = [r for r in ("inside", "outside") if any(k[0] == r for k in examples)]
    per = max(len(v["image"]) for v in examples.values())
    cols = per * len(regimes)
    fig, axes = plt.subplots(
        len(sites),
        cols,
        figsize=(2.1 * cols, 2.1 * len(sites) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for r, site in enumerate(sites):
        for g, regime in enumerate(regimes):
            arrays = examples.get((regime, site))
            for i in range(per):
                ax = axes[r][g * per + i]
                ax.set_xticks([])
                ax.set_yticks([])
                if arrays is None or i >= len(arrays["image"]):
                    ax.axis("off")
                    continue
                ax.imshow(arrays["image"][i], cmap="gray")
                outline(ax, arrays["truth"][i], (TRUTH_COLOUR,))
                outline(ax, arrays["pred"][i], (PREDICTION_COLOUR,))
        axes[r][0].set_ylabel(site, fontsize=9)
    for g, regime in enumerate(regimes):
        for i in range(per):
            axes[0][g * per + i].set_title(regime, fontsize=9)
    adapter = f", adapter {record['adapter']}" if record.get("adapter") else ""
    fig.suptitle(
        f"{record['method']} on {record['dataset']} (seed {record['seed']}{adapter}): "
        "truth green, prediction red",
        fontsize=10,
    )
    save(fig, path)
    return path


def dataset_figure(data: FederatedData, per_site: int, rgb: bool, path: Path) -> Path:
    """Rows of sites, `per_site` images each, mask outlines on top (`fedbench datasets show`)."""
    from fedbench.results.predictions import display_image, pick

    plt = pyplot()
    rows = len(data.sites)
    fig, axes = plt.subplots(rows, per_site, figsize=(2 * per_site, 2 * rows), squeeze=False)
    for r, site in enumerate(data.sites):
        split = site.all_samples()
        chosen = pick(split.targets, per_site)
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c >= len(chosen):
                continue
            ax.imshow(display_image(split.inputs[chosen[c]], rgb), cmap="gray")
            outline(ax, split.targets[chosen[c]].numpy(), OUTLINE_COLOURS)
        axes[r][0].set_title(site.name, loc="left", fontsize=9)
    save(fig, path, dpi=100, bbox_inches="tight")
    return path
