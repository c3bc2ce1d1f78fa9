"""The month's usage against what is included, as inline SVG (no script, no image request).

Cumulative vCPU-hours day by day up to now, the projection to the month's end
dashed, and the included amount and its 80 % as horizontal lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 640, 240
LEFT, RIGHT, TOP, BOTTOM = 52, 16, 14, 28


def vcpu_hours(value: float) -> str:
    """vCPU-hours with the precision a small tenant needs and a large one does not."""
    if value == 0:
        return "0"
    if value < 0.1:
        return f"{value:.4f}"
    return f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def usage_chart(daily: Sequence[float], *, elapsed_days: float, included: float, projected: float) -> str:
    """``daily``: vCPU-hours per day of the month; ``elapsed_days``: how far into the month now is."""
    days = len(daily)
    used = sum(daily)
    top = max(included, projected, used) * 1.12 or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(day: float) -> float:
        return LEFT + plot_w * day / days

    def y(value: float) -> float:
        return TOP + plot_h * (1 - value / top)

    points = [(0.0, 0.0)]
    total = 0.0
    for day, value in enumerate(daily):
        if day + 1 > elapsed_days:  # today: up to now, then stop
            points.append((elapsed_days, total + value))
            break
        total += value
        points.append((day + 1.0, total))
    line = " ".join(f"{x(d):.1f},{y(v):.1f}" for d, v in points)
    area = f"{x(0):.1f},{y(0):.1f} {line} {x(points[-1][0]):.1f},{y(0):.1f}"
    summary = (f"{vcpu_hours(used)} of {vcpu_hours(included)} included vCPU-hours used so far; "
               f"{vcpu_hours(projected)} projected by the month's end")
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(summary)}">',
             f"<title>{escape(summary)}</title>"]
    for i in range(5):  # y grid and labels
        value = top * i / 4
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}"/>'
                     f'<text class="axis" x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">'
                     f"{vcpu_hours(value)}</text>")
    for day in sorted({1, 8, 15, 22, days}):
        parts.append(f'<text class="axis" x="{x(day - 0.5):.1f}" y="{HEIGHT - 8}" text-anchor="middle">{day}</text>')
    if included > 0:
        parts.append(f'<line class="warn" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(included * 0.8):.1f}" '
                     f'y2="{y(included * 0.8):.1f}"/><text class="label" x="{WIDTH - RIGHT - 4}" '
                     f'y="{y(included * 0.8) - 4:.1f}" text-anchor="end">80 %</text>')
        parts.append(f'<line class="included" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(included):.1f}" '
                     f'y2="{y(included):.1f}"/><text class="label" x="{WIDTH - RIGHT - 4}" '
                     f'y="{y(included) - 4:.1f}" text-anchor="end">included {vcpu_hours(included)}</text>')
    end_day, end_value = points[-1]
    parts.append(f'<polygon class="area" points="{area}"/><polyline class="used" points="{line}"/>')
    if end_day < days:
        parts.append(f'<line class="projected" x1="{x(end_day):.1f}" y1="{y(end_value):.1f}" x2="{x(days):.1f}" '
                     f'y2="{y(projected):.1f}"/>')
    parts.append(f'<circle class="now" cx="{x(end_day):.1f}" cy="{y(end_value):.1f}" r="3.5"/></svg>')
    return "".join(parts)
