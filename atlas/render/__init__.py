"""Feature visualization by activation maximization: icons for atlas cells and single channels.

Modules follow the pipeline: :mod:`~atlas.render.param` (the image
parameterization), :mod:`~atlas.render.transforms` (random shifts, zooms and
rotations), :mod:`~atlas.render.objectives` (what is maximized),
:mod:`~atlas.render.render` (the batched optimizer) and
:mod:`~atlas.render.stage` (the pipeline stage over a store's grids).
"""

from __future__ import annotations

from atlas.render.objectives import Objective, channel, direction, direction_cosine, neuron
from atlas.render.param import FourierImage
from atlas.render.render import RenderResult, optimize_images, render_channel, render_directions
from atlas.render.stage import run_render, write_mosaic

__all__ = [
    "FourierImage",
    "Objective",
    "RenderResult",
    "channel",
    "direction",
    "direction_cosine",
    "neuron",
    "optimize_images",
    "render_channel",
    "render_directions",
    "run_render",
    "write_mosaic",
]
