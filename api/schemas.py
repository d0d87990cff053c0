"""Bodies of the API's answers and requests that are not registry records."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Generic, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from alerting.models import CaseStatus
from core.registry_schemas import Unit, UnitKind
from core.text import FREE_TEXT

T = TypeVar("T")

# Page sizes: enough for a dashboard table, small enough to answer quickly.
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
# Far beyond any real table; keeps the value inside the databases' 64-bit integers.
MAX_OFFSET = 1_000_000_000


class Page(BaseModel, Generic[T]):
    """One page of a list; `next_offset` is where the next page starts, null on the last."""

    items: list[T]
    limit: int
    offset: int
    next_offset: int | None


def page_of(items: list[T], *, limit: int, offset: int) -> Page[T]:
    """A page from `limit + 1` fetched items: the extra one only says there is more."""
    more = len(items) > limit
    return Page[T](
        items=items[:limit],
        limit=limit,
        offset=offset,
        next_offset=offset + limit if more else None,
    )


Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT, description="Page size")]
Offset = Annotated[int, Field(ge=0, le=MAX_OFFSET, description="Items to skip")]


def masked_url(url: str) -> str:
    """Scheme and host only: chat robots carry their access token in the path or query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}/***"


class UnitOut(BaseModel):
    """A unit as the API shows it: whether it has a webhook secret, never the secret; the
    webhook URL in full to admins only, masked to every other key."""

    code: str
    name: str
    kind: UnitKind
    parent: str | None
    webhook_url: str | None
    has_webhook_secret: bool
    supervisor_contact: str | None

    @classmethod
    def of(cls, unit: Unit, *, reveal: bool) -> UnitOut:
        shown = unit.model_dump(exclude={"webhook_secret"})
        if shown["webhook_url"] is not None:
            shown["webhook_url"] = str(shown["webhook_url"])
            if not reveal:
                shown["webhook_url"] = masked_url(shown["webhook_url"])
        return cls(**shown, has_webhook_secret=unit.webhook_secret is not None)


class AlertOut(BaseModel):
    """An alert as the outbox events carry it (times in epoch ms, device clock)."""

    id: int
    cover_id: str
    device_id: str | None
    kind: str
    subject: str | None
    severity: str
    status: str
    value: float | None
    raised_ms: int
    cleared_ms: int | None
    case_id: int | None
    # The alert's latency (DESIGN §5: well under a second from publish to notification):
    # raised_ms is the device's time of the reading; these are the server's.
    received_ms: int | None = None
    committed_ms: int | None = None
    notified_ms: int | None = None


class CaseOut(BaseModel):
    """A case as the outbox events carry it, with its next deadline (epoch ms)."""

    id: int
    cover_id: str
    unit_code: str
    road: str | None
    severity: str
    status: CaseStatus
    kinds: list[str]
    incident_id: int | None
    opened_ms: int
    state_times: dict[str, int]
    deadlines: dict[str, int]
    next_deadline_ms: int | None = Field(description="The earliest deadline not yet met")
    overdue: bool
    escalated: list[str]
    cancel_reason: str | None
    reopened: int


class TimelineEvent(BaseModel):
    at_ms: int
    actor: str
    action: str
    from_status: str | None
    to_status: str | None
    note: str


class IncidentOut(BaseModel):
    id: int
    kind: str
    road: str
    opened_ms: int
    last_ms: int
    closed_ms: int | None


class CaseDetail(CaseOut):
    timeline: list[TimelineEvent]
    alerts: list[AlertOut]
    incident: IncidentOut | None
    allowed_transitions: list[CaseStatus] = Field(
        description="Where the case can go next (whatever the caller's role)"
    )


class TransitionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: CaseStatus
    # Free text typed on site: line breaks and tabs kept, other control characters refused.
    note: Annotated[str, Field(max_length=2000), FREE_TEXT] = ""


class CensusRowError(BaseModel):
    row: int
    column: str | None
    reason: str


class CensusReportOut(BaseModel):
    """What a census import did, or would have done (dry run), and every rejected row."""

    rows: int
    inserted: int
    updated: int
    unchanged: int
    roads_created: int
    devices_created: int
    devices_updated: int
    bindings_made: int
    bindings_ended: int
    rejected_rows: int
    errors: list[CensusRowError]
    ignored_columns: list[str]
    dry_run: bool
    committed: bool
    summary: str  # the same sentence `smartcover covers import` prints


class UnitStats(BaseModel):
    """One unit's progress in one month (see api.stats for the exact definitions)."""

    unit_code: str
    unit_name: str
    covers: int
    problem_covers: int
    remediated_covers: int
    remediated_share: float | None = Field(description="remediated ÷ problem covers")
    meets_target: bool | None
    median_ack_s: float | None = Field(description="Median time to acknowledge, seconds")
    median_resolve_s: float | None = Field(description="Median time to resolve, seconds")
    overdue_cases: int
    rank: int | None = Field(description="1 = best; null for a unit without problem covers")


class StatsOut(BaseModel):
    month: str
    tz: str
    period_start: datetime
    period_end: datetime
    target_share: float
    units: list[UnitStats]
