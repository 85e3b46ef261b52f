"""Start the explorer: a Bokeh server running the directory app in ``server/app``.

:func:`serve` runs in the foreground until interrupted (the ``atlas serve``
command); :func:`start_in_thread` runs the same server on its own event loop
in a background thread and returns a handle with the URL and ``stop()``, for
tests and notebooks.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bokeh.application import Application
from bokeh.application.handlers import DirectoryHandler
from bokeh.server.server import Server
from tornado.ioloop import IOLoop

from atlas.config import ServeConfig
from atlas.errors import ConfigError
from server import state

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent / "app"
APP_ROUTE = "/"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# Room in a websocket message beyond the base64 upload itself: the JSON patch
# around it, and uploads up to twice the limit, which the server then rejects
# with a message instead of dropping the connection.
WEBSOCKET_OVERHEAD_BYTES = 1024 * 1024
WEBSOCKET_UPLOAD_FACTOR = 2.0
# Bokeh's own default websocket limit (bokeh.server.tornado, 20 MB); never go below it.
BOKEH_DEFAULT_MESSAGE_BYTES = 20 * 1024 * 1024


def websocket_max_bytes(max_upload_mb: float) -> int:
    """Return the websocket message limit that lets an upload of ``max_upload_mb`` through.

    Base64 turns 3 bytes into 4 characters, so an upload of B bytes arrives
    as a message of about 4/3 · B bytes plus the JSON around it.
    """
    upload = max_upload_mb * 1024 * 1024 * WEBSOCKET_UPLOAD_FACTOR
    return max(BOKEH_DEFAULT_MESSAGE_BYTES, int(upload * 4 / 3) + WEBSOCKET_OVERHEAD_BYTES)


def websocket_origins(config: ServeConfig, port: int) -> list[str]:
    """Return the allowed websocket origins: the configured ones plus the served address itself."""
    origins = list(config.allow_websocket_origin)
    own = [f"{config.host}:{port}"]
    if config.host in LOOPBACK_HOSTS:
        own += [f"localhost:{port}", f"127.0.0.1:{port}"]
    for origin in own:
        if origin not in origins:
            origins.append(origin)
    return origins


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` now (another process may take it later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def make_application(store_paths: list[str]) -> Application:
    """Return the explorer app; the store paths are also the app's ``sys.argv`` arguments."""
    return Application(DirectoryHandler(filename=str(APP_DIR), argv=list(store_paths)))


def _warn_without_icons(store: state.StoreData) -> None:
    """Log a warning for each layer of ``store`` with no rendered icon, whose mosaics are blank."""
    for name in store.layers:
        layer = store.layer(name)
        if not any(layer.has_own_icons(size) for size in layer.sizes):
            logger.warning(
                "store %s has no rendered icons for layer %s, so the explorer shows blank mosaics; "
                "run `atlas render %s --layer %s` first",
                store.path, name, store.path, name,
            )


def _validate(store_paths: list[str], config: ServeConfig) -> None:
    if not store_paths:
        raise ConfigError("no store given; pass at least one store path, e.g. `atlas serve stores/demo.zarr`")
    state.configure(store_paths, config)
    # Opening every store now turns a wrong path into one clear error before the server starts.
    for index in range(len(store_paths)):
        _warn_without_icons(state.get_store(index))
    if config.host not in LOOPBACK_HOSTS:
        logger.warning(
            "the explorer listens on %s, so other machines can reach it; it has no authentication", config.host
        )


def create_server(store_paths: list[str], config: ServeConfig, *, io_loop: IOLoop | None = None) -> Server:
    """Build (without starting) the Bokeh server of the explorer.

    Parameters
    ----------
    store_paths
        Stores to serve; sessions pick one by its position in this list.
    config
        Host, port (0 picks a free port), websocket origins and upload limit.
    io_loop
        The Tornado loop to run on; ``None`` uses the current thread's loop.

    Raises
    ------
    ConfigError
        No store is given.
    StoreError
        A store cannot be opened or has no grids.
    """
    _validate(store_paths, config)
    port = config.port or free_port(config.host)
    return Server(
        {APP_ROUTE: make_application(store_paths)},
        io_loop=io_loop,
        address=config.host,
        port=port,
        allow_websocket_origin=websocket_origins(config, port),
        websocket_max_message_size=websocket_max_bytes(config.max_upload_mb),
    )


def server_url(config: ServeConfig, port: int) -> str:
    """Return the explorer's URL for a browser on this machine."""
    host = config.host
    if host in {"0.0.0.0", "::", ""}:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{APP_ROUTE}"


def serve(
    store_paths: list[str],
    config: ServeConfig,
    *,
    show: bool = False,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the explorer in the foreground until interrupted (Ctrl-C or SIGTERM).

    Parameters
    ----------
    store_paths
        Stores to serve, by local path or URL.
    config
        The ``serve`` section of the configuration.
    show
        Open the explorer in the default web browser.
    ready
        Called with the URL once the server listens.

    Raises
    ------
    ConfigError, StoreError
        No store, or a store that cannot be served.
    """
    server = create_server(store_paths, config)
    server.start()
    url = server_url(config, server.port)
    logger.info("atlas explorer for %d store(s) at %s", len(store_paths), url)
    if ready is not None:
        ready(url)
    if show:
        server.show(APP_ROUTE)

    loop = server.io_loop
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: loop.add_callback_from_signal(loop.stop))
    try:
        loop.start()
    except KeyboardInterrupt:
        logger.info("interrupted; stopping the explorer")
    finally:
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        logger.info("explorer stopped")


@dataclass
class RunningServer:
    """A server started by :func:`start_in_thread`."""

    url: str
    port: int
    server: Server
    thread: threading.Thread
    loop: IOLoop

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and its event loop, and wait for the thread to end."""

        def shutdown() -> None:
            self.server.stop()
            self.loop.stop()

        self.loop.add_callback(shutdown)
        self.thread.join(timeout)
        if self.thread.is_alive():
            logger.warning("explorer thread did not stop within %.0f s", timeout)


def start_in_thread(store_paths: list[str], config: ServeConfig, *, timeout: float = 60.0) -> RunningServer:
    """Start the explorer on its own event loop in a daemon thread.

    ``config.port`` 0 picks a free port. Call ``stop()`` on the result when done.

    Raises
    ------
    ConfigError, StoreError
        As :func:`create_server`.
    TimeoutError
        The server did not start within ``timeout`` seconds.
    """
    started = threading.Event()
    outcome: dict[str, object] = {}

    def run() -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        loop = IOLoop.current()
        try:
            server = create_server(store_paths, config, io_loop=loop)
            server.start()
        except BaseException as error:  # noqa: BLE001 - handed to the calling thread
            outcome["error"] = error
            started.set()
            return
        outcome["server"], outcome["loop"] = server, loop
        started.set()
        try:
            loop.start()
        finally:
            loop.close(all_fds=True)

    thread = threading.Thread(target=run, name="atlas-explorer", daemon=True)
    thread.start()
    if not started.wait(timeout):
        raise TimeoutError(f"the explorer did not start within {timeout:.0f} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    server = outcome["server"]
    url = server_url(config, server.port)  # type: ignore[union-attr]
    logger.info("atlas explorer running in a thread at %s", url)
    return RunningServer(url=url, port=server.port, server=server, thread=thread, loop=outcome["loop"])  # type: ignore[arg-type]
