"""The runbooks hold together without a stack: every alert links a runbook section that exists
(and the README's alert table links the same one), every placeholder is documented, every
page is run by tests/runbooks/test_runbooks.py, and every `ragstream` command they show, in
an `sh` block or in the prose, names a command and options the CLI has."""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest
import typer.main
import yaml

from ragstream.cli import app
from tests.runbooks.runbook_pages import (
    PAGES,
    PLACEHOLDER,
    ROOT,
    RUNBOOKS,
    anchors,
    commands,
    documented_placeholders,
    page_text,
    prose_commands,
)

ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
# Besides ragstream itself, what an operator's shell has anywhere.
SHELL_TOOLS = {"ragstream", "curl", "tail"}


def _alert_links() -> dict[str, set[str]]:
    """Each alert's runbook_url (an alert may have several rules: one per stage)."""
    links: dict[str, set[str]] = {}
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            url = rule.get("annotations", {}).get("runbook_url", "")
            links.setdefault(rule["alert"], set()).add(url)
    return links


def test_every_alert_links_an_existing_runbook_heading() -> None:
    links = _alert_links()
    assert len(links) >= 14, links
    for alert, urls in links.items():
        assert len(urls) == 1, (alert, urls)
        (url,) = urls
        path, _, anchor = url.partition("#")
        assert path.startswith("docs/runbooks/") and anchor, (alert, url)
        page = ROOT / path
        assert page.is_file(), (alert, url)
        assert anchor in anchors(page.read_text()), (alert, url, anchors(page.read_text()))


def test_the_readme_alert_table_links_what_the_rules_link() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Alerts and what to do", 1)[1].split("\n## ", 1)[0]
    links = _alert_links()
    seen = set()
    for row in table.splitlines():
        names = re.findall(r"`(Ragstream\w+)`", row.split("|")[1] if row.startswith("|") else "")
        for name in names:
            assert f"]({next(iter(links[name]))})" in row, (name, row)
            seen.add(name)
    assert seen == set(links), set(links) - seen
    assert "docs/runbooks/README.md" in readme


def test_every_page_is_run_and_every_placeholder_documented() -> None:
    on_disk = {p.name for p in RUNBOOKS.glob("*.md")} - {"README.md"}
    assert on_disk == set(PAGES)
    documented = documented_placeholders()
    assert {"tenant", "document-id", "stage", "backup-dir"} <= documented
    used: set[str] = set()
    for page in PAGES:
        for name in PLACEHOLDER.findall(page_text(page)):
            assert name in documented, (page, name)
            used.add(name)
        assert commands(page), f"{page} has no sh block"
    assert used == documented, documented - used


def _options(command: Any) -> set[str]:
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}


def _resolve(argv: list[str]) -> None:
    """Fails unless `argv` (after `ragstream`) names a command of the CLI and only options it
    has. (Typer ships its own click: groups are told by their `commands`.)"""
    command: Any = typer.main.get_command(app)
    for word in argv:
        if hasattr(command, "commands") and not word.startswith("-"):
            command = command.commands.get(word)
            assert command is not None, f"no command {word!r} in {argv}"
        elif word.startswith("-") and word != "-":
            assert word.split("=", 1)[0] in _options(command), f"no option {word} in {argv}"


@pytest.mark.parametrize("page", PAGES)
def test_every_command_shown_exists(page: str) -> None:
    for command in commands(page):
        argv = shlex.split(command.line, comments=True)
        assert argv[0] in SHELL_TOOLS, command
        assert "\\" not in command.line, f"one command a line: {command}"
        if argv[0] == "ragstream":
            _resolve(argv[1:])
    for text in prose_commands(page):
        _resolve(shlex.split(text)[1:])
