"""Column data for the atlas plot: one row per non-empty cell, and the upload's highlighted cells.

Cell ``[i, j]`` of an S × S grid covers layout x in [j/S, (j+1)/S) and y in
[i/S, (i+1)/S), so its centre is at x = (j + 0.5)/S, y = (i + 0.5)/S.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from server.state import GridLevel, LayerData
from server.upload import CellHit

# Fill alpha of the black veil over cells when a class filter is active:
# cells whose first class matches stay clear, cells that list it lower are
# half veiled, the rest nearly hidden.
VEIL_MATCH = 0.0
VEIL_PARTIAL = 0.45
VEIL_OTHER = 0.78
TOOLTIP_CLASSES = 3


def class_label(names: Sequence[str], index: int, score: float) -> str:
    """Return ``name (score)`` for a tooltip line, or an empty string for a -1 pad."""
    if index < 0:
        return ""
    name = names[index] if index < len(names) else f"class {index}"
    return f"{name} ({score:.3g})"


def veil(level: GridLevel, class_id: int | None) -> np.ndarray:
    """Return the (S, S) veil alpha for a class filter; zeros when ``class_id`` is ``None``."""
    if class_id is None or level.top_class.shape[-1] == 0:
        return np.zeros(level.count.shape, dtype=np.float64)
    first = level.top_class[..., 0] == class_id
    listed = (level.top_class == class_id).any(axis=-1)
    return np.where(first, VEIL_MATCH, np.where(listed, VEIL_PARTIAL, VEIL_OTHER))


def cell_columns(
    level: GridLevel,
    class_names: Sequence[str],
    class_id: int | None = None,
    query_cells: Sequence[CellHit] = (),
) -> dict[str, list]:
    """Build the ``ColumnDataSource`` data of the non-empty cells of one grid.

    Parameters
    ----------
    level
        The grid.
    class_names
        Names of the model's classes.
    class_id
        Active class filter, or ``None``.
    query_cells
        Cells hit by the current upload at this grid size.

    Returns
    -------
    dict of str to list
        Columns ``x``, ``y``, ``w`` (centre and side in layout units), ``i``,
        ``j``, ``count``, ``top1`` .. ``top3`` (tooltip text), ``veil``
        (fill alpha), ``outline`` (line alpha: 1 for cells whose first class
        is the filter class) and ``query`` (tooltip text of upload hits).
        Rows are in row-major cell order.
    """
    size = level.size
    i, j = np.nonzero(level.filled)
    veils = veil(level, class_id)[i, j]
    if class_id is not None and level.top_class.shape[-1]:
        outline = (level.top_class[i, j, 0] == class_id).astype(np.float64)
    else:
        outline = np.zeros(len(i))
    hits = {(cell.i, cell.j): cell for cell in query_cells}

    columns: dict[str, list] = {
        "x": ((j + 0.5) / size).tolist(),
        "y": ((i + 0.5) / size).tolist(),
        "w": [1.0 / size] * len(i),
        "i": i.tolist(),
        "j": j.tolist(),
        "count": level.count[i, j].astype(int).tolist(),
        "veil": veils.tolist(),
        "outline": outline.tolist(),
    }
    for rank in range(TOOLTIP_CLASSES):
        labels = []
        for a, b in zip(i, j):
            if rank < level.top_class.shape[-1]:
                labels.append(class_label(class_names, int(level.top_class[a, b, rank]), float(level.top_score[a, b, rank])))
            else:
                labels.append("")
        columns[f"top{rank + 1}"] = labels
    columns["query"] = [
        f"upload: {hits[(a, b)].count} hits, mean cosine {hits[(a, b)].mean_score:.3f}" if (a, b) in hits else ""
        for a, b in zip(i.tolist(), j.tolist())
    ]
    return columns


def query_columns(cells: Sequence[CellHit], size: int, limit: int = 10) -> dict[str, list]:
    """Build the data of the upload's highlighted cells: outline rectangles and rank labels.

    Returns
    -------
    dict of str to list
        ``x``, ``y``, ``w`` (cell centre and side), ``label`` (rank, 1 = most
        hits), ``label_x``, ``label_y`` (top-left corner of the cell),
        ``line_width`` (wider for more hits), ``count`` and ``score``.
    """
    chosen = list(cells[:limit])
    top = max((cell.count for cell in chosen), default=1)
    return {
        "x": [(cell.j + 0.5) / size for cell in chosen],
        "y": [(cell.i + 0.5) / size for cell in chosen],
        "w": [1.0 / size] * len(chosen),
        "label": [str(rank) for rank in range(1, len(chosen) + 1)],
        "label_x": [cell.j / size for cell in chosen],
        "label_y": [(cell.i + 1) / size for cell in chosen],
        "line_width": [1.5 + 2.5 * cell.count / top for cell in chosen],
        "count": [cell.count for cell in chosen],
        "score": [round(cell.mean_score, 4) for cell in chosen],
    }


def class_completions(layer: LayerData, class_names: Sequence[str]) -> list[str]:
    """Return the names of classes that appear among any cell's top classes, sorted."""
    seen: set[int] = set()
    for level in layer.levels.values():
        values = level.top_class[level.filled]
        seen.update(int(value) for value in np.unique(values) if value >= 0)
    names = [class_names[index] if index < len(class_names) else f"class {index}" for index in seen]
    return sorted(set(names), key=str.lower)
