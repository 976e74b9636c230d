"""Where the bundled `schemas/` and `config/` directories are.

In a wheel they ship inside the package (`ragstream/_bundled/`); in a source checkout they are
the top-level directories beside the package.
"""

from __future__ import annotations

from pathlib import Path

from ragstream.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent


def bundled_dir(name: str) -> Path:
    """Return the directory `schemas` or `config`, installed or from the checkout."""
    for candidate in (_PACKAGE / "_bundled" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"bundled directory {name!r} not found beside the ragstream package")


def schemas_dir() -> Path:
    return bundled_dir("schemas")


def config_dir() -> Path:
    return bundled_dir("config")
