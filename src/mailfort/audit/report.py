"""Render the report dict: a terminal table and a self-contained HTML page.

Both read only the dict that ``--json`` prints, so the three outputs never disagree.
"""

from __future__ import annotations

import html
from typing import Any

from mailfort import weaknesses
from mailfort.audit import catalogue
from mailfort.audit.registry import STATUSES
from mailfort.report import page
from mailfort.report.text import pad

COLOURS = {"PASS": "32", "FAIL": "31;1", "WARN": "33", "SKIP": "2", "INCONCLUSIVE": "35"}


def ordered(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failures first, then warnings, inconclusive, passes and skips (stable within)."""
    return sorted(checks, key=lambda r: STATUSES.index(r["status"]))


def terminal(report: dict[str, Any], *, colour: bool = False, verbose: bool = False) -> str:
    ui = catalogue.load(report["lang"]).UI
    t = report["target"]

    def paint(status: str) -> str:
        label = pad(status, 12)
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
        lines.append(f"{paint(r['status'])} {pad(r['id'], width)} {r['result']}")
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


CSS = """\
table { width: 100%; }
th, td { padding: .35rem .6rem; vertical-align: top; }
.counts { display: flex; gap: .6rem; flex-wrap: wrap; margin: 1rem 0; }
.count { padding: .5rem .9rem; border-radius: .4rem; font-weight: 600; color: #fff; }
.badge { min-width: 6.5rem; }
.PASS { background: #2e7d32; } .FAIL { background: #c62828; } .WARN { background: #b26a00; }
.SKIP { background: #78838c; } .INCONCLUSIVE { background: #6a1b9a; }
section { border-left-width: .4rem; margin: 1rem 0; }
section.FAIL { border-left-color: #c62828; background: #fff; }
section.WARN { border-left-color: #b26a00; background: #fff; }
section.PASS, section.SKIP, section.INCONCLUSIVE { border-left-color: #9aa5ad;
          background: #fff; }
section h2 { font-size: 1.1rem; }
pre { font-size: .8rem; }
dt { font-weight: 600; margin-top: .4rem; } dd { margin-left: 1rem; }
"""


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
        badge = page.badge(r["status"], r["status"])
        weakness = weaknesses.by_number(r["row"]).name(report["lang"])
        rows.append(f"<tr><td>{badge}</td>"
                    f'<td class="id"><a href="#{anchor}">{e(r["id"])}</a></td>'
                    f'<td>{e(r["title"])}: {e(r["result"])}</td></tr>')
        parts = [f'<section id="{anchor}" class="{r["status"]}">',
                 f"<h2>{badge} {e(r['title'])} <small>({e(r['id'])}, "
                 f"{ui['row']} {e(r['row'])}: {e(weakness)})</small></h2>",
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
    body = "\n".join([
        f'<p class="meta">{e(meta)}</p>', f'<p class="meta">{e(ui["no_foreign"])}</p>',
        f'<div class="counts">{counts}</div>',
        page.table([ui["status"], ui["check"], ui["result"]], rows), *sections])
    return page.document(lang=report["lang"], title=f"{ui['report']}: {t['host']}",
                         body=body, css=CSS, data_id="report", data=report)
