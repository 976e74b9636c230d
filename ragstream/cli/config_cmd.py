"""`ragstream config show`: the effective settings, secrets redacted."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import typer

from ragstream.cli.common import console, settings_or_exit
from ragstream.settings import redacted

app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    """A TOML key: bare when it can be, else a quoted string."""
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _to_toml(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Valid TOML (what `tomllib` reads back); an unset value is a comment line."""
    lines: list[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if prefix and scalars:
        lines.append(f"[{prefix}]")
    for key, value in scalars.items():
        if value is None:
            lines.append(f"# {_key(key)} = (unset)")
        else:
            lines.append(f"{_key(key)} = {json.dumps(value)}")
    if scalars:
        lines.append("")
    for key, value in tables.items():
        lines += _to_toml(value, f"{prefix}.{_key(key)}" if prefix else _key(key))
    return lines


@app.command("show")
def show(
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of TOML.")] = False,
) -> None:
    """Print the effective configuration (defaults, file, environment), secrets as ***."""
    data = redacted(settings_or_exit())
    if as_json:
        console.print_json(json.dumps(data))
    else:
        console.print("\n".join(_to_toml(data)), highlight=False, markup=False, soft_wrap=True)
