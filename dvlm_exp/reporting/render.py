"""report.html from the report's tables: pandas Styler for every table, one Jinja2 template for the page
(dvlm_exp/reporting/report.html.jinja). Text is escaped by Jinja2 (autoescape) and by Styler (escape="html");
`code` spans of the report's prose become <code> elements (the `code` filter), so a reader never sees a
literal backtick. Wide tables scroll inside their own box (the page itself never scrolls sideways at
1280 px: tests/test_report_html.py checks it in headless chromium).
"""

from __future__ import annotations

import re
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "report.html.jinja"


def _code(text) -> "Markup":
    """Escape text; `x` -> <code>x</code>."""
    from markupsafe import Markup, escape

    parts = re.split(r"`([^`]+)`", str(text))
    return Markup("").join(escape(p) if i % 2 == 0 else Markup("<code>%s</code>") % p for i, p in enumerate(parts))


def styled_table(header: list[str], rows: list[list[str]], n_key: int = 0) -> str:
    """One table as HTML through pandas' Styler (escaped cells, no index, key columns left-aligned)."""
    import pandas as pd

    df = pd.DataFrame(rows, columns=header) if rows else pd.DataFrame(columns=header)
    df.columns = [str(c) for c in df.columns]
    styler = df.style.hide(axis="index").format(escape="html", na_rep="")
    classes = pd.DataFrame("", index=df.index, columns=df.columns)
    for c in df.columns[:n_key]:
        classes[c] = "key"
    styler = styler.set_td_classes(classes)
    styler = styler.set_table_styles([{"selector": f"th.col_heading.col{i}", "props": "text-align: left"}
                                      for i in range(n_key)], overwrite=False)
    return styler.to_html(doctype_html=False)


def render_html(title: str, intro: list[str], warnings: list[str], tables: list[dict], plots: list[dict],
                mappings: list[dict], mapping_note: str) -> str:
    """tables: {"title", "sub", "warnings", "scores": (header, rows), "efficiency": (header, rows), "n_key",
    "csv": (path, path)}; plots: {"src", "alt"}; mappings: {"title", "header", "rows"}."""
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["code"] = _code
    tpl = env.from_string(TEMPLATE.read_text())
    view = []
    for t in tables:
        view.append({**t, "scores_html": Markup(styled_table(*t["scores"], n_key=t["n_key"])),
                     "efficiency_html": Markup(styled_table(*t["efficiency"], n_key=t["n_key"]))})
    maps = [{"title": m["title"], "html": Markup(styled_table(m["header"], m["rows"], n_key=len(m["header"])))}
            for m in mappings]
    return tpl.render(title=title, intro=intro, warnings=warnings, tables=view, plots=plots, mappings=maps,
                      mapping_note=mapping_note)
