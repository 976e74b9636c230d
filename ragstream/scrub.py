"""One scrubber for everything ragstream stores, publishes, logs or prints.

Error text from upstream services (HTTP bodies, exception messages, stack traces) may echo a
credential: an API that answers 401 with the Authorization header it received, a driver that
names the URL it could not reach. Every such text passes through a `Scrubber` before it reaches
PostgreSQL (status reasons, journey details), the DLQ's headers, log lines or a command's
output. It masks, with `***`:

- every configured secret value (`Scrubber.from_settings`: the settings' SecretStr fields and a
  password inside `postgres.url`), as is, URL-quoted and JSON- or repr-escaped;
- common credential shapes, configured or not: `Bearer <token>` and `Basic <token>`, the
  password in `scheme://user:password@host`, OpenAI-style `sk-…` keys, LlamaCloud `llx-…`
  keys, AWS access key ids, and `api_key=…` / `"password": "…"` style assignments.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, urlsplit

from pydantic import SecretStr

if TYPE_CHECKING:
    from ragstream.settings import Settings

MASK: Final = "***"
_MIN_SECRET_LEN: Final = 4  # shorter values would mask common words; shapes still apply

# (pattern, replacement): group 1, where there is one, is kept.
_SHAPES: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    (re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)[^\s/@]+@"), r"\1" + MASK + "@"),
    (re.compile(r"(?i)(\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{4,}"), r"\1" + MASK),
    (re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_-]{12,}"), MASK),
    (re.compile(r"\bllx-[A-Za-z0-9_-]{12,}"), MASK),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), MASK),
    (
        re.compile(
            r"""(?ix)
            (["']?\b(?:api[_-]?key|apikey|access[_-]?token|client[_-]?secret|password|passwd|
                       secret|token|authorization|x-api-key)\b["']?\s*[:=]\s*["']?)
            (?!\*\*\*)[^\s"',;&}]{4,}
            """
        ),
        r"\1" + MASK,
    ),
)


class Scrubber:
    """Masks secrets in text; `scrubber(text)`. Built once per process from the settings."""

    def __init__(self, secrets: Iterable[str | SecretStr | None] = ()) -> None:
        variants: set[str] = set()
        for secret in secrets:
            value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
            if not value or len(value) < _MIN_SECRET_LEN:
                continue
            for form in (value, quote(value, safe="")):  # as is, in a URL, escaped in JSON/repr
                variants |= {form, json.dumps(form)[1:-1], repr(form)[1:-1]}
        ordered = sorted(variants, key=len, reverse=True)
        self._values = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @classmethod
    def from_settings(cls, settings: Settings) -> Scrubber:
        return cls(secret_values(settings))

    def __call__(self, text: str) -> str:
        if self._values is not None:
            text = self._values.sub(MASK, text)
        for pattern, replacement in _SHAPES:
            text = pattern.sub(replacement, text)
        return text

    def bytes(self, value: bytes) -> bytes:
        """The same for a header value (UTF-8; undecodable bytes are kept as they are)."""
        try:
            text = value.decode()
        except UnicodeDecodeError:
            return value
        return self(text).encode()


def secret_values(settings: Settings) -> list[str]:
    """Every secret the settings hold: the SecretStr fields and a password inside postgres.url."""
    from ragstream.settings import SECRET_KEYS

    values: list[str] = []
    for dotted in SECRET_KEYS:
        node: Any = settings
        for part in dotted.split("."):
            node = getattr(node, part, None)
        if isinstance(node, SecretStr):
            values.append(node.get_secret_value())
    if settings.postgres.url:
        password = urlsplit(settings.postgres.url).password
        if password:
            values.append(password)
    return values
