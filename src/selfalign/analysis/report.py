"""One self-contained HTML report that many analysis commands add sections to.

Each section lives between ``<!-- section:ID -->`` and ``<!-- /section:ID -->`` markers, so a command re-run
replaces its own section in place and leaves the others alone. The read-modify-write runs under a lock file and
the new report replaces the old one atomically. Figures are linked by a path relative to the report, or embedded
as base64 (``embed=True``) so the file can be mailed alone. Every section records the command that made it.
"""

from __future__ import annotations

import base64
import contextlib
import html
import os
import re
import time
from pathlib import Path
from typing import Iterator

from selfalign import atomic
from selfalign.errors import InputError

_SECTION = re.compile(r"<!-- section:(?P<id>[^ ]+) -->\n(?P<body>.*?)<!-- /section:(?P=id) -->\n", re.S)
_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
section{border-top:1px solid #ccc;margin-top:2em}img{max-width:100%;border:1px solid #eee}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}pre{background:#f4f4f4;padding:.5em;white-space:pre-wrap}
.meta{color:#666;font-size:90%}"""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``path`` (best effort where ``fcntl`` is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: no concurrent writers expected
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_sections(report: str | Path) -> dict[str, str]:
    """The sections of an existing report, ``{id: html}`` in document order (empty when there is none)."""
    report = Path(report)
    if not report.is_file():
        return {}
    try:
        text = report.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{report}: not a UTF-8 report ({exc})") from None
    return {m.group("id"): m.group("body") for m in _SECTION.finditer(text)}


def figure_html(figure: Path, report: Path, embed: bool, caption: str = "") -> str:
    if embed:
        data = base64.b64encode(Path(figure).read_bytes()).decode("ascii")
        src = f"data:image/png;base64,{data}"
    else:
        src = Path(os.path.relpath(Path(figure).resolve(), report.resolve().parent)).as_posix()
    alt = html.escape(caption or Path(figure).name)
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{html.escape(src)}" alt="{alt}">{cap}</figure>'


def table_html(header: list[str], rows: list[list]) -> str:
    """A plain HTML table; floats are shown with 3 decimals."""
    def cell(v) -> str:
        return html.escape(f"{v:.3f}" if isinstance(v, float) else str(v))

    head = "".join(f"<th>{cell(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def update_section(report: str | Path, section_id: str, title: str, command: str, body_html: str = "",
                   figures: list[Path] | tuple = (), embed: bool = False, cwd: str | None = None) -> Path:
    """Add or replace section ``section_id`` of ``report`` (created when missing); returns the report path.

    ``body_html`` is trusted HTML made by this package; ``title`` and ``command`` are escaped.
    """
    report = Path(report)
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", section_id):
        raise InputError(f"report section id {section_id!r}: use letters, digits and - _ . : only")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    where = html.escape(cwd or os.getcwd())
    parts = [f'<section id="{section_id}">', f"<h2>{html.escape(title)}</h2>",
             f'<p class="meta">made {stamp} in <code>{where}</code> by:</p>', f"<pre>{html.escape(command)}</pre>",
             body_html]
    parts += [figure_html(Path(f), report, embed) for f in figures]
    parts.append("</section>")
    section = "\n".join(p for p in parts if p) + "\n"
    with _locked(report):
        sections = read_sections(report)
        sections[section_id] = section
        atomic.write_text(report, render(sections))
    return report


def render(sections: dict[str, str]) -> str:
    toc = "".join(f'<li><a href="#{sid}">{html.escape(sid)}</a></li>' for sid in sections)
    body = "".join(f"<!-- section:{sid} -->\n{text}<!-- /section:{sid} -->\n" for sid, text in sections.items())
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>SelfAlign analysis</title>"
            f"<style>{_STYLE}</style></head>\n<body>\n<h1>SelfAlign analysis</h1>\n<ul>{toc}</ul>\n{body}"
            "</body></html>\n")
