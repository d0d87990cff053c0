"""Calendar periods in the district's time zone: months for stats, date ranges for ledgers."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from fastapi import Query

from api.errors import BadRequest

# The pilots are in China; months and days are counted in local time, not UTC.
DEFAULT_TZ = "Asia/Shanghai"
_MONTH = re.compile(r"^([0-9]{4})-(0[1-9]|1[0-2])$")
# Years a ledger or statistic can sensibly ask about (and datetime arithmetic survives).
_FIRST_YEAR, _LAST_YEAR = 2000, 2199
# The two rules above as the schema states them (checked in code, for their 400s).
_MONTH_PATTERN = r"^2[01][0-9]{2}-(?:0[1-9]|1[0-2])$"
MonthQuery = Annotated[
    str | None,
    Query(
        description="YYYY-MM; default: this month", json_schema_extra={"pattern": _MONTH_PATTERN}
    ),
]
# The zones this machine's IANA database knows, listed so that the schema says which (an
# empty list would be a schema nothing satisfies: without a database, no list).
_ZONES = sorted(available_timezones())
TzQuery = Annotated[
    str,
    Query(
        max_length=64,
        description="IANA time zone",
        json_schema_extra={"enum": _ZONES} if _ZONES else None,
    ),
]


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadRequest(f"tz={name[:40]!r} is not an IANA time zone", code="bad_tz") from None


def month_bounds(month: str, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """`2026-05` → [its first midnight, the next month's first midnight) in `tz`."""
    match = _MONTH.match(month)
    if match is None or not _FIRST_YEAR <= int(match.group(1)) <= _LAST_YEAR:
        raise BadRequest(f"month={month[:20]!r}: give YYYY-MM", code="bad_month")
    year, number = int(match.group(1)), int(match.group(2))
    start = datetime(year, number, 1, tzinfo=tz)
    end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=tz)
    return start, end


def current_month(now_ms: int, tz: ZoneInfo) -> str:
    return f"{datetime.fromtimestamp(now_ms / 1000, tz):%Y-%m}"


def day_bounds_ms(
    first: date | None, last: date | None, tz: ZoneInfo
) -> tuple[int | None, int | None]:
    """[first day's midnight, the midnight after the last day) in `tz`, as epoch ms."""
    for value in (first, last):
        if value is not None and not _FIRST_YEAR <= value.year <= _LAST_YEAR:
            raise BadRequest(f"{value}: outside {_FIRST_YEAR}-{_LAST_YEAR}", code="bad_range")
    if first is not None and last is not None and last < first:
        raise BadRequest("`to` is before `from`", code="bad_range")
    start = _ms(datetime.combine(first, time(), tz)) if first else None
    end = _ms(datetime.combine(last + timedelta(days=1), time(), tz)) if last else None
    return start, end


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def local(ms: int | None, tz: ZoneInfo) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).astimezone(tz)
