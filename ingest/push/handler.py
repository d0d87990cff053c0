"""The push's one flow: authenticate, read the platform's messages, map each device,
decode with its model's codec, and answer 2xx only once every reading is durable and
evaluated (ingest.service.IngestService.submit), 503 when it cannot be, so the platform
delivers again. Redelivery is harmless: the store overwrites a point with the same tags
and time, and the alert engine ignores a reading it has evaluated already (DESIGN §5).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import held_readings
from core.clock import wall_clock_ms
from core.contract import Reading, Reason
from core.db import transaction, utcnow
from core.deadletters import DeadLetter
from core.held_readings import HeldReadingRow
from core.registry_models import DeviceRow
from core.sources import PUSH_KINDS, Source, SourceKind, SourcesError, load_sources
from ingest.bootstrap import ConfigurationError
from ingest.codecs.base import Envelope, Payload, decode_payload
from ingest.codecs.registry import CodecConfigError, CodecRegistry, UnknownModel, load_codecs
from ingest.errors import IngestUnavailable
from ingest.push import auth
from ingest.push.messages import (
    PlatformMessage,
    PushMalformed,
    ctwing_messages,
    http_json_messages,
    iotda_messages,
    onenet_messages,
)

if TYPE_CHECKING:
    from smartcover.runtime import Service

logger = logging.getLogger(__name__)

# CTWing pauses a subscriber that answers slowly; past this the push is answered 503 and
# the platform delivers it again (what was written meanwhile is overwritten, harmlessly).
DEFAULT_DEADLINE_S = 5.0
# Bytes of a platform's push: one device's message is well under a kilobyte.
MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class PushAnswer:
    status: int
    text: str = ""


class PushMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "smartcover_push_requests",
            "HTTP pushes answered, per source and status code",
            ["source", "status"],
            registry=registry,
        )
        self.refused = Counter(
            "smartcover_push_refused",
            "HTTP pushes refused before reading them: bad_signature (token or signature) "
            "or address (not in the source's allow-list)",
            ["source", "reason"],
            registry=registry,
        )
        self.readings = Counter(
            "smartcover_push_readings",
            "Readings taken from HTTP pushes, per source",
            ["source"],
            registry=registry,
        )
        self.statuses = Counter(
            "smartcover_push_status_messages",
            "Device online/offline messages pushed, per source",
            ["source"],
            registry=registry,
        )


class Submitter(Protocol):
    """What the push needs of ingest (IngestService.submit)."""

    async def submit(self, readings: list[Reading], dead_letters: list[DeadLetter]) -> None: ...


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    held: int  # held readings replayed (and forgotten)
    stored: int  # readings stored and evaluated
    dead_lettered: int  # those the codec or the contract refused


@dataclass(frozen=True, slots=True)
class _Device:
    device_id: str
    model: str | None


class PushIngress:
    def __init__(
        self,
        *,
        sources: dict[str, Source],
        codecs: CodecRegistry,
        sessions: async_sessionmaker[AsyncSession],
        ingest: Callable[[], Submitter | None],
        metrics: PushMetrics,
        clock_ms: Callable[[], int],
        deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> None:
        """`ingest` gives the running ingest service, or None where nothing consumes."""
        self._sources = sources
        self._codecs = codecs
        self._sessions = sessions
        self._ingest = ingest
        self.metrics = metrics
        self._clock_ms = clock_ms
        self._deadline_s = deadline_s

    @classmethod
    def from_service(cls, service: Service) -> PushIngress:
        """The pushes of a running service; its sources and codecs read now (start-up)."""
        settings = service.settings
        try:
            sources = load_sources(settings.sources_file)
            codecs = load_codecs(settings.codecs_dir)
        except (SourcesError, CodecConfigError) as exc:
            raise ConfigurationError(str(exc)) from None
        return cls(
            sources=sources,
            codecs=codecs,
            sessions=service.sessions,
            ingest=lambda: service.ingest.service,
            metrics=PushMetrics(service.metrics_registry),
            clock_ms=wall_clock_ms,
            deadline_s=settings.push_deadline_s,
        )

    def source(self, name: str) -> Source | None:
        return self._sources.get(name)

    @property
    def sources(self) -> list[Source]:
        return [self._sources[name] for name in sorted(self._sources)]

    def admit(self, source: Source, *, token: str | None, address: str | None) -> PushAnswer | None:
        """The refusal of a request before its body is read, or None to go on."""
        if source.kind not in PUSH_KINDS:  # a LoRaWAN server's: it publishes over MQTT
            return PushAnswer(404, "this source does not push over HTTP")
        if not source.allows(address):
            self.metrics.refused.labels(source.name, "address").inc()
            return PushAnswer(403, "address not allowed for this source")
        if source.kind is SourceKind.ONENET:
            return None  # signed in the body
        assert source.token is not None  # a push source has one (core.sources)
        if not auth.token_matches(token, source.token.get_secret_value()):
            self.metrics.refused.labels(source.name, Reason.BAD_SIGNATURE.value).inc()
            return PushAnswer(401, "wrong or missing token")
        return None

    def verify_url(self, source: Source, query: dict[str, str]) -> PushAnswer:
        """OneNET's URL check: echo `msg` when the signature is the token's."""
        msg, nonce, signature = (query.get(name) for name in ("msg", "nonce", "signature"))
        if source.kind is not SourceKind.ONENET or msg is None or nonce is None:
            return PushAnswer(404, "no URL verification for this source")
        assert source.token is not None
        if signature is None or not auth.onenet_signed(
            source.token.get_secret_value(), nonce, msg, signature
        ):
            self.metrics.refused.labels(source.name, Reason.BAD_SIGNATURE.value).inc()
            return PushAnswer(401, "bad signature")
        return PushAnswer(200, msg)

    async def receive(self, source: Source, body: bytes) -> PushAnswer:
        """An admitted request's body: read, stored, evaluated; the answer for the platform."""
        try:
            messages = self._messages(source, body)
        except _Refused as refused:
            self.metrics.refused.labels(source.name, Reason.BAD_SIGNATURE.value).inc()
            return PushAnswer(401, str(refused))
        except PushMalformed as exc:
            logger.warning("push from %s refused: %s (body %.200r)", source.name, exc, body)
            return PushAnswer(400, str(exc))
        return await self._take(source, messages)

    def _messages(self, source: Source, body: bytes) -> list[PlatformMessage]:
        if source.kind is SourceKind.CTWING:
            return ctwing_messages(body)
        if source.kind is SourceKind.IOTDA:
            return iotda_messages(body)
        if source.kind is SourceKind.ONENET:
            return onenet_messages(_onenet_verified(source, body))
        return http_json_messages(body)

    async def _take(self, source: Source, messages: list[PlatformMessage]) -> PushAnswer:
        ingest = self._ingest()
        data = [message for message in messages if message.payload is not None]
        statuses = [message for message in messages if message.online is not None]
        if statuses:
            try:
                await self._record_statuses(source, statuses)
            except (SQLAlchemyError, OSError) as exc:
                logger.warning("push from %s: cannot record statuses: %s", source.name, exc)
                return PushAnswer(503, "registry unreachable")
        if not data:
            return PushAnswer(200)
        if ingest is None:
            return PushAnswer(503, "this process does not ingest")
        try:
            devices = await self._devices(source, {m.external_id for m in data})
        except (SQLAlchemyError, OSError) as exc:
            logger.warning("push from %s: registry unreachable: %s", source.name, exc)
            return PushAnswer(503, "registry unreachable")
        readings, letters, unknown = self._decode(source, data, devices)
        try:
            if unknown:
                await self._hold(source, unknown)
        except (SQLAlchemyError, OSError) as exc:
            logger.warning("push from %s: cannot hold unknown ids' readings: %s", source.name, exc)
            return PushAnswer(503, "registry unreachable")
        if not await self._submit(ingest, source, readings, letters):
            return PushAnswer(503, "not stored; deliver it again")
        return PushAnswer(200)

    async def _submit(
        self, ingest: Submitter, source: Source, readings: list[Reading], letters: list[DeadLetter]
    ) -> bool:
        """Whether the readings were made durable and evaluated within the deadline."""
        try:
            async with asyncio.timeout(self._deadline_s):
                await ingest.submit(readings, letters)
        except (TimeoutError, IngestUnavailable) as exc:
            logger.warning("push from %s not made durable: %s", source.name, exc or "too slow")
            return False
        self.metrics.readings.labels(source.name).inc(len(readings))
        return True

    async def _hold(self, source: Source, unknown: list[PlatformMessage]) -> None:
        now = utcnow()
        rows = [
            HeldReadingRow(
                source=source.name,
                external_id=message.external_id,
                received_at=now,
                payload=_raw(message.payload),
                is_json=isinstance(message.payload, dict),
                seq=message.seq,
                ts_ms=message.ts_ms,
            )
            for message in unknown
        ]
        async with transaction(self._sessions) as session:
            await held_readings.hold(session=session, rows=rows, now=now)

    async def replay(self, source: Source, *, limit: int = 1000) -> ReplayOutcome:
        """Held readings of ids that a device now has: decoded with its model, stored and
        evaluated, then forgotten. IngestUnavailable when they could not be made durable."""
        ingest = self._ingest()
        if ingest is None:
            raise IngestUnavailable("this process does not ingest")
        async with transaction(self._sessions, write=False) as session:
            found = await held_readings.registered(session=session, source=source.name, limit=limit)
        now_ms = self._clock_ms()
        readings: list[Reading] = []
        letters: list[DeadLetter] = []
        for row, device_id, model in found:
            payload: Payload = json.loads(row.payload) if row.is_json else row.payload
            message = PlatformMessage(row.external_id, payload, seq=row.seq, ts_ms=row.ts_ms)
            one = self._decode_one(source, _Device(device_id, model), message, now_ms)
            readings += one[0]
            letters += one[1]
        if found and not await self._submit(ingest, source, readings, letters):
            raise IngestUnavailable("the replayed readings were not made durable")
        async with transaction(self._sessions) as session:
            await held_readings.forget(session=session, ids=[row.id for row, _, _ in found])
        return ReplayOutcome(held=len(found), stored=len(readings), dead_lettered=len(letters))

    async def _record_statuses(self, source: Source, statuses: list[PlatformMessage]) -> None:
        """Online/offline on the device record; an older report than the one recorded
        (a redelivery, a late retry) changes nothing. Unknown ids are only counted."""
        now_ms = self._clock_ms()
        async with transaction(self._sessions) as session:
            for message in statuses:
                at = datetime.fromtimestamp((message.ts_ms or now_ms) / 1000, UTC)
                await session.execute(
                    update(DeviceRow)
                    .where(
                        DeviceRow.source == source.name,
                        DeviceRow.external_id == message.external_id,
                        or_(DeviceRow.status_at.is_(None), DeviceRow.status_at < at),
                    )
                    # The record's own updated_at is for registry edits, not reports.
                    .values(online=message.online, status_at=at, updated_at=DeviceRow.updated_at)
                )
        self.metrics.statuses.labels(source.name).inc(len(statuses))

    async def _devices(self, source: Source, external_ids: set[str]) -> dict[str, _Device]:
        query = select(DeviceRow.external_id, DeviceRow.device_id, DeviceRow.model).where(
            DeviceRow.source == source.name, DeviceRow.external_id.in_(sorted(external_ids))
        )
        async with transaction(self._sessions, write=False) as session:
            rows = (await session.execute(query)).all()
        return {
            external: _Device(device_id, model)
            for external, device_id, model in rows
            if external is not None
        }

    def _decode(
        self, source: Source, data: list[PlatformMessage], devices: dict[str, _Device]
    ) -> tuple[list[Reading], list[DeadLetter], list[PlatformMessage]]:
        """Readings, dead letters, and the messages of ids no device has (to hold)."""
        now_ms = self._clock_ms()
        readings: list[Reading] = []
        letters: list[DeadLetter] = []
        unknown: list[PlatformMessage] = []
        for message in data:
            device = devices.get(message.external_id)
            if device is None:
                topic = f"ingest/{source.name}/{message.external_id}"
                letters.append(_unknown_device(source, message, topic, now_ms))
                unknown.append(message)
                continue
            one = self._decode_one(source, device, message, now_ms)
            readings += one[0]
            letters += one[1]
        return readings, letters, unknown

    def _decode_one(
        self, source: Source, device: _Device, message: PlatformMessage, now_ms: int
    ) -> tuple[list[Reading], list[DeadLetter]]:
        assert message.payload is not None
        topic = f"ingest/{source.name}/{message.external_id}"
        # A device model that names no codec (registries hold sensor models as free
        # text, "SC-T3") leaves the choice to the source's model, then v1.
        model = device.model if self._codecs.knows(device.model) else source.model
        try:
            codec = self._codecs.get(model)
        except UnknownModel as exc:
            return [], [_letter(now_ms, topic, Reason.DECODE_FAILED, str(exc), message)]
        envelope = Envelope(device.device_id, now_ms, message.seq, message.ts_ms)
        decoded = decode_payload(codec, message.payload, envelope)
        letters = [
            _letter(now_ms, topic, rejection.reason, rejection.detail, message)
            for rejection in decoded.rejections
        ]
        return decoded.readings, letters


