"""Serving Prefect beyond 127.0.0.1 needs an auth string; with one, strangers get 401."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request

import pytest

from flows.core.errors import TunedeckError
from flows.host import server
from tests.integration.project import free_port

pytestmark = pytest.mark.slow


def test_another_address_without_auth_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(server.AUTH_VARIABLE, raising=False)
    with pytest.raises(TunedeckError, match="set PREFECT_SERVER_API_AUTH_STRING=user:password"):
        server.start(free_port(), root=tmp_path, host="0.0.0.0")
    assert not (tmp_path / ".tunedeck" / "server.json").exists()


def test_with_auth_only_the_team_gets_in(tmp_path, monkeypatch):
    monkeypatch.setenv(server.AUTH_VARIABLE, "team:s3cret")
    url = server.start(free_port(), root=tmp_path, host="127.0.0.2")
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/flows/filter", data=b"{}", timeout=5)
        assert refused.value.code == 401
        token = base64.b64encode(b"team:s3cret").decode()
        request = urllib.request.Request(f"{url}/flows/filter", data=b"{}", headers={
            "Authorization": f"Basic {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
    finally:
        server.stop(root=tmp_path)
