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
from atlas.store import is_store_url, sidecar_path

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


def _locked_error(store_path: str | Path, holder: dict, where: str) -> StoreLockedError:
    return StoreLockedError(
        f"store {store_path} is locked by a running {holder.get('job', 'job')} "
        f"(host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}); "
        f"wait for it to finish, or if that job is gone, delete {where}"
    )


@contextmanager
def _url_lock(store_url: str, record: dict) -> Iterator[str]:
    """Hold ``sidecar/lock.json`` inside a store at an fsspec URL.

    NOTE: object stores have no exclusive create, so two jobs that start in
    the same moment can both pass the check. Reading the file back after
    writing it catches most such races, not all.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(store_url)
    path = f"{root.rstrip('/')}/sidecar/lock.json"
    url = f"{store_url.rstrip('/')}/sidecar/lock.json"
    if fs.exists(path):
        try:
            holder = json.loads(fs.cat_file(path) or b"{}")
        except (OSError, json.JSONDecodeError):
            holder = {}
        if holder and _holder_alive(holder):
            raise _locked_error(store_url, holder, url)
        logger.warning("taking over a stale lock on %s left by %s", store_url, holder or "an unreadable lock file")
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(record).encode())
    if json.loads(fs.cat_file(path)) != record:
        raise StoreLockedError(f"could not take the lock on {store_url}: another job took it at the same time; retry")
    try:
        yield url
    finally:
        fs.rm_file(path)


@contextmanager
def store_lock(store_path: str | Path, job: str) -> Iterator[Path | str]:
    """Hold the store's lock file for the duration of the block.

    The lock is ``sidecar/lock.json`` in the store, created exclusively on a
    local disk and through fsspec for a store at a URL. The block receives its
    path or URL.

    Raises
    ------
    StoreLockedError
        A live job holds the lock; the message names its host, pid and start time.
    """
    now = _dt.datetime.now(_dt.timezone.utc)
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": job,
        "started": now.isoformat(timespec="seconds"),
        "created_ts": now.timestamp(),
    }
    if is_store_url(store_path):
        with _url_lock(str(store_path), record) as url:
            yield url
        return
    path = sidecar_path(store_path, "lock.json")
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder and _holder_alive(holder):
                raise _locked_error(store_path, holder, str(path)) from None
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
