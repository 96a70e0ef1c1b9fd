"""The merge report's files: ``merge_report.json``, ``merge_report.txt`` and ``merge_report.png``.

:func:`write_report` writes them into a folder (``swudi-merge --report`` into OUT, before OUT is
published), each atomically. The JSON is :meth:`MergeReport.to_dict` (schema in the README,
"The merge report"); the text file is the per-layer table; the picture (matplotlib, the
``plot`` extra) has, per report, a grid of layers down and module types across coloured by
the interference ratio I(τm)/I(Σ τ) (blue: the merge removed interference, red: it added
some; log scale centred on 1), and beside it a grid of the method's kept rank K/n (spectral
methods) or sign-conflict share (sparsifying methods). Without matplotlib the JSON and the
table are still written and the returned message says how to get the picture.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from swudi_jax.checkpoint.io.atomic import atomic_file
from swudi_jax.model.report import LayerReport, MergeReport

REPORT_JSON = "merge_report.json"
REPORT_TEXT = "merge_report.txt"
REPORT_PNG = "merge_report.png"
PICTURE_EXTRA = "pip install 'swudi_jax[plot]'"
NO_LAYER = "(no layer)"
_SUFFIXES = ("weight", "kernel")


def grid_position(layer: LayerReport) -> tuple[tuple[str, int], str]:
    """(row, column) of a layer in the picture: the row is (stack prefix, layer number) from the
    first number in the path (or the scanned stack's index), the column the module path after
    it without its trailing weight/kernel name; a path without a number goes to row
    (:data:`NO_LAYER`, -1)."""
    parts = [p for p in re.split(r"[./]", layer.path) if p]
    if len(parts) > 2 and parts[-1] == "value" and parts[-2] in _SUFFIXES:  # an NNX state's .../kernel/value
        parts.pop()
    if len(parts) > 1 and parts[-1] in _SUFFIXES:
        parts.pop()
    if layer.index is not None:
        return ("", layer.index), ".".join(parts)
    for i, part in enumerate(parts):
        if part.isdigit() and i + 1 < len(parts):
            return (".".join(parts[:i]), int(part)), ".".join(parts[i + 1:])
    return (NO_LAYER, -1), ".".join(parts)


def grid_layout(report: MergeReport) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """(row labels, column labels, each layer's (row, column) cell) of the picture's grid: rows
    ordered layerless first, then by stack prefix (first seen) and layer number."""
    positions = [grid_position(layer) for layer in report.layers]
    rows = list(dict.fromkeys(row for row, _ in positions))
    cols = list(dict.fromkeys(col for _, col in positions))
    prefixes = list(dict.fromkeys(r[0] for r in rows if r[0] != NO_LAYER))
    rows.sort(key=lambda r: (r[0] != NO_LAYER, prefixes.index(r[0]) if r[0] in prefixes else -1, r[1]))
    labels = [r[0] if r[0] == NO_LAYER else (str(r[1]) if len(prefixes) < 2 else f"{r[0]} {r[1]}") for r in rows]
    return labels, cols, [(rows.index(row), cols.index(col)) for row, col in positions]


def report_grid(report: MergeReport, value) -> tuple[list[str], list[str], np.ndarray]:
    """(row labels, column labels, values (rows, columns)) of ``value(layer)`` (a float or
    None), NaN where no layer is (:func:`grid_layout`)."""
    labels, cols, cells = grid_layout(report)
    grid = np.full((len(labels), len(cols)), np.nan)
    for layer, (i, j) in zip(report.layers, cells):
        v = value(layer)
        grid[i, j] = np.nan if v is None else float(v)
    return labels, cols, grid


def _second_panel(report: MergeReport):
    """(title, value(layer), colour map, annotation format) of the right panel, or None."""
    if any(layer.spectral is not None for layer in report.layers):
        return ("kept rank K / n", lambda x: None if x.spectral is None else x.spectral["kept_rank"] / x.shape[1],
                "viridis", lambda x: "" if x.spectral is None else str(x.spectral["kept_rank"]))
    if any(layer.kept is not None for layer in report.layers):
        return ("sign-conflict share", lambda x: None if x.kept is None else x.kept["sign_conflict"],
                "magma_r", lambda x: "" if x.kept is None else f"{x.kept['sign_conflict']:.0%}")
    return None


def _panel(fig, ax, report: MergeReport, value, title: str, cmap: str, norm, text, colorbar_ticks=None) -> None:
    labels, cols, grid = report_grid(report, value)
    from matplotlib import colormaps

    image = ax.imshow(np.ma.masked_invalid(grid), cmap=colormaps[cmap].with_extremes(bad="#dddddd"), norm=norm,
                      aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("layer", fontsize=8)
    ax.set_title(title, fontsize=9)
    if len(cols) <= 12 and len(labels) <= 40:
        for layer, (i, j) in zip(report.layers, grid_layout(report)[2]):
            r, g, b, _ = image.cmap(norm(grid[i, j])) if np.isfinite(grid[i, j]) else (1, 1, 1, 1)
            ax.text(j, i, text(layer), ha="center", va="center", fontsize=6,
                    color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    if colorbar_ticks is not None:
        bar.set_ticks(colorbar_ticks[0], labels=colorbar_ticks[1])
    bar.ax.tick_params(labelsize=7)


RATIO_LIMIT = 2.0
"""The ratio colour scale spans 10^±limit, limit ≤ this (ratios beyond take the end colours)."""


def report_figure(reports: Sequence[MergeReport], titles: Sequence[str] | None = None) -> Any:
    """A matplotlib Figure of one or more reports, one row each: the interference ratio grid
    (one colour scale for all) and beside it the kept rank or sign-conflict grid.

    Raises:
      ImportError: matplotlib is not installed (``pip install 'swudi_jax[plot]'``).
    """
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    titles = list(titles or [r.method or "merge" for r in reports])
    ratios = [x.ratio for r in reports for x in r.layers if x.ratio]
    limit = min(RATIO_LIMIT, max([0.3] + [abs(math.log10(v)) for v in ratios]))
    ticks = [t for t in ((0.01, 0.1, 1, 10, 100) if limit > 1 else (0.3, 0.5, 1, 2, 3))
             if abs(math.log10(t)) <= limit + 1e-9]
    second = [_second_panel(r) for r in reports]
    columns = 1 + any(p is not None for p in second)
    shapes = [grid_layout(r)[:2] for r in reports]
    width = max(len(cols) for _, cols in shapes)
    heights = [1.6 + 0.22 * len(labels) + 0.09 * max(map(len, cols)) for labels, cols in shapes]
    fig = Figure(figsize=(columns * (2.2 + 0.42 * width), sum(heights)), layout="constrained")
    axes = fig.subplots(len(reports), columns, squeeze=False, gridspec_kw={"height_ratios": heights})
    for row, (report, title, extra) in enumerate(zip(reports, titles, second)):
        overall = report.overall()["ratio"]
        _panel(fig, axes[row, 0], report,
               lambda x: None if x.ratio is None else math.log10(min(max(x.ratio, 10 ** -limit), 10 ** limit)),
               f"{title}: interference ratio" + (f" (overall {overall:.3g})" if overall is not None else ""),
               "RdBu_r", Normalize(-limit, limit), lambda x: "" if x.ratio is None else f"{x.ratio:.2g}",
               ([math.log10(t) for t in ticks], [f"{t:g}" for t in ticks]))
        if extra is not None:
            name, value, cmap, text = extra
            _panel(fig, axes[row, 1], report, value, f"{title}: {name}", cmap, Normalize(0, 1), text)
        elif columns > 1:
            axes[row, 1].set_axis_off()
    return fig


def write_report(report: MergeReport, directory: str | Path, shown_as: str | None = None) -> str:
    """Write the JSON, the table and (with matplotlib) the picture into ``directory``.

    Returns:
      A line for the user naming what was written (in ``shown_as``, default ``directory``: the
      folder the files end up in), or how to get the missing picture.
    """
    directory = Path(directory)
    shown_as = str(directory) if shown_as is None else shown_as
    with atomic_file(directory / REPORT_JSON) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n")
    with atomic_file(directory / REPORT_TEXT) as tmp:
        tmp.write_text(report.summary() + "\n\n" + report.table() + "\n" + "".join(f"note: {n}\n" for n in report.notes))
    written = f"merge report: {shown_as}/{REPORT_JSON}, {shown_as}/{REPORT_TEXT}"
    try:
        fig = report_figure([report])
    except ImportError:
        return f"{written} written; {REPORT_PNG} not drawn: matplotlib is not installed ({PICTURE_EXTRA})"
    with atomic_file(directory / REPORT_PNG) as tmp:
        fig.savefig(tmp, dpi=130)
    return f"{written}, {shown_as}/{REPORT_PNG} written"


def read_report(path: str | Path) -> MergeReport:
    """A report back from its ``merge_report.json`` (or the folder holding it)."""
    path = Path(path)
    path = path / REPORT_JSON if path.is_dir() else path
    return MergeReport.from_dict(json.loads(path.read_text()))


__all__ = ["REPORT_JSON", "REPORT_PNG", "REPORT_TEXT", "grid_layout", "grid_position", "read_report", "report_figure",
           "report_grid", "write_report"]
