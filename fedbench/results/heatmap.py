"""The leaderboard as a heatmap that stays readable at 20+ rows: rows x sites (mean over seeds,
the value printed in each cell), one colour scale shared by the inside and outside panels, rows
in rank order, the mean and worst site beside the sites and the site sd (fairness) as text."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbench.results.plots import check_figure_path, pyplot, save

if TYPE_CHECKING:
    import numpy as np

    from fedbench.results.leaderboard import Board, Leaderboard

ROW_INCHES, COLUMN_INCHES = 0.3, 0.72
TITLES = {
    "inside": "Inside the federation (per-site models)",
    "outside": "Outside the federation (each site held out, unseen)",
}


def coloured_columns(board: Board) -> list[str]:
    """The columns that share the colour scale: the sites, then the mean and the worst site."""
    return [*board.sites, "mean", "worst"]


def colour_range(lb: Leaderboard) -> tuple[float, float]:
    """One scale for every panel: the lowest to the highest value of any panel."""
    import numpy as np

    values = np.concatenate(
        [b.frame[coloured_columns(b)].to_numpy(dtype=float).ravel() for b in lb.boards]
    )
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def row_labels(board: Board) -> list[str]:
    """'3. fedavg + tent *': rank, row name, and a star where it differs from the best (Holm)."""
    labels = []
    for row in board.frame.to_dict("records"):
        star = " *" if row.get("significant") else ""
        twin = f" (= {row['same as']})" if row.get("same as") else ""
        labels.append(f"{row['rank']}. {board.label(row)}{star}{twin}")
    return labels


def cell_text(value: float, digits: int) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def text_colour(rgba: tuple[float, ...]) -> str:
    """Black on light cells, white on dark ones."""
    red, green, blue = rgba[:3]
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"


def draw_panel(ax: Any, board: Board, lb: Leaderboard, cmap: Any, norm: Any) -> Any:
    """One board: the coloured cells with their values, then the site sd column as text."""
    columns = coloured_columns(board)
    matrix: np.ndarray = board.frame[columns].to_numpy(dtype=float)
    image = ax.imshow(matrix, cmap=cmap, norm=norm, aspect="auto")
    digits = 2 if lb.lower_is_better else 3
    for r in range(matrix.shape[0]):
        for c in range(matrix.shape[1]):
            value = matrix[r, c]
            colour = text_colour(cmap(norm(value))) if math.isfinite(value) else "black"
            ax.text(
                c, r, cell_text(value, digits), ha="center", va="center", fontsize=8, color=colour
            )
        sd = float(board.frame["site sd"].iloc[r])
        ax.text(len(columns) - 0.3, r, cell_text(sd, digits), ha="left", va="center", fontsize=8)
    names = [*map(str, board.sites), "mean", "worst site"]
    ax.set_xticks(range(len(columns)), names, fontsize=9, rotation=30, ha="right")
    ax.set_yticks(range(matrix.shape[0]), row_labels(board), fontsize=9)
    ax.set_xlim(-0.5, len(columns) + 0.7)
    ax.axvline(len(board.sites) - 0.5, color="white", linewidth=3)
    ax.text(len(columns) - 0.3, -0.8, "site sd", ha="left", va="bottom", fontsize=9)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(TITLES.get(board.regime, board.regime), fontsize=11, loc="left", pad=14)
    return image


def figure_size(lb: Leaderboard) -> tuple[float, float]:
    """Inches: a fixed cell size, room for the longest row label and the colour bar."""
    longest = max(len(label) for b in lb.boards for label in row_labels(b))
    columns = max(len(coloured_columns(b)) + 1 for b in lb.boards)
    rows = sum(len(b.frame) for b in lb.boards)
    width = 1.2 + 0.075 * longest + COLUMN_INCHES * columns + 1.0
    height = 1.1 + ROW_INCHES * rows + 1.3 * len(lb.boards)
    return width, height


def heatmap_figure(lb: Leaderboard, path: Path) -> Path:
    """Write the board heatmap (one panel per regime) to `path`."""
    from matplotlib.colors import Normalize

    plt = pyplot()
    path = check_figure_path(path)
    cmap = plt.get_cmap("viridis_r" if lb.lower_is_better else "viridis")
    norm = Normalize(*colour_range(lb))
    heights = [len(b.frame) + 2.5 for b in lb.boards]
    fig, axes = plt.subplots(
        len(lb.boards),
        1,
        figsize=figure_size(lb),
        squeeze=False,
        layout="constrained",
        gridspec_kw={"height_ratios": heights},
    )
    images = [draw_panel(ax, b, lb, cmap, norm) for ax, b in zip(axes[:, 0], lb.boards)]
    order = "lower is better" if lb.lower_is_better else "higher is better"
    bar = fig.colorbar(images[0], ax=list(axes[:, 0]), shrink=0.5, aspect=30, pad=0.02)
    bar.set_label(f"{lb.metric} ({order})", fontsize=9)
    fig.suptitle(
        f"{lb.dataset}: {lb.metric} ({lb.selection}), mean over seeds; "
        "* differs from rank 1 (Wilcoxon, Holm)",
        fontsize=11,
        x=0.01,
        ha="left",
    )
    save(fig, path)
    return path
