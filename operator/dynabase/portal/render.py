"""The portal's HTML: the log-in form, a tenant's page and the error pages. One request per page:
the style sheet is inline (allowed by its hash in the Content-Security-Policy), the chart is SVG, and
there is no script. Every value from outside is escaped here."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from html import escape
from pathlib import Path

from dynabase.backends.events_pg import StoredEvent

from .chart import usage_chart, vcpu_hours
from .data import TenantPage

CSS = (Path(__file__).parent / "style.css").read_text()
CSS_HASH = "sha256-" + base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
ROUGH = " (from less than a day of usage: a rough guess until more is metered)"
HIT_LABELS = {
    "rejected_connections": ("Connections refused", "over the proxy's maxConnections"),
    "rejected": ("Queries refused", "over the queries/s limit (overLimit: reject, or waited past queueTimeout)"),
    "throttled": ("Queries delayed", "held back to stay within the queries/s limit"),
}


def _document(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{escape(title)} · DynaBase</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def login_page(base: str, csrf: str, *, error: str | None = None, database: str = "") -> str:
    message = f'<p class="err" role="alert">{escape(error)}</p>' if error else ""
    return _document("Log in", (
        f'<form class="login" method="post" action="{escape(base)}login"><h1>Your database</h1>'
        '<p class="sub">Log in with your database name and password, as your application connects.</p>'
        f"{message}"
        f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
        f'<label for="database">Database</label><input id="database" name="database" value="{escape(database)}" '
        'autocomplete="username" required autofocus>'
        '<label for="password">Password</label><input id="password" name="password" type="password" '
        'autocomplete="current-password" required>'
        '<p><button class="primary" type="submit">Log in</button></p></form>'))


def error_page(title: str, message: str, base: str) -> str:
    return _document(title, f'<main><section class="card"><h1>{escape(title)}</h1><p>{escape(message)}</p>'
                            f'<p><a href="{escape(base)}">Your page</a></p></section></main>')


def money(value: float) -> str:
    return f"${value:,.2f}"


def _figure(label: str, metric: str, value: float, shown: str, sub: str = "", mood: str = "") -> str:
    return (f'<div class="figure {mood}"><span class="k">{escape(label)}</span>'
            f'<span class="v" data-metric="{metric}" data-value="{value:.6f}">{escape(shown)}</span>'
            f'<span class="s">{escape(sub)}</span></div>')


def _month_card(page: TenantPage) -> str:
    title = dt.datetime.strptime(page.month, "%Y-%m").strftime("%B %Y")
    projection = page.projection
    if projection is None:
        why = page.usage_error or "no usage is metered for this platform"
        return f'<section class="card"><h2>This month, {title}</h2><p class="note">{escape(why)}</p></section>'
    to_date, projected = projection.to_date, projection.projected
    included, used = to_date.included_vcpu_hours, to_date.vcpu_hours
    share = used / included if included > 0 else 0.0
    mood = "over" if included > 0 and share >= 1 else "near" if share >= 0.8 else ""
    figures = [
        _figure("Used so far", "vcpu-hours", used, f"{vcpu_hours(used)} vCPU-h",
                f"of {vcpu_hours(included)} included ({share:.0%})" if included > 0 else "nothing included", mood),
        _figure("Queries", "queries", page.usage.queries, f"{page.usage.queries:,.0f}",
                f"{page.usage.query_seconds:,.1f} s of query time"),
        _figure("Projected by month end", "projected-vcpu-hours", projected.vcpu_hours,
                f"{vcpu_hours(projected.vcpu_hours)} vCPU-h",
                f"over by {vcpu_hours(projected.overage_vcpu_hours)}" if projected.overage_vcpu_hours > 0
                else "within what is included"),
        _figure("Projected price", "projected-price", projected.base_fee_usd + projected.overage_usd,
                money(projected.base_fee_usd + projected.overage_usd),
                f"{money(projected.base_fee_usd)} base + {money(projected.overage_usd)} overage"),
    ]
    chart = usage_chart(page.daily_vcpu_hours, elapsed_days=(page.as_of - _month_start(page.as_of)).total_seconds()
                        / 86400, included=included, projected=projected.vcpu_hours)
    return (f'<section class="card"><h2>This month, {title}</h2><div class="figures">{"".join(figures)}</div>'
            f"{chart}{_over_note(page)}"
            f'<p class="note">Month to date at its average pace so far ({projection.elapsed_hours:,.0f} h), '
            f"extrapolated over the {projection.remaining_hours:,.0f} h left and priced as your invoice is"
            f"{ROUGH if projection.elapsed_hours < 24 else ''}. As of {page.as_of:%Y-%m-%d %H:%M} UTC.</p></section>")


def _over_note(page: TenantPage) -> str:
    assert page.projection is not None
    parts = page.projection.projected.parts
    unsold = [p for p in parts if p.overage_vcpu_hours > 0 and p.overage_price_usd is None]
    if not unsold:
        return ""
    return (f'<p class="note err">{escape(page.tier)} sells no overage: over the included usage your database is '
            "restricted after the soft-overage period, until the month ends or you upgrade.</p>")


def _month_start(now: dt.datetime) -> dt.datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _hits_card(page: TenantPage) -> str:
    if not page.hits:
        return ""
    rows = "".join(
        f'<tr><td>{escape(label)}<div class="d">{escape(why)}</div></td>'
        f'<td class="n" data-metric="{name}" data-value="{page.hits[name][0]}">{page.hits[name][0]:,}</td>'
        f'<td class="n" data-metric="{name}-today" data-value="{page.hits[name][1]}">{page.hits[name][1]:,}</td></tr>'
        for name, (label, why) in HIT_LABELS.items() if name in page.hits)
    return ('<section class="card"><h2>How often you hit your limits</h2><table><thead><tr><th></th>'
            f'<th class="n">This month</th><th class="n">Today (UTC)</th></tr></thead><tbody>{rows}</tbody></table>'
            "</section>")


def _limits_card(page: TenantPage) -> str:
    upgrade = page.next_tier
    head = f"<th>{escape(page.tier)} (yours)</th>" + (f"<th>{escape(upgrade)}</th>" if upgrade else "")
    rows, section = [], ""
    for row in page.limits:
        if row.section != section:
            section = row.section
            rows.append(f'<tr class="sec"><td colspan="{3 if upgrade else 2}">{escape(section)}</td></tr>')
        then = (f'<td class="{"up" if row.changed else ""}">{escape(row.next)}</td>' if upgrade and row.next is not None
                else "")
        rows.append(f'<tr><td>{escape(row.label)}<div class="d">{escape(row.description)}</div></td>'
                    f"<td>{escape(row.current)}</td>{then}</tr>")
    cta = ""
    if upgrade and page.projection is not None and page.projection.on_next_tier is not None:
        on_next = page.projection.on_next_tier
        yours = page.projection.projected
        price = on_next.base_fee_usd + on_next.overage_usd
        cta = (f'<div class="cta" data-metric="next-tier-price" data-value="{price:.6f}">'
               f"<strong>Upgrade to {escape(upgrade)}</strong>: this month at its pace so far would cost "
               f"<strong>{money(price)}</strong> on {escape(upgrade)} "
               f"({vcpu_hours(on_next.included_vcpu_hours)} vCPU-h included) against "
               f"{money(yours.base_fee_usd + yours.overage_usd)} on {escape(page.tier)}, with the higher limits "
               "marked below. Ask your platform's billing to change your plan.</div>")
    elif upgrade:
        cta = f'<div class="cta"><strong>Upgrade to {escape(upgrade)}</strong> for the higher limits below.</div>'
    title = f"Your limits and {escape(upgrade)}'s" if upgrade else "Your limits"
    return (f'<section class="card upgrade"><h2>{title}</h2>{cta}<table><thead><tr><th>Limit</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></section>")


def _event_item(event: StoredEvent) -> str:
    return (f'<li class="{escape(event.type)}"><span class="ev">{escape(event.reason)}</span> '
            f'<span class="d">{event.at:%Y-%m-%d %H:%M} UTC</span><div>{escape(event.message)}</div></li>')


def _events_card(page: TenantPage) -> str:
    items = "".join(_event_item(e) for e in page.events) or '<li class="d">Nothing yet.</li>'
    return f'<section class="card"><h2>Recent events</h2><ul class="events">{items}</ul></section>'


def tenant_page(page: TenantPage, base: str, csrf: str) -> str:
    tenant, status = page.tenant, page.status
    phase = status.phase if status is not None else "Pending"
    pending = ""
    if status is not None and status.pending_tier:
        when = f" on {status.effective_at:%Y-%m-%d %H:%M} UTC" if status.effective_at else ""
        pending = f" · moving to {escape(status.pending_tier)}{when}"
    header = (f'<header><div><h1>{escape(tenant.database_name)}</h1><p class="sub">organization '
              f'{escape(tenant.spec.org_id)} · <span class="badge" data-metric="tier">{escape(page.tier)}</span> · '
              f'{escape(phase)}{pending}</p></div><form method="post" action="{escape(base)}logout">'
              f'<input type="hidden" name="csrf" value="{escape(csrf)}"><button type="submit">Log out</button></form>'
              "</header>")
    body = "".join((_month_card(page), _hits_card(page), _limits_card(page), _events_card(page)))
    return _document(tenant.database_name, f"{header}<main>{body}</main>")
