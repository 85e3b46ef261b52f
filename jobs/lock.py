"""An exclusive write lock on a store, so two jobs never write the same store at once."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from atlas.errors import StoreLockedError
from atlas.store import sidecar_path

logger = logging.getLogger(__name__)


def _holder_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        # A job on another host cannot be checked from here: treat it as live.
        return True
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not psutil.pid_exists(pid):
        return False
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        return False
    # A recycled pid belongs to a process younger than the lock.
    return started <= float(holder.get("created_ts", started)) + 1


@contextmanager
def store_lock(store_path: str | Path, job: str) -> Iterator[Path]:
    """Hold the store's lock file for the duration of the block.

    Raises
    ------
    StoreLockedError
        A live job holds the lock; the message names its host, pid and start time.
    """
    path = sidecar_path(store_path, "lock.json")
    now = _dt.datetime.now(_dt.timezone.utc)
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": job,
        "started": now.isoformat(timespec="seconds"),
        "created_ts": now.timestamp(),
    }
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder and _holder_alive(holder):
                raise StoreLockedError(
                    f"store {store_path} is locked by a running {holder.get('job', 'job')} "
                    f"(host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}); "
                    f"wait for it to finish, or if that job is gone, delete {path}"
                ) from None
            logger.warning("taking over a stale lock on %s left by %s", store_path, holder or "an unreadable lock file")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as handle:
            json.dump(record, handle)
        break
    else:
        raise StoreLockedError(f"could not take the lock on {store_path}: another job took it at the same time; retry")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
