"""The HTTP edge of a running relay: CORS, unknown resources, the page and the API."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import RelayProcess

pytestmark = pytest.mark.integration


async def test_options_answers_cors_and_accept_post(
    relay: RelayProcess, http_session: aiohttp.ClientSession
) -> None:
    headers = {"Origin": "http://player.example", "Access-Control-Request-Method": "POST"}
    for path in ("/whep/live/test", "/rtc/v1/whep/?app=live&stream=test"):
        async with http_session.options(relay.http + path, headers=headers) as resp:
            assert resp.status == 200, path
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]
            assert "Content-Type" in resp.headers["Access-Control-Allow-Headers"]
            assert resp.headers["Accept-Post"] == "application/sdp"
            assert "Location" in resp.headers["Access-Control-Expose-Headers"]


async def test_delete_of_unknown_session_is_404(
    relay: RelayProcess, http_session: aiohttp.ClientSession
) -> None:
    async with http_session.delete(relay.http + "/whep/live/test/0123456789abcdef") as resp:
        assert resp.status == 404


async def test_player_page_and_api(
    relay: RelayProcess, http_session: aiohttp.ClientSession
) -> None:
    async with http_session.get(relay.http + "/") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        page = await resp.text()
    assert "<video" in page
    async with http_session.get(relay.http + "/api/v1/streams") as resp:
        assert await resp.json() == {"code": 0, "streams": []}
    async with http_session.get(relay.http + "/api/v1/sessions") as resp:
        assert await resp.json() == {"code": 0, "sessions": []}
