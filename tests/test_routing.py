"""Longest-prefix routing on whole path segments."""

from __future__ import annotations

import pytest
from twisted.web.resource import Resource

from runner_gateway.settings import RunnerSettings
from runner_gateway.tree import Route, match_route


def route(path: str) -> Route:
    return Route(RunnerSettings(name=path, host="127.0.0.1", port=1, path=path), Resource())


ROUTES = [route("/"), route("/corp"), route("/corp/eu"), route("/local-ollama")]


@pytest.mark.parametrize(
    ("raw", "prefix", "rest"),
    [
        (b"/local-ollama/api/tags", "/local-ollama", b"/api/tags"),
        (b"/corp", "/corp", b"/"),
        (b"/corp/", "/corp", b"/"),
        (b"/corp/api/chat", "/corp", b"/api/chat"),
        (b"/corp/eu/api/chat", "/corp/eu", b"/api/chat"),
        (b"/corporate/api/chat", "/", b"/corporate/api/chat"),  # whole segments only
        (b"/api/tags", "/", b"/api/tags"),
        (b"/", "/", b"/"),
        (b"/corp%2Feu/api", "/", b"/corp%2Feu/api"),  # raw path: no decoding before matching
    ],
)
def test_longest_prefix(raw: bytes, prefix: str, rest: bytes) -> None:
    found = match_route(ROUTES, raw)
    assert found is not None
    assert (found[0].runner.path, found[1]) == (prefix, rest)


def test_no_match_without_root_runner() -> None:
    routes = [route("/corp")]
    assert match_route(routes, b"/corporate") is None
    assert match_route(routes, b"/") is None
    assert match_route(routes, b"*") is None
