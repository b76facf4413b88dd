"""Tell a lab session: in the terminal (two columns) and as one self-contained HTML page.

Both read the same dict (``session``), built from the attack runs and a catalogue, so the
page a teacher hands out says exactly what the terminal said.
"""

from __future__ import annotations

import html
from typing import Any

from mailfort import weaknesses
from mailfort.lab import catalogue
from mailfort.lab.attacks import AttackRun
from mailfort.lab.harness import SIDES
from mailfort.report import page
from mailfort.report.text import cut as _cut
from mailfort.report.text import width as _width
from mailfort.report.text import wrap as _wrap

# The mark of each weakness number of the one table (mailfort.weaknesses): ① for 1, ...
ROW_MARKS = {w.number: w.mark for w in weaknesses.TABLE}


def session(runs: list[AttackRun], lang: str) -> dict[str, Any]:
    cat = catalogue.load(lang)
    attacks = []
    for run in runs:
        text = cat.ATTACKS[run.name]
        sides = {}
        for name, side in run.sides.items():
            sides[name] = {
                "succeeded": side.succeeded,
                "transcript": side.transcript,
                "consequences": [catalogue.note(cat, k, p) for k, p in side.consequences],
                "wire": side.wire,
                "seconds": round(side.seconds, 2),
            }
        attacks.append({"name": run.name, "row": text["row"], "title": text["title"],
                        "attack": text["attack"], "counter": text["counter"], "sides": sides})
    return {"lang": lang, "ui": cat.UI, "attacks": attacks}


# ---------------------------------------------------------------------------- terminal


def _verdict(ui: dict[str, str], ok: bool, colour: bool) -> str:
    word = ui["succeeded"] if ok else ui["stopped"]
    if not colour:
        return word
    return f"\x1b[{'31;1' if ok else '32'}m{word}\x1b[0m"


def terminal_attack(a: dict[str, Any], ui: dict[str, str], *, colour: bool = False,
                    width: int = 120) -> str:
    col = (width - 3) // 2
    mark = ROW_MARKS.get(a["row"], a["row"])
    out = ["", "=" * width, f"{mark} {a['title']}  ({ui['attack']}: {a['name']})", "=" * width]
    out += [f"{ui['attacker']}:"] + ["  " + ln for ln in _wrap(a["attack"], width - 2)]
    out += ["", f"{ui['replies']}:"]
    left, right = (a["sides"][s] for s in SIDES)
    out.append(_cut(ui["legacy"], col) + " | " + ui["hardened"])
    out.append("-" * col + "-+-" + "-" * col)
    n = max(len(left["transcript"]), len(right["transcript"]))
    for i in range(n):
        lt = left["transcript"][i] if i < len(left["transcript"]) else ""
        rt = right["transcript"][i] if i < len(right["transcript"]) else ""
        out.append(_cut(lt, col) + " | " + _cut(rt, col).rstrip())
    out += ["", f"{ui['consequence']}:"]
    for s in SIDES:
        side = a["sides"][s]
        out.append(f"  {ui[s]}: {_verdict(ui, side['succeeded'], colour)}")
        out += [f"    - {c}" for c in side["consequences"]]
    if left["wire"] or right["wire"]:
        out += ["", f"{ui['wire']}:"]
        for s in SIDES:
            out.append(f"  {ui[s]}:")
            out += [f"    {ln}" for ln in a["sides"][s]["wire"][:30]]
    out += ["", f"{ui['counter']}:"] + ["  " + ln for ln in _wrap(a["counter"], width - 2)]
    return "\n".join(out) + "\n"


def terminal_summary(report: dict[str, Any], *, colour: bool = False) -> str:
    ui = report["ui"]
    rows = [(ROW_MARKS.get(a["row"], a["row"]) + " " + a["name"],
             *(a["sides"][s]["succeeded"] for s in SIDES)) for a in report["attacks"]]
    w0 = max([_width(ui["attack"])] + [_width(r[0]) for r in rows]) + 2
    w1 = max(_width(ui["legacy"]), _width(ui["succeeded"])) + 2
    out = ["", f"{ui['summary']}:",
           _cut(ui["attack"], w0) + _cut(ui["legacy"], w1) + ui["hardened"]]
    for name, leg, hard in rows:
        out.append(_cut(name, w0) + _cut(_verdict(ui, leg, False), w1).replace(
            _verdict(ui, leg, False), _verdict(ui, leg, colour)) + _verdict(ui, hard, colour))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- HTML

CSS = """\
table { margin: 1rem 0; }
th, td { padding: .35rem .8rem; }
.badge { min-width: 7rem; }
.works { background: #c62828; } .stopped { background: #2e7d32; }
section { border-left: .4rem solid #c62828; margin: 1.2rem 0; }
section h2 { font-size: 1.15rem; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
.col h3 { font-size: 1rem; margin: .6rem 0 .3rem; }
pre { font-size: .75rem; margin: .3rem 0; }
ul { margin: .3rem 0; padding-left: 1.2rem; }
.counter { background: #eef6ee; border-radius: .3rem; padding: .4rem .8rem; }
"""


def _badge(ui: dict[str, str], ok: bool) -> str:
    return page.badge("works", ui["succeeded"]) if ok else page.badge("stopped", ui["stopped"])


def html_page(report: dict[str, Any]) -> str:
    """One self-contained page: summary table, then per attack the two servers side by
    side; no external resource, no script that runs."""
    ui = report["ui"]
    e = html.escape
    rows, sections = [], []
    for a in report["attacks"]:
        anchor = "a-" + a["name"]
        mark = ROW_MARKS.get(a["row"], a["row"])
        rows.append(f'<tr><td class="id"><a href="#{anchor}">{e(mark)} {e(a["name"])}</a></td>'
                    + "".join(f"<td>{_badge(ui, a['sides'][s]['succeeded'])}</td>"
                              for s in SIDES) + "</tr>")
        cols = []
        for s in SIDES:
            side = a["sides"][s]
            parts = [f'<div class="col"><h3>{e(ui[s])} {_badge(ui, side["succeeded"])}</h3>',
                     f"<pre>{e(chr(10).join(side['transcript']))}</pre>",
                     f"<strong>{e(ui['consequence'])}</strong><ul>"
                     + "".join(f"<li>{e(c)}</li>" for c in side["consequences"]) + "</ul>"]
            if side["wire"]:
                parts.append(f"<strong>{e(ui['wire'])}</strong>"
                             f"<pre>{e(chr(10).join(side['wire']))}</pre>")
            parts.append("</div>")
            cols.append("".join(parts))
        sections.append(
            f'<section id="{anchor}"><h2>{e(mark)} {e(a["title"])} '
            f"<small>({e(a['name'])})</small></h2>"
            f"<p><strong>{e(ui['attacker'])}:</strong> {e(a['attack'])}</p>"
            f'<div class="cols">{"".join(cols)}</div>'
            f'<p class="counter"><strong>{e(ui["counter"])}:</strong> {e(a["counter"])}</p>'
            "</section>")
    body = "\n".join([
        f'<p class="meta">{e(ui["intro"])}</p>', f"<h2>{e(ui['summary'])}</h2>",
        page.table([ui["attack"], ui["legacy"], ui["hardened"]], rows), *sections])
    return page.document(lang=report["lang"], title=ui["title"], body=body, css=CSS,
                         data_id="lab-session", data=report, max_width="80rem")
