"""The run report's figures as PNG files: training curves, per-identity AP, similarity
distributions and retrieval grids (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from jaguar.report.tb_reader import ScalarSeries  # noqa: E402

MATCH_COLOR = "#1a9850"
MISMATCH_COLOR = "#d73027"
NEUTRAL_BACKGROUND = (150, 150, 150)

# (panel title, y label, tag prefixes); a panel is drawn only when one of its tags was logged
CURVE_PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Training loss", "loss", ("train/loss",)),
    ("Learning rate", "lr", ("train/lr/",)),
    ("Validation during training", "score", ("val/mAP_balanced", "val/rank1")),
    ("Throughput", "images / s", ("train/images_per_sec",)),
    ("Gradient norm", "norm", ("train/grad_norm",)),
    ("GeM exponent p", "p", ("model/gem_p",)),
)


def _save(fig: plt.Figure, path: Path, tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return path


def _panel_tags(scalars: dict[str, ScalarSeries], prefixes: tuple[str, ...]) -> list[str]:
    return [tag for tag in sorted(scalars)
            if len(scalars[tag]) and any(tag == p or tag.startswith(p) for p in prefixes)]


def plot_training_curves(scalars: dict[str, ScalarSeries], path: str | Path) -> Path | None:
    """One figure with a panel per quantity that was logged; None when nothing was."""
    panels = [(title, ylabel, _panel_tags(scalars, prefixes)) for title, ylabel, prefixes in CURVE_PANELS]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    columns = 2 if len(panels) > 1 else 1
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    for ax, (title, ylabel, tags) in zip(axes.flat, panels):
        for tag in tags:
            series = scalars[tag]
            marker = "o" if len(series) < 30 else None
            ax.plot(series.steps, series.values, label=tag, marker=marker, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if title == "Training loss" and all(v > 0 for t in tags for v in scalars[t].values):
            ax.set_yscale("log")  # loss terms differ by orders of magnitude
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, Path(path))


MAX_IDENTITY_BARS = 40  # identities drawn as bars; more are shown as a histogram and their worst bars


def _identity_bars(ax: plt.Axes, names: list[str], values: np.ndarray, upper: np.ndarray | None) -> None:
    colors = plt.cm.RdYlGn(np.clip(values, 0.0, 1.0))
    ax.barh(np.arange(len(names)), values, color=colors, edgecolor="#444", linewidth=0.4)
    if upper is not None and np.any(upper > values):  # AP from ranked lists: its upper bound as a whisker
        ax.errorbar(upper, np.arange(len(names)), xerr=[upper - values, np.zeros_like(values)], fmt="none",
                    ecolor="#555", elinewidth=0.8, capsize=2, label="upper bound (matches beyond the lists)")
    ax.set_yticks(np.arange(len(names)), labels=names, fontsize=8, parse_math=False)  # names are data, not TeX
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision")
    ax.grid(axis="x", alpha=0.3)


def plot_per_identity_ap(ap_by_identity: dict[str, float], path: str | Path, title: str,
                         upper_by_identity: dict[str, float] | None = None) -> Path:
    """Horizontal bars, worst identity at the top, with the identity-balanced mean marked; past
    MAX_IDENTITY_BARS identities, a histogram of all of them beside bars of the worst (a bar each
    of 10,000 identities would be a picture 200,000 pixels tall). `upper_by_identity`: upper
    bounds of AP known only within bounds (from ranked lists), drawn as whiskers."""
    items = sorted(ap_by_identity.items(), key=lambda kv: kv[1])
    values = np.array([value for _, value in items], dtype=float)
    mean = float(values.mean()) if len(values) else 0.0
    shown = items[:MAX_IDENTITY_BARS]
    names = [name for name, _ in shown]
    upper = (np.array([upper_by_identity.get(name, value) for name, value in shown], dtype=float)
             if upper_by_identity is not None else None)
    height = max(2.5, 0.22 * len(shown) + 1.2)
    mean_label = f"identity-balanced mAP {mean:.3f}"
    if len(items) <= MAX_IDENTITY_BARS:
        fig, ax = plt.subplots(figsize=(7, height))
        _identity_bars(ax, names, values, upper)
        ax.axvline(mean, color="#333", linestyle="--", linewidth=1, label=mean_label)
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize=8)
    else:
        fig, (spread, worst) = plt.subplots(1, 2, figsize=(12, height), gridspec_kw={"width_ratios": [1, 1.2]})
        spread.hist(values, bins=np.linspace(0, 1, 41), color="#4575b4", alpha=0.8)
        spread.axvline(mean, color="#333", linestyle="--", linewidth=1, label=mean_label)
        spread.set_xlim(0, 1)
        spread.set_xlabel("average precision")
        spread.set_ylabel("identities")
        spread.set_title(f"{title}: all {len(items):,} identities")
        spread.legend(fontsize=8)
        spread.grid(alpha=0.3)
        _identity_bars(worst, names, values[:len(shown)], upper)
        worst.set_title(f"the worst {len(shown)}")
        if upper is not None and np.any(upper > values[:len(shown)]):
            worst.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(path))


def pair_similarities(similarity: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Similarities of matching and non-matching ordered pairs (self-pairs and unknown labels excluded)."""
    labels = np.asarray(labels)
    known = labels >= 0
    sim = np.asarray(similarity)[np.ix_(known, known)]
    lab = labels[known]
    same = lab[:, None] == lab[None, :]
    off_diagonal = ~np.eye(len(lab), dtype=bool)
    return sim[same & off_diagonal], sim[~same & off_diagonal]


