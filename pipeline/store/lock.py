"""One writer per dataset (or per trainer round): an exclusive lock file holding host and pid."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import UTC, datetime

import fsspec

from pipeline.store.files import write_atomic
from pipeline.store.layout import Store


class LockedError(RuntimeError):
    pass


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


class DatasetLock:
    """One writer per dataset: an exclusive lock file holding host and pid; stale locks are taken over."""

    def __init__(self, store: Store, wait_s: float = 0.0, name: str = ".lock", folder: str | None = None):
        # `folder` (a store path, e.g. a round's folder) gives other exclusive jobs on the dataset their
        # own lock: a training round per version.
        self.store = store
        self.path = f"{folder or store.dir}/{name}"
        self.wait_s = wait_s
        self._held = False

    def _owner(self) -> dict | None:
        try:
            with self.store.fs.open(self.path, "rb") as f:
                return json.loads(f.read() or b"{}")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _stale(self, owner: dict | None) -> bool:
        if not owner or owner.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(owner["pid"]), 0)
            return False
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False

    def _create_exclusive(self, data: bytes) -> None:
        if _is_local(self.store.fs):
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return
        # Object stores have no exclusive create: check-then-write is best effort there; run one
        # builder per dataset on such roots (a Prefect deployment's concurrency limit does that).
        if self.store.fs.exists(self.path):
            raise FileExistsError(self.path)
        write_atomic(self.store.fs, self.path, data)

    def acquire(self) -> DatasetLock:
        fs = self.store.fs
        fs.makedirs(self.store.dir, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}).encode()
        while True:
            try:
                self._create_exclusive(me)
                self._held = True
                return self
            except FileExistsError:
                owner = self._owner()
                if self._stale(owner):
                    self.store.fs.rm(self.path)
                    continue
                if time.monotonic() >= deadline:
                    raise LockedError(
                        f"dataset {self.store.dataset!r} is locked ({self.path}) by another process "
                        f"({owner}); wait for it, or remove {self.path} if that process is gone"
                    ) from None
                time.sleep(0.5)

    def release(self) -> None:
        if self._held:
            try:
                self.store.fs.rm(self.path)
            except FileNotFoundError:
                pass
            self._held = False

    def __enter__(self) -> DatasetLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

