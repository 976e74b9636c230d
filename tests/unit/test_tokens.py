"""Token counts are exact for cl100k_base (text-embedding-3-small) and need no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ragstream.errors import ConfigError
from ragstream.tokens import CL100K_BASE, get_tokenizer


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("hello world", [15339, 1917]),
        ("tiktoken is great!", [83, 1609, 5963, 374, 2294, 0]),
        ("", []),
    ],
)
def test_known_cl100k_ids(text: str, ids: list[int]) -> None:
    tokenizer = get_tokenizer()
    assert tokenizer.encode(text) == ids
    assert tokenizer.count(text) == len(ids)
    assert tokenizer.decode(ids) == text


def test_counts_match_reference_values() -> None:
    tokenizer = get_tokenizer(CL100K_BASE)
    assert tokenizer.name == "cl100k_base"
    assert tokenizer.count("The quick brown fox jumps over the lazy dog.") == 10
    assert tokenizer.count("hello world" * 100) > 100  # merges across repeats are real BPE


def test_round_trip_unicode_and_whitespace() -> None:
    tokenizer = get_tokenizer()
    text = "Ünïcödé 日本語 🚀\n\n\ttabs and  spaces\r\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_token_text_is_counted_as_ordinary_text() -> None:
    tokenizer = get_tokenizer()
    ids = tokenizer.encode("<|endoftext|>")
    assert 100257 not in ids
    assert len(ids) > 1


def test_tokenizer_is_loaded_once() -> None:
    assert get_tokenizer() is get_tokenizer("cl100k_base")


def test_unknown_tokenizer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown tokenizer 'p50k_base'"):
        get_tokenizer("p50k_base")


def test_loads_with_no_network_and_an_empty_cache(tmp_path: Path) -> None:
    """A fresh process whose sockets all fail and whose tiktoken cache is empty still counts."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    script = textwrap.dedent(
        """
        import json, socket

        def refuse(*args, **kwargs):
            raise OSError("network disabled by the test")

        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse

        from ragstream.tokens import get_tokenizer

        tokenizer = get_tokenizer()
        print(json.dumps([tokenizer.count("hello world"), tokenizer.count("tiktoken is great!")]))
        """
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)}
    env.pop("DATA_GYM_CACHE_DIR", None)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [2, 6]
    assert list(cache.iterdir()) == []  # nothing fetched, nothing cached
