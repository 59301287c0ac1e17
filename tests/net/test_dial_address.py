"""One address grammar for every side (issue 9): dial addresses, listen addresses, formatting."""

from __future__ import annotations

import pytest

from fleetpush.net import DEFAULT_PORT, AddressError, format_address, parse_address

ACCEPTED = {
    "host and port": ("releaser.example:8000", ("releaser.example", 8000)),
    "IPv4 and port": ("127.0.0.1:7001", ("127.0.0.1", 7001)),
    "host alone takes the default port": ("releaser.example", ("releaser.example", DEFAULT_PORT)),
    "bracketed IPv6 and port": ("[::1]:9000", ("::1", 9000)),
    "bracketed IPv6 alone takes the default port": ("[fe80::1]", ("fe80::1", DEFAULT_PORT)),
    "surrounding blanks are ignored": ("  10.0.0.2:1  ", ("10.0.0.2", 1)),
    "highest port": ("h:65535", ("h", 65535)),
}

REFUSED = {
    "empty": ("", "empty"),
    "blank": ("   ", "empty"),
    "no host before the port": (":80", "no host"),
    "a colon and nothing else": (":", "no host"),
    "unbracketed with two colons": ("bad:addr:x", "brackets"),
    "unbracketed IPv6": ("::1", "brackets"),
    "port not a number": ("host:http", "not a number"),
    "signed port": ("host:+80", "not a number"),
    "empty port after the colon": ("host:", "not a number"),
    "port above 65535": ("host:65536", "1-65535"),
    "port 0 when dialling": ("host:0", "1-65535"),
    "unclosed bracket": ("[::1:80", "']'"),
    "garbage after the bracket": ("[::1]x80", "[IPV6]:PORT"),
    "brackets around a name": ("[releaser]:80", "not an IPv6 address"),
    "blank inside the host": ("rel easer:80", "not a host"),
}


@pytest.mark.parametrize(("text", "expected"), list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_accepted(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(("text", "why"), list(REFUSED.values()), ids=list(REFUSED))
def test_refused_with_one_sentence_naming_the_address(text: str, why: str) -> None:
    with pytest.raises(AddressError) as refused:
        parse_address(text)
    message = str(refused.value)
    assert why in message
    assert repr(text) in message
    assert "\n" not in message


def test_address_error_is_a_value_error() -> None:
    # callers that only know ValueError (argparse type= functions) still catch it
    with pytest.raises(ValueError):
        parse_address(":80")


def test_default_port_is_the_callers() -> None:
    assert parse_address("h", default_port=1234) == ("h", 1234)
    assert parse_address("h:1", default_port=1234) == ("h", 1)


def test_listen_allows_port_zero() -> None:
    assert parse_address("127.0.0.1:0", listen=True) == ("127.0.0.1", 0)
    assert parse_address("[::1]:0", listen=True) == ("::1", 0)
    assert parse_address("0.0.0.0:7878", listen=True) == ("0.0.0.0", 7878)


@pytest.mark.parametrize(
    ("text", "why"),
    [(":0", "no host"), (":7878", "no host"), ("h:65536", "0-65535"), ("a:b:c", "brackets")],
)
def test_listen_still_needs_a_host_and_a_real_port(text: str, why: str) -> None:
    with pytest.raises(AddressError, match=why):
        parse_address(text, listen=True)


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("127.0.0.1", 7878, "127.0.0.1:7878"),
        ("releaser.example", 1, "releaser.example:1"),
        ("::1", 9000, "[::1]:9000"),
        ("fe80::1%eth0", 80, "[fe80::1%eth0]:80"),
    ],
)
def test_format_brackets_ipv6_and_reads_back(host: str, port: int, text: str) -> None:
    assert format_address(host, port) == text
    assert parse_address(text) == (host, port)
