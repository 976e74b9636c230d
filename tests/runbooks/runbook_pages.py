"""The runbooks in docs/runbooks/ as data: their headings (with GitHub's anchors), their `sh`
blocks' commands, and the placeholders docs/runbooks/README.md documents.

A command is one line of an `sh` block; a line that is only a comment is not one. It is
expected to exit 0, unless its comment says `# exits N ...`. Placeholders are written
`<name>`, lower case."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "docs" / "runbooks"
# In the order the runbook test runs them: start-up brings the stack up, and the backup page
# restores last.
PAGES = (
    "startup.md",
    "troubleshooting.md",
    "cost-limit.md",
    "incident.md",
    "rollback.md",
    "backup-restore.md",
)

PLACEHOLDER = re.compile(r"<([a-z][a-z0-9-]*)>")
EXITS = re.compile(r"#.*?\bexits (\d+)\b")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w-]*)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")


@dataclass(frozen=True)
class Command:
    page: str
    section: str  # the anchor of the nearest heading above it
    line: str
    exit_code: int

    @property
    def placeholders(self) -> set[str]:
        return set(PLACEHOLDER.findall(self.line))


def slug(title: str) -> str:
    """GitHub's anchor for a heading: the text as rendered (links and code marks dropped), lower
    case, punctuation removed, spaces as hyphens."""
    text = LINK.sub(r"\1", title).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _lines_outside_fences(text: str) -> list[tuple[str, str | None]]:
    """Each line with the info string of the fenced block it is in (None outside one; fence
    lines themselves are left out)."""
    out: list[tuple[str, str | None]] = []
    fence: str | None = None
    info = ""
    for line in text.splitlines():
        match = FENCE.match(line)
        if match and fence is None:
            fence, info = match[1], match[2]
        elif match and match[1].startswith(fence or "\0") and not match[2]:
            fence = None
        else:
            out.append((line, None if fence is None else info))
    return out


def anchors(text: str) -> list[str]:
    """The anchors of a page's headings, in order, repeated ones numbered as GitHub does."""
    seen: dict[str, int] = {}
    out = []
    for line, info in _lines_outside_fences(text):
        match = HEADING.match(line) if info is None else None
        if match is None:
            continue
        base = slug(match[2])
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.append(base if count == 0 else f"{base}-{count}")
    return out


def commands(page: str) -> list[Command]:
    """The commands of a page's `sh` blocks, in order."""
    out = []
    section = ""
    names = iter(anchors(page_text(page)))
    for line, info in _lines_outside_fences(page_text(page)):
        if info is None:
            if HEADING.match(line):
                section = next(names)
            continue
        stripped = line.strip()
        if info != "sh" or not stripped or stripped.startswith("#"):
            continue
        exits = EXITS.search(stripped)
        out.append(Command(page, section, stripped, int(exits[1]) if exits else 0))
    return out


def prose_commands(page: str) -> list[str]:
    """The `ragstream ...` commands quoted inline in a page's prose (outside code blocks)."""
    text = "\n".join(line for line, info in _lines_outside_fences(page_text(page)) if info is None)
    spans = INLINE_CODE.findall(re.sub(r"\s*\n\s*", " ", text))
    return [span for span in spans if span.startswith("ragstream ")]


def page_text(page: str) -> str:
    return (RUNBOOKS / page).read_text()


def documented_placeholders() -> set[str]:
    """The placeholders in the first column of docs/runbooks/README.md's table."""
    return set(re.findall(r"^\| `<([a-z][a-z0-9-]*)>` \|", page_text("README.md"), re.M))
