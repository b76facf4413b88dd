"""Render the report dict: a terminal table and a self-contained HTML page.

Both read only the dict that ``--json`` prints, so the three outputs never disagree.
"""

from __future__ import annotations

import html
import json
import unicodedata
from string import Template
from typing import Any

from mailfort.audit import catalogue
from mailfort.audit.registry import STATUSES

COLOURS = {"PASS": "32", "FAIL": "31;1", "WARN": "33", "SKIP": "2", "INCONCLUSIVE": "35"}


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _width(text))


def ordered(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failures first, then warnings, inconclusive, passes and skips (stable within)."""
    return sorted(checks, key=lambda r: STATUSES.index(r["status"]))


def terminal(report: dict[str, Any], *, colour: bool = False, verbose: bool = False) -> str:
    ui = catalogue.load(report["lang"]).UI
    t = report["target"]

    def paint(status: str) -> str:
        label = _pad(status, 12)
        return f"\x1b[{COLOURS[status]}m{label}\x1b[0m" if colour else label

    s = report["summary"]
    lines = [
        f"{ui['report']}: {t['host']}  "
        + " ".join(f"{k} {v}" for k, v in t["open_ports"].items()),
        f"{ui['summary']}: " + ", ".join(f"{s[k]} {k}" for k in STATUSES)
        + f"  ({report['duration_s']:.1f} s)",
        ui["no_foreign"],
        "",
    ]
    width = max((len(r["id"]) for r in report["checks"]), default=10) + 2
    for r in ordered(report["checks"]):
        lines.append(f"{paint(r['status'])} {_pad(r['id'], width)} {r['result']}")
        if verbose or r["status"] in ("FAIL", "WARN"):
            if r["status"] in ("FAIL", "WARN"):
                lines.append(f"{'':13}{ui['why']}: {r['why']}")
                lines.append(f"{'':13}{ui['fix']}: {r['fix']}")
                if r["fix_postfix"]:
                    lines.append(f"{'':13}{ui['postfix']}: {r['fix_postfix']}")
            notes = [] if verbose else [ev for ev in r["evidence"] if ev.startswith("  [")][:5]
            for ev in notes + r["evidence"][: (40 if verbose else 8)]:
                lines.append(f"{'':15}{ev}")
    return "\n".join(lines) + "\n"


PAGE = Template("""<!DOCTYPE html>
<html lang="$lang">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
body { font: 15px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: 62rem;
       padding: 1.5rem; color: #1d232a; background: #fafafa; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; }
.meta { color: #555; margin-top: 0; }
.counts { display: flex; gap: .6rem; flex-wrap: wrap; margin: 1rem 0; }
.count { padding: .5rem .9rem; border-radius: .4rem; font-weight: 600; color: #fff; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #e3e3e3;
         vertical-align: top; }
td.id { font-family: ui-monospace, monospace; white-space: nowrap; }
.badge { display: inline-block; min-width: 6.5rem; text-align: center; border-radius: .3rem;
         color: #fff; font-weight: 600; font-size: .85rem; padding: .05rem .4rem; }
.PASS { background: #2e7d32; } .FAIL { background: #c62828; } .WARN { background: #b26a00; }
.SKIP { background: #78838c; } .INCONCLUSIVE { background: #6a1b9a; }
section { background: #fff; border: 1px solid #e3e3e3; border-left-width: .4rem;
          border-radius: .3rem; margin: 1rem 0; padding: .4rem 1rem .8rem; }
section.FAIL { border-left-color: #c62828; background: #fff; }
section.WARN { border-left-color: #b26a00; background: #fff; }
section.PASS, section.SKIP, section.INCONCLUSIVE { border-left-color: #9aa5ad;
          background: #fff; }
section h2 { font-size: 1.1rem; margin: .5rem 0 .2rem; }
pre { background: #f3f4f6; padding: .5rem; overflow-x: auto; font-size: .8rem;
      white-space: pre-wrap; word-break: break-all; }
dt { font-weight: 600; margin-top: .4rem; } dd { margin-left: 1rem; }
</style>
</head>
<body>
<h1>$title</h1>
<p class="meta">$meta</p>
<p class="meta">$no_foreign</p>
<div class="counts">$counts</div>
<table>
<thead><tr><th>$h_status</th><th>$h_check</th><th>$h_result</th></tr></thead>
<tbody>
$rows
</tbody>
</table>
$sections
<script type="application/json" id="report">$json</script>
</body>
</html>
""")


def html_page(report: dict[str, Any]) -> str:
    """One self-contained page: summary, table, one section per check; no external URL."""
    ui = catalogue.load(report["lang"]).UI
    e = html.escape
    t = report["target"]
    counts = "".join(f'<span class="count {s}">{report["summary"][s]} {s}</span>'
                     for s in STATUSES)
    rows, sections = [], []
    for r in ordered(report["checks"]):
        anchor = "c-" + r["id"].replace(".", "-")
        rows.append(f'<tr><td><span class="badge {r["status"]}">{r["status"]}</span></td>'
                    f'<td class="id"><a href="#{anchor}">{e(r["id"])}</a></td>'
                    f'<td>{e(r["title"])}: {e(r["result"])}</td></tr>')
        parts = [f'<section id="{anchor}" class="{r["status"]}">',
                 f'<h2><span class="badge {r["status"]}">{r["status"]}</span> '
                 f'{e(r["title"])} <small>({e(r["id"])}, {ui["row"]} {e(r["row"])})</small>'
                 "</h2>",
                 f"<p>{e(r['result'])}</p><dl>",
                 f"<dt>{ui['why']}</dt><dd>{e(r['why'])}</dd>",
                 f"<dt>{ui['fix']}</dt><dd>{e(r['fix'])}</dd>"]
        if r["fix_postfix"]:
            parts.append(f"<dt>{ui['postfix']}</dt><dd>{e(r['fix_postfix'])}</dd>")
        parts.append("</dl>")
        if r["evidence"]:
            parts.append(f"<details{' open' if r['status'] == 'FAIL' else ''}>"
                         f"<summary>{ui['evidence']}</summary>"
                         f"<pre>{e(chr(10).join(r['evidence']))}</pre></details>")
        parts.append("</section>")
        sections.append("\n".join(parts))
    meta = (f"{ui['target']}: {t['host']} ("
            + ", ".join(f"{k} {v}" for k, v in t["open_ports"].items())
            + f") · {report['started']} · {report['duration_s']:.1f} s")
    # JSON inside <script> must not close the element: escape '<'.
    embedded = json.dumps(report, ensure_ascii=False).replace("<", "\\u003c")
    return PAGE.substitute(
        lang=report["lang"], title=e(f"{ui['report']}: {t['host']}"), meta=e(meta),
        no_foreign=e(ui["no_foreign"]), counts=counts, h_status=ui["status"],
        h_check=ui["check"], h_result=ui["result"], rows="\n".join(rows),
        sections="\n".join(sections), json=embedded,
    )
