"""A comparison as one self-contained HTML page: inline CSS, no scripts, no fetches,
so it opens offline and can be mailed or attached to a CI run."""

from __future__ import annotations

from html import escape

from .compare import (ADVERTISED_BUT_ABSENT, ADVERTISED_BUT_UD, MASKED_BUT_EXECUTABLE, Cell, Comparison,
                      migration_outcome, outcome_kind)

STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2330; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
h3 { font-size: 15px; margin: 16px 0 6px; color: #5a6475; }
.sub { color: #5a6475; margin-bottom: 16px; }
table { border-collapse: collapse; margin-bottom: 8px; }
th, td { border: 1px solid #c9d0db; padding: 4px 8px; text-align: center; }
th.host { background: #e8edf5; } th.feature, td.feature { text-align: left; font-family: monospace; }
td.yes { color: #136c2e; } td.no { color: #8a93a3; }
td.masked { background: #ffd84d; color: #1d2330; font-weight: bold; }
td.advertised, td.crash { background: #d7263d; color: #fff; font-weight: bold; }
td.refused { background: #f4a259; font-weight: bold; } td.ok { background: #c8f0d2; }
.legend span { display: inline-block; padding: 2px 8px; margin-right: 8px; border: 1px solid #c9d0db; }
.timeline { display: flex; align-items: stretch; margin: 6px 0 14px; }
.step { padding: 6px 10px; border: 1px solid #c9d0db; margin-right: -1px; min-width: 150px; }
.step.source { background: #e8edf5; } .step.move { background: #fff6d6; }
.step.ok { background: #c8f0d2; } .step.crash { background: #d7263d; color: #fff; }
.step.refused { background: #f4a259; }
.step b { display: block; }
"""


def _yes_no(value: bool | None) -> tuple[str, str]:
    if value is None:
        return "-", ""
    return ("yes", "yes") if value else ("no", "no")


def _cells(cell: Cell, migrating: bool) -> list[str]:
    physical, physical_class = _yes_no(cell.physical)
    cpuid, cpuid_class = _yes_no(cell.cpuid)
    probe, probe_class = _yes_no(cell.probe)
    if cell.disagreement == MASKED_BUT_EXECUTABLE:
        cpuid_class = "masked"
        if cell.probe:
            probe_class = "masked"
    elif cell.disagreement == ADVERTISED_BUT_ABSENT:
        cpuid_class = "advertised"
    elif cell.disagreement == ADVERTISED_BUT_UD:
        probe_class = "advertised"
    out = [f'<td class="{physical_class}">{physical}</td>', f'<td class="{cpuid_class}">{cpuid}</td>',
           f'<td class="{probe_class}">{probe}</td>', f"<td>{escape(cell.uses or '-')}</td>"]
    if migrating:
        after = cell.after or "-"
        out.append(f'<td class="{outcome_kind(cell.after) or ""}">{escape(after)}</td>')
    return out


def _timeline(comparison: Comparison, guest: str, host: str) -> str:
    plain = comparison.runs[guest, host]
    migrated = comparison.migrated.get((guest, host))
    if migrated is None:  # no checkpoint: compare never tried to migrate it
        steps = [("source", f"boot on {host}", "runs to its end without reaching a checkpoint"),
                 ("source", "not migrated: no checkpoint", plain.stop.message)]
    else:
        steps = [("source", f"boot on {host}", "detects, runs to checkpoint 1")]
        record = migrated.migrations[0] if migrated.migrations else None
        if record is not None and record["ok"]:
            detail = f"{record.get('mode') or 'live'}, {record['rounds']} round{'' if record['rounds'] == 1 else 's'}, downtime {record['downtime_ms']} ms"
            steps.append(("move", f"migrate to {record['to']}" + (" (forced)" if record["forced"] else ""), detail))
        elif record is not None and record.get("refused", True):
            steps.append(("refused", f"refused: {record['to']}", "lacks " + ", ".join(record.get("missing", []))))
        elif record is not None:
            steps.append(("source", f"no move to {record['to']}", record.get("reason", "")))
        outcome = migration_outcome(plain, migrated)
        steps.append((outcome_kind(outcome) or "source", outcome, migrated.stop.message))
    return "".join(f'<div class="step {k}"><b>{escape(title)}</b>{escape(text)}</div>' for k, title, text in steps)


def comparison_page(comparison: Comparison) -> str:
    migrating = comparison.migrate_to is not None
    per_host = 5 if migrating else 4
    what = f"EVC mode {comparison.evc}" if comparison.evc else "no EVC mode"
    if comparison.masks:
        what += ", masks " + ", ".join(comparison.masks)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>minivmm compare</title>", f"<style>{STYLE}</style></head><body>",
        "<h1>CPUID-guided vs #UD-guided detection</h1>",
        f"<div class='sub'>Hosts {escape(', '.join(comparison.hosts))}; {escape(what)}"
        + (f"; migrating to {escape(comparison.migrate_to)} at checkpoint 1" if migrating else "") + "</div>",
        "<div class='legend'><span class='masked' style='background:#ffd84d'>masked but executable</span>"
        "<span style='background:#d7263d;color:#fff'>advertised but #UD or absent / crash after migration</span>"
        "<span style='background:#f4a259'>migration refused</span></div>",
    ]
    for guest in comparison.guests:
        parts.append(f"<h2>{escape(guest)}</h2>")
        features = comparison.features(guest)
        if not features:
            parts.append("<p>This guest printed no detection lines (FEATURE: cpuid=.. probe=.. uses=..).</p>")
            continue
        head = "".join(f"<th class='host' colspan='{per_host}'>{escape(h)}</th>" for h in comparison.hosts)
        sub = ("<th>physical</th><th>CPUID</th><th>probe</th><th>uses</th>"
               + (f"<th>after &rarr; {escape(comparison.migrate_to)}</th>" if migrating else "")) * len(comparison.hosts)
        parts.append(f"<table><tr><th class='feature' rowspan='2'>feature</th>{head}</tr><tr>{sub}</tr>")
        for feature in features:
            row = "".join("".join(_cells(comparison.cell(guest, feature, h), migrating)) for h in comparison.hosts)
            parts.append(f"<tr><td class='feature'>{escape(feature)}</td>{row}</tr>")
        parts.append("</table>")
        if migrating:
            parts.append(f"<h3>{escape(guest)}: migration timeline to {escape(comparison.migrate_to)}</h3>")
            for host in comparison.hosts:
                parts.append(f"<div class='timeline'>{_timeline(comparison, guest, host)}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
