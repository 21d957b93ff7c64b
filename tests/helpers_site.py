"""A Resource for tests of site.py that drive a channel by hand."""

from __future__ import annotations

import os

import pytest
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET, Request

# RUNNER_GATEWAY_FASTPATH=off (CI runs the suite once that way): the gateway
# is Twisted's own code, and tests about a fast path have nothing to test.
FASTPATH_OFF = os.environ.get("RUNNER_GATEWAY_FASTPATH", "").strip().lower() == "off"
needs_fastpath = pytest.mark.skipif(
    FASTPATH_OFF, reason="about a fastpath fix; RUNNER_GATEWAY_FASTPATH=off"
)


class Unanswered(resource.Resource):
    """Keeps every request it renders, unanswered: the test writes and finishes."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> int:
        self.requests.append(request)
        return NOT_DONE_YET
