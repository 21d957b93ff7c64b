"""Token usage read from runner responses as they stream past (interface; issue 6 fills it)."""

from __future__ import annotations

from typing import Protocol

__all__ = ["UsageParser", "parser_for"]


class UsageParser(Protocol):
    prompt_tokens: int
    completion_tokens: int
    model: str | None

    def feed(self, data: bytes) -> None: ...


def parser_for(content_type: str | None, path: bytes) -> UsageParser | None:
    return None
