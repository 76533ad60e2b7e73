"""Month arithmetic for due dates: a due date is the start date plus k months."""

import calendar
from datetime import date


def add_months(start: date, months: int) -> date:
    """`start` plus `months` calendar months, clamped to the month's last day (Jan 31 + 1 = Feb 28/29)."""
    month_index = start.month - 1 + months
    year = start.year + month_index // 12
    month = month_index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return date(year, month, day)


def installments_due(start: date, tenure: int, today: date) -> int:
    """How many of a loan's installments (due at start + 1..tenure months) fall on or before today."""
    months = (today.year - start.year) * 12 + today.month - start.month
    if months > 0 and add_months(start, months) > today:
        months -= 1
    return max(0, min(tenure, months))
