"""The command's own temporary Prefect server, started first thing when no server is configured.

Prefect's ephemeral mode starts the same temporary server (uvicorn over the API, no UI) when the first
flow is called: by then the command has imported torch and loaded its models, and this process must
also import Prefect's server modules (seconds) to start it. Started here as a subprocess before any
of that, it comes up on another core while this process imports and loads; the flows then talk to it
as to any configured server, and it stops with the command. Design note 23.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STARTUP_TIMEOUT_S = 120.0


def _site_packages_of(package: str) -> str:
    """The folder `package` is imported from, found without importing it."""
    return str(Path(importlib.util.find_spec(package).origin).parent.parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryServer:
    """A Prefect API server in a subprocess of this command: `wait_ready()` before the first flow."""

    def __init__(self) -> None:
        # Started before this process imports Prefect (design note 23): the command line needs only
        # where Prefect lives, and the server reads the same environment and profile as this process.
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", _site_packages_of("prefect"),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"], env=env)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {self.process.returncode} "
                                   "before it was ready (its output is above)")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the temporary Prefect server on port {self.port} was not ready in {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def prefect_server_configured() -> bool:
    """A Prefect API URL is set (environment or profile). Here, not in `flows.runtime`: this module is
    imported first thing by `build`, before dask and prefect-dask."""
    from prefect.settings import PREFECT_API_URL

    return bool(os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value())


@contextmanager
def temporary_server() -> Iterator[TemporaryServer | None]:
    """A temporary server for the body, its URL set as this process's (and its children's) Prefect API;
    None, and nothing left running, when a server is configured or ephemeral mode is turned off.

    With no PREFECT_API_URL in the environment the server starts first and Prefect's own settings
    (a profile may name a server too) are read while it starts; it is stopped at once if they say so.
    Flow-run heartbeats are off against it: they let a server mark a run crashed once they stop, but
    this server stops with the command, and each flow's end waits for its heartbeat thread to wake from
    its one-second sleeps."""
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    server = TemporaryServer()
    try:
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
            PREFECT_SERVER_EPHEMERAL_ENABLED,
            temporary_settings,
        )

        if prefect_server_configured() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            server.stop()
            yield None
            return
        os.environ["PREFECT_API_URL"] = server.api_url  # threads without the context, and subprocesses
        with temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield server
    finally:
        if os.environ.get("PREFECT_API_URL") == server.api_url:
            os.environ.pop("PREFECT_API_URL")
        server.stop()
