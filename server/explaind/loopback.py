"""Which hosts are this machine alone: one rule for the server's warning that tokens cross
the network in plaintext and the SDK's, so the two never disagree. Neither torch nor gRPC
is imported here."""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or address without a port; an IPv6 address bare or in
    brackets) reaches this machine alone: "localhost" and names under ".localhost", which
    RFC 6761 reserves for loopback, and loopback addresses, IPv4's written as IPv6
    ("::ffff:127.0.0.1") included. Not "0.0.0.0" nor "::" (every interface), nor another
    name, which may resolve elsewhere."""
    name = host.removeprefix("[").removesuffix("]").lower().removesuffix(".")  # "localhost." is the same name, fully qualified
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    # "::ffff:127.0.0.1", IPv4's loopback on an IPv6 socket: Python before 3.13 says no loopback.
    return address.is_loopback or bool(isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped and address.ipv4_mapped.is_loopback)
