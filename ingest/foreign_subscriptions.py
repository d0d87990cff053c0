"""Subscriptions in the service's persistent session that the service did not make.

The ingest keeps one persistent MQTT session under a fixed client id, so a subscription
added to that session by anyone else (a leaked service password, a debugging client
started with the service's id, an older release or another share group) stays there and
makes the broker deliver every matching reading twice. MQTT cannot list a session's
subscriptions, but it can tell us two things: a message that does not carry the
Subscription Identifier we subscribed with came through someone else's subscription, and
an MQTT 5 UNSUBACK says per filter whether that subscription existed (0x00) or not
(0x11). So on every connect the service unsubscribes the filters that could cover its
topics in general, and when a foreign message arrives, those that could have delivered
its topic; the ones that existed are logged and counted.

A filter used with another share group (`$share/other/...`) cannot be guessed; its copies
still come marked as not ours, and are counted. Nothing is dropped because of this: a
reading delivered twice is stored and evaluated idempotently.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from core.contract import TELEMETRY_FILTER
from ingest import mqtt
from ingest.errors import MqttError

logger = logging.getLogger(__name__)

# The identifier the service subscribes with. Never change it: messages already queued in
# a session carry the identifier of the subscription that queued them.
SERVICE_SUBSCRIPTION_ID = 1
# Topics of the device side of the contract, as filters with the device as a wildcard.
_DEVICE_TOPICS = ("covers/+/telemetry", "covers/+/status")
# Distinct foreign topics looked into per connection; a flood of them costs no more.
_MAX_TOPICS = 10_000
# UNSUBACK reason code of a filter that was subscribed (MQTT 5 §3.11.2.2).
_REMOVED = 0x00


def covering_filters(topic: str) -> list[str]:
    """Every filter that matches `topic`: each level literal or `+`, optionally cut by `#`.

    "covers/D/telemetry" gives "covers/D/telemetry", "covers/+/telemetry", "+/+/+", "#",
    "covers/#", "+/D/#" and so on (23 for three levels).
    """
    levels = topic.split("/")
    found: list[str] = []
    for depth in range(len(levels) + 1):
        for prefix in itertools.product(*[(level, "+") for level in levels[:depth]]):
            found.append("/".join([*prefix, "#"]))
    found += ["/".join(choice) for choice in itertools.product(*[(lv, "+") for lv in levels])]
    return list(dict.fromkeys(found))


class ForeignSubscriptions:
    """Finds and removes the subscriptions of our session that we did not make."""

    def __init__(self, own_filters: list[str], share_group: str, on_removed: Callable[[], None]):
        self._own = set(own_filters)
        self._share_group = share_group
        self._on_removed = on_removed
        self._looked_into: set[str] = set()
        self._pending: asyncio.Task[None] | None = None

    def _candidates(self, topic: str) -> list[str]:
        filters = covering_filters(topic)
        if self._share_group:
            filters += [f"$share/{self._share_group}/{f}" for f in filters]
        return [f for f in filters if f not in self._own]

    async def on_connect(self, connection: mqtt.MqttConnection) -> None:
        """Removes foreign filters that would cover any device's topics."""
        self._looked_into.clear()
        candidates: list[str] = []
        for topic in _DEVICE_TOPICS:
            candidates += self._candidates(topic)
        await self._remove(connection, list(dict.fromkeys(candidates)))

    def noticed(self, connection: mqtt.MqttConnection, topic: str) -> None:
        """A message without our identifier arrived on `topic` (the hot path: no waiting)."""
        if topic in self._looked_into or len(self._looked_into) >= _MAX_TOPICS:
            return
        if self._pending is not None and not self._pending.done():
            return  # one look at a time; a later foreign message brings us back
        self._looked_into.add(topic)
        self._pending = asyncio.create_task(
            self._remove(connection, self._candidates(topic)), name="mqtt-foreign-subscriptions"
        )

    async def _remove(self, connection: mqtt.MqttConnection, filters: list[str]) -> None:
        try:
            codes = await connection.unsubscribe(filters)
        except MqttError as exc:  # the connection went; the next connect looks again
            logger.info("could not look for foreign subscriptions: %s", exc)
            return
        for topic_filter, code in zip(filters, codes, strict=False):
            if code == _REMOVED:
                self._on_removed()
                logger.warning(
                    "removed subscription %r from the service's MQTT session: the service "
                    "did not make it (someone connected with its client id)",
                    topic_filter,
                )


def own_filter(share_group: str) -> str:
    """The telemetry filter the service subscribes to."""
    return f"$share/{share_group}/{TELEMETRY_FILTER}" if share_group else TELEMETRY_FILTER
