"""paths.canonical_path: one RFC 3986 form of a path, or a refusal (issue 16, finding 3)."""

from __future__ import annotations

import pytest

from runner_gateway.paths import BadPath, canonical_path


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        (b"/api/chat", b"/api/chat"),
        (b"/", b"/"),
        (b"/api/%74ags", b"/api/tags"),
        (b"/v1/%6Dodels", b"/v1/models"),
        (b"/%63orp/api/tags", b"/corp/api/tags"),
        (b"/a/%7e%2d%5F%41", b"/a/~-_A"),
        # reserved characters keep their escape, upper-cased
        (b"/v1/models/llama3%3a8b", b"/v1/models/llama3%3A8b"),
        (b"/x/%c3%a9", b"/x/%C3%A9"),
        (b"/.well-known/x", b"/.well-known/x"),
        (b"/a/b.c/..d/.e.", b"/a/b.c/..d/.e."),
        (b"//api/chat", b"//api/chat"),  # not ours to merge: stays unclassified
    ],
)
def test_canonical(given: bytes, canonical: bytes) -> None:
    assert canonical_path(given) == canonical


def test_a_canonical_path_is_returned_as_is() -> None:
    path = b"/api/chat"
    assert canonical_path(path) is path


@pytest.mark.parametrize(
    ("given", "why"),
    [
        (b"/api%2Ftags", "encoded '/'"),
        (b"/api%2ftags", "encoded '/'"),
        (b"/api%5Ctags", "encoded backslash"),
        (b"/api\\tags", "backslash"),
        (b"/api/../api/pull", "segment"),
        (b"/api/./tags", "segment"),
        (b"/api/..", "segment"),
        (b"/api/%2e%2e/api/pull", "segment"),
        (b"/api/%2E/tags", "segment"),
        (b"/api/.%2e", "segment"),
        (b"/api/%00", "control"),
        (b"/api/%7f", "control"),
        (b"/api/%0d%0aX: y", "control"),
        (b"/api/\x00", "control"),
        (b"/api/\x7f", "control"),
        (b"/api/\x0btags", "control"),
        (b"/api/%", "malformed"),
        (b"/api/%4", "malformed"),
        (b"/api/%zz", "malformed"),
        (b"/api/%c3%28", "UTF-8"),
        (b"/api/%ff", "UTF-8"),
        (b"/api/\xc3\xa9", "ASCII"),
        (b"/api/\x80", "ASCII"),
    ],
)
def test_refused(given: bytes, why: str) -> None:
    with pytest.raises(BadPath, match=why):
        canonical_path(given)