def plot_similarity_histograms(similarity: np.ndarray, labels: np.ndarray, path: str | Path,
                               title: str) -> Path:
    """Overlapping, density-normalised histograms: how well one threshold separates the two."""
    matching, non_matching = pair_similarities(similarity, labels)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    values = np.concatenate([matching, non_matching])
    bins = np.linspace(float(values.min()), float(values.max()) + 1e-6, 60) if len(values) else 10
    ax.hist(non_matching, bins=bins, density=True, alpha=0.55, color=MISMATCH_COLOR,
            label=f"different identity ({len(non_matching):,} pairs)")
    ax.hist(matching, bins=bins, density=True, alpha=0.55, color=MATCH_COLOR,
            label=f"same identity ({len(matching):,} pairs)")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, Path(path))


def on_background(image: Image.Image, background: tuple[int, int, int] = NEUTRAL_BACKGROUND) -> Image.Image:
    """The animal composited on a flat neutral colour by its alpha mask (RGB images pass through)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class GridCell:
    image: Image.Image | None  # None when the picture could not be found
    caption: str
    is_match: bool | None = None  # None for the query itself


@dataclass
class GridRow:
    query: GridCell
    results: list[GridCell] = field(default_factory=list)
    note: str = ""  # e.g. the query's AP, shown beside the row


def render_retrieval_grid(rows: Sequence[GridRow], path: str | Path, title: str,
                          thumb_size: int = 160) -> Path:
    """Query then its top results per row; a green border marks the same identity, red another."""
    columns = 1 + max((len(r.results) for r in rows), default=0)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.9 * columns, 2.35 * len(rows)), squeeze=False)
    for row_axes, row in zip(axes, rows):
        cells = [row.query] + list(row.results)
        for column, ax in enumerate(row_axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if column >= len(cells):
                ax.axis("off")
                continue
            cell = cells[column]
            if cell.image is not None:
                thumb = on_background(cell.image)
                thumb.thumbnail((thumb_size, thumb_size))
                ax.imshow(np.asarray(thumb))
            else:
                ax.set_facecolor("#dddddd")
                ax.text(0.5, 0.5, "image\nnot found", ha="center", va="center", fontsize=8)
            color = {None: "#333333", True: MATCH_COLOR, False: MISMATCH_COLOR}[cell.is_match]
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(1.5 if cell.is_match is None else 5)
            ax.set_title(cell.caption, fontsize=7, color=color, parse_math=False)  # identity and file names
        row_axes[0].set_ylabel("\n".join(["query", row.note] if row.note else ["query"]), fontsize=8)
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / fig.get_figheight())
    # fixed margins: tight_layout and a tight bounding box each cost a full extra draw of many images
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.02, top=1 - 0.75 / height, wspace=0.08,
                        hspace=0.45)
    return _save(fig, Path(path), tight=False)


def plot_open_set_curve(curve: dict[str, list[float]], threshold: float, path: str | Path, title: str) -> Path:
    """Known, unknown and balanced accuracy against the new-individual threshold (a calibration's
    sweep, `OpenSetCalibration.curve`), the chosen threshold marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, color in (("known_accuracy", "known accuracy", MATCH_COLOR),
                              ("unknown_accuracy", "unknown accuracy", MISMATCH_COLOR),
                              ("balanced_accuracy", "balanced accuracy", "#4575b4")):
        ax.plot(curve["threshold"], curve[key], label=label, color=color, lw=2 if key.startswith("balanced") else 1.2)
    ax.axvline(threshold, color="#555", ls="--", lw=1, label=f"chosen {threshold:.3f}")
    ax.set_xlabel("threshold on the best individual's score")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_mirror_similarity(edges: Sequence[float], counts: Sequence[int], same_identity: float,
                           other_identity: float, path: str | Path, title: str) -> Path:
    """Histogram of mirror self-similarities (cosine of each image's embedding and its mirror
    image's), with the mean same-identity and other-identity cosines marked for scale."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    edges = np.asarray(edges, dtype=np.float64)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4575b4", edgecolor="white",
           label="image vs its mirror")
    for value, colour, label in ((same_identity, MATCH_COLOR, "mean, same identity"),
                                 (other_identity, MISMATCH_COLOR, "mean, other identities")):
        if np.isfinite(value):
            ax.axvline(value, color=colour, linestyle="--", label=label)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, Path(path))


def stack_pictures(pictures: Sequence[np.ndarray], path: str | Path, gap: int = 6) -> Path:
    """RGB uint8 pictures (H_i x W_i x 3) one above the other, left-aligned on a dark ground, as a PNG."""
    width = max(picture.shape[1] for picture in pictures)
    height = sum(picture.shape[0] for picture in pictures) + gap * (len(pictures) - 1)
    canvas = np.full((height, width, 3), 24, dtype=np.uint8)
    top = 0
    for picture in pictures:
        canvas[top:top + picture.shape[0], :picture.shape[1]] = picture
        top += picture.shape[0] + gap
    path = Path(path)
    Image.fromarray(canvas).save(path)
    return path
