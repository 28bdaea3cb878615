"""Secret references and the masked value type that keeps secrets out of every output."""

from __future__ import annotations

import logging
import re
import secrets as _random
import string
import threading
from dataclasses import dataclass

from crashcart.errors import InvalidInput

MASK = "********"

_REF_RE = re.compile(r"^vault:(?P<mount>[A-Za-z0-9][A-Za-z0-9_-]*)/(?P<path>[A-Za-z0-9][A-Za-z0-9_./-]*)#(?P<key>[A-Za-z0-9_.-]+)$")

_known: set[str] = set()
_known_lock = threading.Lock()


class Secret:
    """A secret value that prints as a mask; `reveal()` is the only way to the value.

    Every Secret registers its value so that `mask()` can scrub it from any text
    (stderr of a remote command, an exception message, a log line) as a second line of defence.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret holds text")
        self._value = value
        if len(value) >= 4:
            with _known_lock:
                _known.add(value)

    def reveal(self) -> str:
        """Return the plain value; call only at the boundary that needs it."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and _random.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(("Secret", len(self._value)))

    def __reduce__(self):  # pickling would carry the value into Prefect results
        raise TypeError("a Secret cannot be serialised")


def mask(text: str) -> str:
    """Replace every known secret value in `text` with the mask."""
    if not text:
        return text
    with _known_lock:
        values = sorted(_known, key=len, reverse=True)
    for value in values:
        if value in text:
            text = text.replace(value, MASK)
    return text


def generate_password(length: int = 32) -> Secret:
    """A random password from letters and digits (no characters that trouble chpasswd or shells)."""
    alphabet = string.ascii_letters + string.digits
    return Secret("".join(_random.choice(alphabet) for _ in range(length)))


@dataclass(frozen=True)
class SecretRef:
    """A reference to a secret in Vault KV v2: `vault:MOUNT/PATH#KEY`."""

    mount: str
    path: str
    key: str

    @classmethod
    def parse(cls, text: str) -> "SecretRef":
        m = _REF_RE.fullmatch(text or "")
        if not m or ".." in m["path"].split("/"):
            raise InvalidInput(
                f"secret reference {text!r} is malformed: write it as vault:MOUNT/PATH#KEY, "
                "e.g. vault:secret/hosts/web-1#root_password"
            )
        return cls(m["mount"], m["path"].rstrip("/"), m["key"])

    def __str__(self) -> str:
        return f"vault:{self.mount}/{self.path}#{self.key}"


class MaskingFilter(logging.Filter):
    """A logging filter that scrubs known secret values from every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is not ours to fix here
            return True
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def install_log_masking() -> None:
    """Attach the masking filter to every handler of the root and Prefect loggers."""
    flt = MaskingFilter()
    for name in ("", "prefect", "crashcart"):
        logger = logging.getLogger(name)
        logger.addFilter(flt)
        for handler in logger.handlers:
            handler.addFilter(flt)
