"""What the gateway knows about one request as it passes through the layers.

The Resource tree creates it, the auth wrapper adds the verified claims, the
policy adds the route class and model, the proxy records the upstream
exchange, and the access log and metrics read it when the request ends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from twisted.web.iweb import IRequest

    from runner_gateway.settings import RunnerSettings
    from runner_gateway.usage import UsageChunkFilter, UsageParser

from runner_gateway.usage import parser_for

__all__ = ["RequestContext", "RequestObserver", "context_of"]


class RequestObserver(Protocol):
    """Told when a response starts and when a request ends (metrics)."""

    def response_started(self, ctx: RequestContext) -> None: ...

    def request_finished(self, ctx: RequestContext) -> None: ...


@dataclass
class RequestContext:
    request_id: str
    started: float  # reactor.seconds() when the request line arrived
    runner: RunnerSettings | None = None
    upstream_path: bytes = b""  # path (and query) as sent to the runner
    route: str = "other"  # bounded label: endpoint class or a known path
    scope: str = ""  # the scope the endpoint needs (policy.py), once authorized
    host: str | None = None  # host:port of the pool's host that took the request
    queue_wait: float | None = None  # seconds spent in the runner's queue
    claims: Mapping[str, Any] | None = None
    model: str | None = None
    status: int | None = None
    first_byte: float | None = None  # reactor.seconds() of the first body byte to the client
    bytes_sent: int = 0
    aborted: bool = False
    upstream_error: str | None = None  # connect, tls, timeout, reset, protocol
    header_values_dropped: int = 0  # runner header values left out (control characters)
    trusted_peer: bool = False  # the peer is in server.trustedProxies
    auth_failure: str | None = None  # reason label when the auth wrapper refused
    # Set by the auth wrapper's head check (auth.py check_head): the wrapper
    # that decided and its refusal (None: authenticated), so render does not
    # verify the token twice.
    head_auth: tuple[Any, Any] | None = None
    usage: UsageParser | None = None
    # When set, the proxy buffers the (small) upstream body and sends
    # transform(body) instead, with a corrected Content-Length: used to
    # filter model listings down to what the token may see.
    response_transform: Callable[[bytes], bytes] | None = None
    # Set when the gateway asked the runner for usage the client did not ask
    # for (admission.py): the proxy passes the stream through it.
    body_filter: UsageChunkFilter | None = None
    observers: list[RequestObserver] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # What waits until the bytes it concerns are on their way to the client
    # (after_send): observers hearing that the response started, and the body
    # chunks whose usage is not read yet. So that neither holds back a stream's
    # first bytes; the site calls after_send once more before the access log.
    start_pending: bool = False
    unread: list[bytes] = field(default_factory=list)
    response_type: str | None = None  # the runner's Content-Type, for the usage parser

    @property
    def subject(self) -> str | None:
        if self.claims is None:
            return None
        sub = self.claims.get("sub")
        return sub if isinstance(sub, str) else None

    @property
    def openai_style(self) -> bool:
        """Errors on OpenAI-compatible paths use OpenAI's error shape."""
        return self.upstream_path.startswith(b"/v1/") or self.upstream_path == b"/v1"

    def response_started(self, content_type: str | None) -> None:
        """Called by the proxy once upstream headers are in; the usage parser is
        made, and observers hear of it, at the next :meth:`after_send`."""
        self.response_type = content_type
        self.start_pending = True

    def response_chunk(self, data: bytes) -> None:
        """Called by the proxy for every body chunk it wrote; its usage is read
        at the next :meth:`after_send`."""
        if self.usage is not None or self.start_pending:
            self.unread.append(data)

    def after_send(self) -> None:
        """Tell the observers the response started, and feed the usage parser
        the chunks written since the last call."""
        if self.start_pending:
            self.start_pending = False
            self.usage = parser_for(self.response_type, self.upstream_path)
            for observer in self.observers:
                observer.response_started(self)
        unread = self.unread
        if unread:
            self.unread = []
            usage = self.usage
            if usage is not None:
                for data in unread:
                    usage.feed(data)

    def stream_complete(self) -> bool:
        """Whether the runner's last event has gone to the client (usage.py's
        ``ended``): a client that leaves after it did not abort the stream."""
        self.after_send()
        return self.usage is not None and self.usage.ended


def context_of(request: IRequest) -> RequestContext:
    """The context the gateway's Request subclass carries."""
    ctx = getattr(request, "gateway_context", None)
    if ctx is None:
        raise LookupError("request has no gateway context (not served by GatewaySite?)")
    assert isinstance(ctx, RequestContext)
    return ctx
