"""Write the bundled sample set into `ragstream/samples/docs/` (run once; outputs are committed).

    python -m ragstream.samples.generate [--out DIR]

Renders each document of `_content.py` to its format (PDF with fpdf2, Markdown, HTML, plain
text), adds the exact duplicates, and writes `manifest.json`: per file its content type,
SHA-256, page count, title and headings as the generator made them, which tests hold the
parser to. Output is byte-for-byte reproducible with the same fpdf2 version.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import html
import json
import re
from collections.abc import Iterator
from pathlib import Path

from fpdf import FPDF

from ragstream.samples._content import DOCS, DUPLICATES, SampleDoc

CONTENT_TYPES = {
    "pdf": "application/pdf",
    "md": "text/markdown",
    "html": "text/html",
    "txt": "text/plain",
}
_FIXED_DATE = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
_HEADING = re.compile(r"(#{1,6}) (.+)")
_LIST = re.compile(r"(- |\d+\. )(.+)")


def _blocks(body: str) -> Iterator[tuple[str, list[str]]]:
    """(kind, lines) for kinds heading, para, ul, ol, table, code."""
    lines = body.strip("\n").split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("```"):
            j = lines.index("```", i + 1)
            yield "code", lines[i + 1 : j]
            i = j + 1
        elif _HEADING.fullmatch(line):
            yield "heading", [line]
            i += 1
        else:
            j = i
            while j < len(lines) and lines[j].strip() and not lines[j].startswith(("#", "```")):
                j += 1
            group = lines[i:j]
            if group[0].startswith("|"):
                yield "table", group
            elif group[0].startswith("- "):
                yield "ul", group
            elif _LIST.fullmatch(group[0]):
                yield "ol", group
            else:
                yield "para", [" ".join(group)]
            i = j


def headings(doc: SampleDoc) -> list[str]:
    return [m.group(2) for line in doc.body.split("\n") if (m := _HEADING.fullmatch(line))]


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


# -- HTML --------------------------------------------------------------------------------------


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def render_html(doc: SampleDoc) -> bytes:
    out: list[str] = []
    for kind, lines in _blocks(doc.body):
        if kind == "heading":
            m = _HEADING.fullmatch(lines[0])
            assert m is not None
            level = len(m.group(1))
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif kind == "para":
            out.append(f"<p>{_inline(lines[0])}</p>")
        elif kind in ("ul", "ol"):
            items = "".join(f"<li>{_inline(_LIST.fullmatch(x).group(2))}</li>" for x in lines)  # type: ignore[union-attr]
            out.append(f"<{kind}>{items}</{kind}>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(c)}</th>" for c in _cells(lines[0]))
            rows = "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(r)) + "</tr>"
                for r in lines[2:]
            )
            out.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{rows}</tbody>\n</table>")
        else:
            out.append("<pre><code>" + html.escape("\n".join(lines)) + "</code></pre>")
    body = "\n".join(out)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(doc.html_title or doc.title)}</title>
<style>body {{ font-family: sans-serif; max-width: 46rem; margin: auto; }}</style>
<script>window.analytics = {{ track: function () {{ return "tracking code, not content"; }} }};</script>
</head>
<body>
<nav><a href="/">Home</a> | <a href="/guides">Guides</a> | <a href="/subscribe">Subscribe</a></nav>
<main>
<article>
{body}
</article>
</main>
</body>
</html>
"""
    return page.encode(doc.encoding)


# -- PDF ---------------------------------------------------------------------------------------


def render_pdf(doc: SampleDoc) -> tuple[bytes, int]:
    pdf = FPDF(format="A4")
    pdf.set_creation_date(_FIXED_DATE)
    pdf.set_title(doc.title)
    pdf.set_author("ragstream samples")
    pdf.set_auto_page_break(auto=True, margin=18)
    pdf.add_page()
    sections = 0

    def write(text: str, size: float, style: str = "", family: str = "Helvetica") -> None:
        pdf.set_font(family, style, size)
        pdf.multi_cell(0, size * 0.5, text, new_x="LMARGIN", new_y="NEXT")

    for kind, lines in _blocks(doc.body):
        if kind == "heading":
            m = _HEADING.fullmatch(lines[0])
            assert m is not None
            level, text = len(m.group(1)), m.group(2)
            if level == 2:
                sections += 1
                if sections > 1:
                    pdf.add_page()
            pdf.ln(2)
            write(text, {1: 20.0, 2: 15.0}.get(level, 13.0), "B")
            pdf.ln(2)
        elif kind == "para":
            write(lines[0].replace("`", ""), 11)
            pdf.ln(3)
        elif kind in ("ul", "ol"):
            for line in lines:
                write(line.replace("`", ""), 11)
                pdf.ln(1)
            pdf.ln(2)
        elif kind == "table":
            pdf.set_font("Helvetica", "", 10)
            with pdf.table(line_height=6) as table:
                for row in [lines[0], *lines[2:]]:
                    cells = table.row()
                    for cell in _cells(row):
                        cells.cell(cell)
            pdf.ln(3)
        else:
            write("\n".join(lines), 9.5, family="Courier")
            pdf.ln(3)
    return bytes(pdf.output()), pdf.pages_count


# -- the set -----------------------------------------------------------------------------------


def render(doc: SampleDoc) -> tuple[bytes, int]:
    if doc.format == "pdf":
        return render_pdf(doc)
    if doc.format == "html":
        return render_html(doc), 1
    return (doc.body.lstrip("\n").encode(doc.encoding)), 1


def generate(out: Path) -> list[dict[str, object]]:
    out.mkdir(parents=True, exist_ok=True)
    manifest: list[dict[str, object]] = []
    written: dict[str, bytes] = {}
    for doc in DOCS:
        data, pages = render(doc)
        written[doc.filename] = data
        (out / doc.filename).write_bytes(data)
        manifest.append(
            {
                "filename": doc.filename,
                "content_type": CONTENT_TYPES[doc.format],
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "pages": pages,
                "title": None if doc.format == "txt" else (doc.html_title or doc.title),
                "headings": [] if doc.format == "txt" else headings(doc),
                "duplicate_of": None,
            }
        )
    for copy, original in DUPLICATES:
        (out / copy).write_bytes(written[original])
        entry = dict(next(e for e in manifest if e["filename"] == original))
        entry.update(filename=copy, duplicate_of=original)
        manifest.append(entry)
    # Beside the documents, not among them: uploading the directory uploads documents only.
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    (out.parent / "manifest.json").write_text(text)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "docs")
    args = parser.parse_args()
    manifest = generate(args.out)
    total = sum(int(str(e["bytes"])) for e in manifest)
    for e in manifest:
        print(f"{e['filename']:40} {e['content_type']:16} {e['pages']:>2} p {e['bytes']:>7} B")
    print(f"{len(manifest)} files, {total} bytes -> {args.out}")


if __name__ == "__main__":
    main()
