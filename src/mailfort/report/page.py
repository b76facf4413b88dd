"""One self-contained HTML page: the frame, the common style and the report's own data.

A report page is handed out as a single file and opened anywhere, so it loads nothing
(no external URL, font or script) and carries the JSON it was built from in a
``<script type="application/json">`` element that never runs: the page and the JSON
cannot disagree, and a reader's tool can take the data back out.
"""

from __future__ import annotations

import html
import json
from string import Template
from typing import Any

BASE_CSS = """\
body { font: 15px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: $max_width;
       padding: 1.5rem; color: #1d232a; background: #fafafa; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; }
.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; background: #fff; }
th, td { text-align: left; border-bottom: 1px solid #e3e3e3; }
td.id { font-family: ui-monospace, monospace; white-space: nowrap; }
.badge { display: inline-block; text-align: center; border-radius: .3rem; color: #fff;
         font-weight: 600; font-size: .85rem; padding: .05rem .4rem; }
section { background: #fff; border: 1px solid #e3e3e3; border-radius: .3rem;
          padding: .4rem 1rem .8rem; }
section h2 { margin: .5rem 0 .2rem; }
pre { background: #f3f4f6; padding: .5rem; overflow-x: auto; white-space: pre-wrap;
      word-break: break-all; }
"""

_FRAME = Template("""<!DOCTYPE html>
<html lang="$lang">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
$css</style>
</head>
<body>
<h1>$title</h1>
$body
<script type="application/json" id="$data_id">$data</script>
</body>
</html>
""")


def embed_json(data: Any) -> str:
    """``data`` as JSON that cannot end the ``<script>`` element it stands in."""
    return json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")


def badge(css_class: str, text: str) -> str:
    return f'<span class="badge {css_class}">{html.escape(text)}</span>'


def table(headings: list[str], rows: list[str]) -> str:
    """A table of ``rows`` (each a ready ``<tr>``) under ``headings`` (plain text)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headings)
    return "\n".join(["<table>", f"<thead><tr>{head}</tr></thead>", "<tbody>", *rows,
                      "</tbody>", "</table>"])


def document(*, lang: str, title: str, body: str, css: str, data_id: str, data: Any,
             max_width: str = "62rem") -> str:
    """The whole page: ``title`` (plain text, escaped here) as <title> and <h1>, ``body``
    (markup, already escaped by the report), the common style then ``css``, and ``data``
    embedded under ``data_id``."""
    return _FRAME.substitute(
        lang=html.escape(lang), title=html.escape(title), body=body,
        css=Template(BASE_CSS).substitute(max_width=max_width) + css,
        data_id=html.escape(data_id), data=embed_json(data))
