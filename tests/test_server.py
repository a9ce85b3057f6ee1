"""The command's own temporary Prefect server (`flows.server`): started before Prefect is imported, so it
must also stop itself when Prefect's settings name a server after all."""

from __future__ import annotations

import os

import psutil
import pytest
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from flows.server import temporary_server

SOME_SERVER = "http://127.0.0.1:9/api"


def _uvicorn_children() -> set[int]:
    """This process's running uvicorn subprocesses (the tests' own Prefect harness may have one too)."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "uvicorn" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture
def no_api_url_in_environment(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)


def test_none_started_when_the_environment_names_a_server(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", SOME_SERVER)
    before = _uvicorn_children()
    with temporary_server() as server:
        assert server is None
        assert _uvicorn_children() == before


def test_stopped_at_once_when_the_settings_name_a_server(no_api_url_in_environment):
    """A profile's PREFECT_API_URL is seen only once Prefect is imported, after the server started."""
    before = _uvicorn_children()
    with temporary_settings(updates={PREFECT_API_URL: SOME_SERVER}):
        with temporary_server() as server:
            assert server is None
            assert _uvicorn_children() == before  # stopped before the body runs, not when the command ends
            assert get_current_settings().api.url == SOME_SERVER


def test_its_url_is_the_api_heartbeats_are_off_and_it_stops(no_api_url_in_environment):
    before = _uvicorn_children()
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        default_heartbeat = get_current_settings().flows.heartbeat_frequency
        with temporary_server() as server:
            assert server is not None and _uvicorn_children() == before | {server.process.pid}
            assert get_current_settings().api.url == server.api_url == os.environ["PREFECT_API_URL"]
            assert get_current_settings().flows.heartbeat_frequency is None
        assert server.process.poll() is not None and _uvicorn_children() == before
        assert "PREFECT_API_URL" not in os.environ
        assert get_current_settings().flows.heartbeat_frequency == default_heartbeat is not None
