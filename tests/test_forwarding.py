"""forwarding.py: server.trustedProxies and the client address behind them."""

from __future__ import annotations

import pytest

from runner_gateway.forwarding import TrustedProxies, client_address, parse_trusted_proxies


def test_empty_trusts_nobody() -> None:
    nobody = TrustedProxies()
    assert not nobody
    assert not nobody.is_trusted("127.0.0.1")


def test_networks_and_mapped_addresses() -> None:
    trusted = parse_trusted_proxies(["10.0.0.0/8", "::1", "192.0.2.7"])
    assert trusted
    assert trusted.is_trusted("10.1.2.3")
    assert trusted.is_trusted("::ffff:10.1.2.3")
    assert trusted.is_trusted("::1")
    assert trusted.is_trusted("192.0.2.7")
    assert not trusted.is_trusted("192.0.2.8")
    assert not trusted.is_trusted("11.0.0.1")
    assert not trusted.is_trusted("not an address")
    assert not trusted.is_trusted("")
    # Answers are remembered, and the same again.
    assert trusted.is_trusted("10.1.2.3")


@pytest.mark.parametrize("bad", ["10.0.0.1/8", "10.0.0.0/33", "example.com", "", 10, None, True])
def test_strict_parsing(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_trusted_proxies([bad])


def test_client_address() -> None:
    trusted = parse_trusted_proxies(["10.0.0.0/8"])
    # An untrusted peer is the client, whatever it claims.
    assert client_address("203.0.113.5", trusted, [b"1.2.3.4"]) == "203.0.113.5"
    # A trusted one: the right-most address that is not a trusted proxy.
    assert client_address("10.0.0.2", trusted, [b"1.2.3.4, 198.51.100.9, 10.0.0.9"]) == (
        "198.51.100.9"
    )
    assert client_address("10.0.0.2", trusted, [b"1.2.3.4", b"10.0.0.9"]) == "1.2.3.4"
    assert client_address("10.0.0.2", trusted, [b"10.0.0.7, 10.0.0.9"]) == "10.0.0.7"
    assert client_address("10.0.0.2", trusted, []) == "10.0.0.2"
    # A malformed hop ends the walk at the last trusted one.
    assert client_address("10.0.0.2", trusted, [b"1.2.3.4, junk, 10.0.0.9"]) == "10.0.0.9"
