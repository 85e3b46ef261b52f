"""The atlas explorer: a Bokeh directory app over one or more feature stores.

Run it through the project's command line::

    atlas serve stores/demo.zarr [more stores ...] [--port 5006]

or with Bokeh directly, from the repository root::

    bokeh serve server/app --args stores/demo.zarr [more stores ...] [--config config.yaml]

then open http://localhost:5006/ (``atlas serve``) or http://localhost:5006/app
(``bokeh serve``). A store needs its ``grid`` stage (and ``render`` for icons);
uploads need its ``index`` stage.

URL query arguments reopen a view: ``?store=0&layer=blocks.4&zoom=40&cell=12,7&class=espresso``.
``store`` is the position of the store on the command line.

Each session runs this file once; store data, mosaics and the query model are
loaded once per server process by :mod:`server.state`.
"""

from __future__ import annotations

import sys

from bokeh.io import curdoc

from server import state
from server.explorer import Explorer

if not state.is_configured():
    # Started by `bokeh serve server/app --args ...` rather than server.serve.serve().
    state.configure_from_argv(sys.argv[1:])

document = curdoc()
context = document.session_context
request = context.request if context is not None else None
Explorer(document, request.arguments if request is not None else {})
