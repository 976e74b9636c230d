"""The scrubber: configured secrets in every form, and credential shapes nobody configured."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from pydantic import SecretStr

from ragstream.scrub import MASK, Scrubber, secret_values
from ragstream.settings import load_settings

CONFIGURED = "plain7Q2xZ9w4Lq1mPv8"


@pytest.mark.parametrize(
    "form",
    [CONFIGURED, quote(CONFIGURED + "/+", safe=""), repr(CONFIGURED + "'")[1:-1]],
)
def test_a_configured_secret_is_masked_in_every_form(form: str) -> None:
    scrub = Scrubber([CONFIGURED, CONFIGURED + "/+", CONFIGURED + "'"])
    assert form not in scrub(f"upstream said: {form}!")


@pytest.mark.parametrize(
    ("text", "leak"),
    [
        ("Authorization: Bearer abc.def-ghi_jkl", "abc.def-ghi_jkl"),
        ("auth: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("could not reach postgresql://rag:hunter2@db:5432/x", "hunter2"),
        ("Incorrect API key provided: sk-proj-AbCdEf0123456789xyz", "sk-proj-AbCdEf0123456789xyz"),
        ("llama cloud key llx-AbCdEf0123456789xyz refused", "llx-AbCdEf0123456789xyz"),
        ("aws AKIAIOSFODNN7EXAMPLE denied", "AKIAIOSFODNN7EXAMPLE"),
        ('{"api_key": "q9w8e7r6t5"}', "q9w8e7r6t5"),
        ("GET /v1?api-key=q9w8e7r6t5&x=1", "q9w8e7r6t5"),
        ("password=correct-horse", "correct-horse"),
    ],
)
def test_credential_shapes_are_masked_without_configuration(text: str, leak: str) -> None:
    out = Scrubber()(text)
    assert leak not in out and MASK in out, out


def test_ordinary_text_is_left_alone() -> None:
    text = "parse: PermanentError: corrupt PDF: startxref not found (token budget 300k)"
    assert Scrubber()(text) == text


def test_header_bytes_are_scrubbed_and_undecodable_bytes_kept() -> None:
    scrub = Scrubber([CONFIGURED])
    assert scrub.bytes(f"echo {CONFIGURED}".encode()) == b"echo ***"
    assert scrub.bytes(b"\xff\xfe") == b"\xff\xfe"


def test_the_settings_secrets_are_collected() -> None:
    settings = load_settings(
        services={"openai": {"api_key": SecretStr(CONFIGURED)}},
        postgres={"url": "postgresql://rag:s3cr3t-pw@127.0.0.1:5433/rag"},
    )
    values = secret_values(settings)
    assert CONFIGURED in values and "s3cr3t-pw" in values
    assert CONFIGURED not in Scrubber.from_settings(settings)(f"x {CONFIGURED} y")
