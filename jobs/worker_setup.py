"""Set-up that each worker process started by `atlas` runs before it takes tasks (a Dask preload)."""

from __future__ import annotations

import signal


def dask_setup(worker) -> None:
    """Ignore SIGINT in this worker process, so Ctrl-C stops the job from the driver alone.

    A terminal sends Ctrl-C to its whole foreground process group, worker
    processes included. Without this each worker would print its own
    KeyboardInterrupt traceback; the driver closes the cluster instead.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
