"""A Resource for tests of site.py that drive a channel by hand."""

from __future__ import annotations

from twisted.web import resource
from twisted.web.server import NOT_DONE_YET, Request


class Unanswered(resource.Resource):
    """Keeps every request it renders, unanswered: the test writes and finishes."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> int:
        self.requests.append(request)
        return NOT_DONE_YET
