"""Hostile documents (small files that cost a lot to parse) and a look at the processes they
hit, read from /proc."""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path


def cpu_bomb_pdf(pages: int = 1999, operators: int = 20_000, tag: str = "") -> bytes:
    """A PDF of some 300 KB whose `pages` pages all draw one shared content stream of
    `operators` text-showing operators (about 14 bytes each, deflated to almost nothing).

    pypdf parses the stream again for every page: with 20,000 operators a page takes about a
    second, so the whole file takes over half an hour. `tag` makes the bytes (and so the
    sha256) differ between otherwise equal bombs."""
    content = b"BT /F1 9 Tf 10 10 Td " + b"(x) Tj 0 1 Td " * operators + b"ET"
    stream = zlib.compress(content, 9)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids ["
        + b" ".join(b"%d 0 R" % (5 + n) for n in range(pages))
        + b"] /Count %d >>" % pages,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    page = (
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792]"
        b" /Resources << /Font << /F1 3 0 R >> >> /Contents 4 0 R >>"
    )
    objects += [page] * pages
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n%" + tag.encode() + b"\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.writelines(b"%010d 00000 n \n" % offset for offset in offsets)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\n" % (len(objects) + 1))
    out.write(b"startxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def memory_bomb_text(megabytes: int = 12) -> bytes:
    """Plain text of short lines: every line becomes a string object of its own while the
    text is cleaned, some 20 times the size of the file."""
    return b"ab\n" * (megabytes * 1024 * 1024 // 3)


# -- processes -----------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state is [0], ppid [1])."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int, *, below: int = 1) -> list[int]:
    """Every living process below `pid` (children, their children, ...), zombies left out;
    `below=3` leaves out the children and grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [(pid, 0)]
    while todo:
        parent, depth = todo.pop()
        for child in children.get(parent, []):
            if depth + 1 >= below:
                found.append(child)
            todo.append((child, depth + 1))
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time the process has used so far, user and system (0 for one that is gone)."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def burning(pids: Iterable[int], since: Mapping[int, float], seconds: float = 0.1) -> list[int]:
    """The processes that have used `seconds` of CPU more than `since` says they had (a process
    not in `since` counts from nothing): those busy with a task."""
    return [pid for pid in pids if cpu_seconds(pid) - since.get(pid, 0.0) >= seconds]


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def rss_bytes(*pids: int) -> int:
    """Resident memory of these processes, added up (those that are gone count nothing)."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total
