"""Server lifecycle hooks of the explorer app: open the stores before the first session."""

from __future__ import annotations

import logging
import sys

from server import state

logger = logging.getLogger(__name__)

# Bokeh runs this module once, with sys.argv set to the app's --args.
APP_ARGUMENTS = sys.argv[1:]


def on_server_loaded(server_context) -> None:
    """Open every store and build the first mosaic, so the first page loads quickly."""
    if not state.is_configured():
        state.configure_from_argv(APP_ARGUMENTS)
    state.preload()
    logger.info("explorer ready with %d store(s)", len(state.store_paths()))