class _Refused(Exception):
    """The push's signature is wrong: 401, nothing stored."""


def _onenet_verified(source: Source, body: bytes) -> Any:
    """The `msg` of a OneNET push whose signature is the source token's."""
    try:
        members = auth.top_level_texts(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PushMalformed(f"not a JSON object: {exc}") from None
    if "enc_msg" in members:
        raise PushMalformed("enc_msg: OneNET's AES mode is not supported yet")
    if "msg" not in members:
        raise PushMalformed("msg: missing")
    raw, msg = members["msg"]
    nonce = members.get("nonce", ("", None))[1]
    signature = members.get("msg_signature", ("", None))[1]
    if not isinstance(nonce, str) or not isinstance(signature, str):
        raise _Refused("nonce or msg_signature missing")
    assert source.token is not None
    # A msg sent as a JSON string is signed as that string, an object as its JSON text.
    signed = msg if isinstance(msg, str) else raw
    if not auth.onenet_signed(source.token.get_secret_value(), nonce, signed, signature):
        raise _Refused("bad signature")
    if isinstance(msg, str):
        try:
            return json.loads(msg)
        except ValueError:
            raise PushMalformed("msg: a string that is not JSON") from None
    return msg


def _raw(payload: Payload | None) -> bytes:
    """A payload as held: a frame's own bytes, or an object's JSON text."""
    if isinstance(payload, dict):
        return json.dumps(payload, ensure_ascii=False).encode()
    return payload or b""


def _payload_bytes(payload: Payload) -> bytes:
    if isinstance(payload, dict):
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        text = ""
    # Text stays text; a binary frame is kept as hex, as `smartcover codecs test` takes it.
    return payload if text.isprintable() and text else payload.hex().upper().encode()


def _letter(
    now_ms: int, topic: str, reason: str, detail: str, message: PlatformMessage
) -> DeadLetter:
    assert message.payload is not None
    return DeadLetter.of(
        at_ms=now_ms,
        topic=topic,
        reason=reason,
        detail=detail,
        payload=_payload_bytes(message.payload),
    )


def _unknown_device(
    source: Source, message: PlatformMessage, topic: str, now_ms: int
) -> DeadLetter:
    # The payload (hex for a binary frame) and the envelope's seq and time: enough to
    # decode it again once the device is registered (`smartcover codecs test`).
    detail = (
        f"no device has {source.name} id {message.external_id!r}"
        f" (seq {message.seq}, ts {message.ts_ms})"
    )
    return _letter(now_ms, topic, Reason.UNKNOWN_DEVICE, detail, message)
