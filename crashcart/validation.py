"""Allowlist validators for every value that can reach a remote command or a file path."""

from __future__ import annotations

import ipaddress
import re

from crashcart.errors import InvalidInput

# A first character from the class forbids a leading '-' (option injection) and '.'.
_PATTERNS = {
    "host name": (re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"), "letters, digits, '.', '_' and '-' (not first), at most 63"),
    "group name": (re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"), "letters, digits, '.', '_' and '-' (not first), at most 63"),
    "zone name": (re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,16}$"), "letters, digits, '_' and '-' (not first), at most 17"),
    "interface name": (re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,14}$"), "letters, digits, '_', '.', '@' and '-' (not first), at most 15"),
    "user name": (re.compile(r"^[a-z_][a-z0-9_-]{0,31}$"), "lower-case letters, digits, '_' and '-' (not first), at most 32"),
    "service name": (re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"), "letters, digits, '_', '.' and '-' (not first)"),
    "incident id": (re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"), "letters, digits, '.', '_', ':' and '-' (not first), at most 64"),
    "identifier": (re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"), "letters, digits, '.', '_' and '-' (not first), at most 64"),
}
_PATH_RE = re.compile(r"^/[A-Za-z0-9._@+/-]*$")
_DNS_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _check(kind: str, value: object) -> str:
    pattern, allowed = _PATTERNS[kind]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidInput(f"{kind} {value!r} is not allowed: use {allowed}")
    return value


def host_name(value: object) -> str:
    """A host name as used in the inventory and on the command line."""
    return _check("host name", value)


def group_name(value: object) -> str:
    return _check("group name", value)


def zone_name(value: object) -> str:
    """A firewalld zone or policy name."""
    return _check("zone name", value)


def interface_name(value: object) -> str:
    return _check("interface name", value)


def user_name(value: object) -> str:
    """A POSIX account name."""
    return _check("user name", value)


def service_name(value: object) -> str:
    return _check("service name", value)


def incident_id(value: object) -> str:
    return _check("incident id", value)


def identifier(value: object) -> str:
    """A repository, runbook, scenario or key name."""
    return _check("identifier", value)


def dns_name(value: object) -> str:
    """A DNS name for a certificate (no wildcards)."""
    if not isinstance(value, str) or not _DNS_RE.fullmatch(value):
        raise InvalidInput(f"DNS name {value!r} is not allowed: use letters, digits, '-' and '.' labels")
    return value


def ip_address(value: object) -> str:
    """An IPv4 or IPv6 address, normalised."""
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise InvalidInput(f"address {value!r} is not an IP address") from None


def network(value: object) -> str:
    """A CIDR network, normalised (host bits must be zero)."""
    try:
        return str(ipaddress.ip_network(str(value), strict=True))
    except ValueError as e:
        raise InvalidInput(f"network {value!r} is not a CIDR network ({e})") from None


def port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidInput(f"port {value!r} is not an integer from 1 to 65535")
    return value


def remote_path(value: object) -> str:
    """An absolute path on a host: no '..', no spaces, quotes or shell characters."""
    if not isinstance(value, str) or not _PATH_RE.fullmatch(value) or ".." in value.split("/") or "//" in value:
        raise InvalidInput(
            f"path {value!r} is not allowed: use an absolute path of letters, digits and . _ @ + - /"
        )
    return value.rstrip("/") or "/"


def free_text(value: object, what: str = "text", limit: int = 500) -> str:
    """Operator text such as a reason: printable, one line, bounded. Never sent to a shell."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what} must not be empty")
    if len(value) > limit:
        raise InvalidInput(f"{what} is longer than {limit} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidInput(f"{what} must be one line without control characters")
    return value.strip()
