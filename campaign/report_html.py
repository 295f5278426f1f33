"""report.html: a campaign's charts and counts in one self-contained file, for the mail.

Written beside results.csv and summary.json whenever they are (`campaign report`, the end
of every run, every reconcile). Everything it needs is inside it: the vendored Chart.js,
the drawing code the page uses (web/static/story.js), its styles, and the story as JSON
(`story.campaign_story`: aggregates only, no phone number, no param value). Its
Content-Security-Policy allows no request at all, so opened from an e-mail attachment on
a laptop without a network it draws the same charts, and every chart's plain-text summary
is in the HTML itself for a reader that runs no script (docs/page.md, "Charts").
"""

from __future__ import annotations

import html
import json
import re
import time
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import structlog

from campaign.files import atomic_write
from campaign.store.ledger import Ledger, LedgerError
from campaign.story import campaign_story

log = structlog.get_logger(__name__)

REPORT_HTML = "report.html"
CHART_JS = "chart.js 4.6.2"  # web/static/vendor/README.md: where it comes from
_STATIC = resources.files("campaign.web") / "static"
_TITLES = (
    ("rate", "Requests per second, by outcome"),
    ("progress", "Progress"),
    ("statuses", "Statuses"),
    ("funnel", "Delivery: what became of the sent SMS"),
    ("reasons", "Top failure reasons"),
    ("waiting", "People waiting for their send window"),
)
# No request of any kind: scripts and styles only from the file itself.
_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; base-uri 'none'; form-action 'none'"
)
_FAILURES: tuple[type[Exception], ...] = (OSError, ValueError, *LedgerError)
_SOURCE_MAP = re.compile(r"\n//# sourceMappingURL=\S+\s*$")


def write_report_html(
    ledger: Ledger, directory: Path, campaign: str, summary: dict[str, Any]
) -> Path | None:
    """Write `directory/report.html` atomically; its path, or None when it could not be
    written (the results and summary, already written, are what counts: a failure here
    is a warning, never a failed run)."""
    try:
        story = campaign_story(ledger, campaign, summary.get("counts"))
        text = render(story, summary)
        with atomic_write(directory / REPORT_HTML) as out:
            out.write(text)
    except _FAILURES as exc:
        log.warning("report.html not written", campaign=campaign, error=str(exc))
        return None
    return directory / REPORT_HTML


def render(story: dict[str, Any], summary: dict[str, Any]) -> str:
    """The whole file."""
    campaign = html.escape(story["campaign"])
    figures = "\n".join(_figure(name, title, story) for name, title in _TITLES)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_POLICY}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Campaign {campaign}: report</title>
<style>
body {{ margin: 1.2rem auto; max-width: 1150px; padding: 0 1rem; color: #1d2430;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; background: #f4f6f9; }}
h1 {{ font-size: 1.3rem; margin: 0 0 0.3rem; }}
.muted {{ color: #5f6b7a; }}
table.counts {{ border-collapse: collapse; margin: 0.6rem 0 1rem; background: #fff; }}
table.counts th, table.counts td {{
  border: 1px solid #dde3ea; padding: 0.25rem 0.6rem; text-align: left; }}
{_static_text("story.css")}
</style>
</head>
<body>
<h1>Campaign <code>{campaign}</code></h1>
<p class="muted">Report written {_utc(story["generated_at"])}; \
times in UTC. {html.escape(_run_line(summary))}</p>
{_counts_table(story)}
<div class="charts" id="charts">
{figures}
</div>
<p class="muted">Charts drawn with {CHART_JS} (MIT), carried inside this file.</p>
<script type="application/json" id="story">{_json_for_script(story)}</script>
<script>{_library()}</script>
<script>{_script("story.js")}</script>
<script>drawStory(document.getElementById("charts"), \
JSON.parse(document.getElementById("story").textContent));</script>
</body>
</html>
"""


def _figure(name: str, title: str, story: dict[str, Any]) -> str:
    text = html.escape(story["text"][name])
    table = _reasons_table(story["reasons"]) if name == "reasons" else ""
    return (
        f'<figure class="chart" data-chart="{name}"><h3>{html.escape(title)}</h3>'
        f'<div class="chart-box"><canvas role="img" aria-label="{html.escape(title)}: {text}">'
        f'</canvas></div><figcaption class="chart-text">{text}</figcaption>{table}</figure>'
    )


def _reasons_table(reasons: list[dict[str, Any]]) -> str:
    if not reasons:
        return ""
    rows = "".join(
        f"<tr><td>{r['count']}</td><td>{html.escape(r['kind'])}</td>"
        f"<td>{html.escape(r['reason'])}</td></tr>"
        for r in reasons
    )
    return (
        '<table class="reasons"><thead><tr><th>People</th><th>Where</th><th>Reason</th>'
        f"</tr></thead><tbody>{rows}</tbody></table>"
    )


def _counts_table(story: dict[str, Any]) -> str:
    statuses = {k: v for k, v in story["statuses"].items() if v}
    delivery = story["delivery"]
    cells = "".join(f"<th>{html.escape(k)}</th><td>{v}</td>" for k, v in statuses.items())
    line = f'<table class="counts"><tr><th colspan="2">rows</th><td>{sum(statuses.values())}'
    line += f"</td>{cells}</tr>"
    if delivery:
        shown = "".join(f"<th>{html.escape(k)}</th><td>{v}</td>" for k, v in delivery.items())
        line += f'<tr><th colspan="2">delivery reports</th><td></td>{shown}</tr>'
    return line + "</table>"


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _run_line(summary: dict[str, Any]) -> str:
    run = summary.get("last_run")
    if not run:
        return "No run has sent anything yet."
    return (
        f"Last run: {run['state']}, started {run['started_at']}, {run['requests']} requests "
        f"in {run['duration_s']} s ({run['achieved_rate']} per second)."
    )


def _json_for_script(value: Any) -> str:
    """JSON that cannot end its <script> element early, whatever text it holds."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _library() -> str:
    """The vendored Chart.js, without the pointer to a source map (a request to nowhere)."""
    return _SOURCE_MAP.sub("\n", _script("vendor/chart.umd.min.js"))


@cache
def _script(name: str) -> str:
    text = _static_text(name)
    if "</script" in text.lower():
        raise ValueError(f"static/{name} cannot be inlined in a <script> element")
    return text


@cache
def _static_text(name: str) -> str:
    return (_STATIC / name).read_text(encoding="utf-8")
