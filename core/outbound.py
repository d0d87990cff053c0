"""Outgoing connections: which addresses the service may reach, and an HTTP transport that
reaches no other.

A URL that a user gives us (a unit's webhook, a crew's chat robot) must not become a way
into the network the service runs in: the cloud's metadata service (169.254.169.254), the
database on 127.0.0.1:5432, an intranet host. Non-public addresses are therefore refused
unless the operator allows their network (SMARTCOVER_OUTBOUND_ALLOW_NETS). The check runs
twice: when the URL is written (an IP literal or `localhost`, which need no DNS), and when
it is used, on every address its host resolves to. The connection then goes to an address
that was checked, never to the result of a second lookup (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
import httpcore
import httpx

if TYPE_CHECKING:
    from core.settings import Settings

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

ALLOW_SETTING = "SMARTCOVER_OUTBOUND_ALLOW_NETS"
# Names that mean this machine without asking DNS (RFC 6761 reserves `.localhost`).
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_LOOPBACKS = (IPv4Address("127.0.0.1"), IPv6Address("::1"))
# Shared address space of carrier-grade NAT (RFC 6598): not the public internet.
_CGNAT = IPv4Network("100.64.0.0/10")
# IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64, RFC 6052): a
# gateway turns 64:ff9b::a9fe:a9fe into 169.254.169.254.
_NAT64 = IPv6Network("64:ff9b::/96")
# Numeric host spellings that C's inet_aton reads as IPv4 (127.1, 0x7f.1, 2130706433) and
# getaddrinfo accepts without DNS; ipaddress does not parse them.
_LEGACY_IPV4 = re.compile(r"^(?:0x[0-9a-f]+|[0-9]+)(?:\.(?:0x[0-9a-f]+|[0-9]+)){0,3}$")
# httpx's own pool limits (httpx._config.DEFAULT_LIMITS).
_POOL_CONNECTIONS = 100
_POOL_KEEPALIVE = 20


class OutboundRefused(Exception):
    """A connection to an address the policy does not allow; the text says which and why."""


def embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def address_kind(address: IPAddress) -> str | None:
    """Why `address` is not on the public internet ("loopback", "private", …), or None."""
    if isinstance(address, IPv6Address) and (inner := embedded_ipv4(address)) is not None:
        return address_kind(inner)
    kinds = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("carrier-grade NAT", address in _CGNAT),
        ("reserved", address.is_reserved),  # before private, which includes 240.0.0.0/4
        ("private", address.is_private),
    )
    for kind, matches in kinds:
        if matches:
            return kind
    # Anything else IANA does not list as globally reachable (documentation ranges, …).
    return None if address.is_global else "non-public"


def parse_host(host: str) -> IPAddress | None:
    """The address a URL's host spells out, without DNS; None for a name."""
    text = host.strip("[]").rstrip(".").lower()
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if _LEGACY_IPV4.match(text):
        try:
            return IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def is_local_name(host: str) -> bool:
    name = host.rstrip(".").lower()
    return name in _LOCAL_NAMES or name.endswith(".localhost")


@dataclass(frozen=True, slots=True)
class OutboundPolicy:
    """Non-public addresses are refused, but for those in `allow_nets` (the operator's)."""

    allow_nets: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboundPolicy:
        return cls(settings.outbound_allow_nets)

    @classmethod
    def allowing(cls, *nets: str) -> OutboundPolicy:
        """A policy allowing these CIDRs, e.g. `allowing("127.0.0.0/8")` for a local test."""
        return cls(tuple(ipaddress.ip_network(net) for net in nets))

    def allows(self, address: IPAddress) -> bool:
        if address_kind(address) is None:
            return True
        # ::ffff:10.0.0.1 is 10.0.0.1 on the wire, so 10.0.0.0/8 allows it too.
        inner = embedded_ipv4(address) if isinstance(address, IPv6Address) else None
        return any(address in net or (inner or address) in net for net in self.allow_nets)

    def address_problem(self, address: IPAddress, *, host: str | None = None) -> str | None:
        """Why a connection to `address` (of `host`) is refused, naming the setting that
        would allow it; None when it is allowed."""
        if self.allows(address):
            return None
        kind = f"a {address_kind(address)} address"
        subject = f"{host} resolves to {address}, {kind}" if host else f"{address} is {kind}"
        return (
            f"{subject}: outgoing connections to loopback, link-local and private networks"
            f" are refused unless {ALLOW_SETTING} includes it"
        )

    def host_problem(self, host: str) -> str | None:
        """What can be said of a host without DNS: a refused IP literal or local name."""
        address = parse_host(host)
        if address is not None:
            return self.address_problem(address)
        if is_local_name(host) and not any(self.allows(a) for a in _LOOPBACKS):
            return (
                f"{host} names this machine (loopback): outgoing connections to it are"
                f" refused unless {ALLOW_SETTING} includes 127.0.0.1 or ::1"
            )
        return None

    def url_problem(self, url: str) -> str | None:
        """The write-time check of a URL; names that need DNS are checked when used."""
        try:
            host = urlsplit(url).hostname
        except ValueError as exc:
            return f"not a usable URL: {exc}"
        return self.host_problem(host) if host else "the URL has no host"

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Every address of `host`, each checked; refused if any of them is not allowed.

        Any, not all: a name answering with one public and one internal address would
        otherwise reach the internal one whenever the public one fails.
        """
        problem = self.host_problem(host)
        if problem is not None:
            raise OutboundRefused(problem)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror}") from exc
        addresses = list(dict.fromkeys(_address_of(str(info[4][0])) for info in infos))
        for address in addresses:
            problem = self.address_problem(address, host=host)
            if problem is not None:
                raise OutboundRefused(problem)
        return addresses


def _address_of(text: str) -> IPAddress:
    return ipaddress.ip_address(text.partition("%")[0])  # without an IPv6 scope id


# -- the HTTP transport ------------------------------------------------------------------


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's AnyIO backend, connecting only to addresses the policy allows.

    httpcore hands `connect_tcp` the URL's host; this resolves it once, checks every
    address, and connects to a checked address. TLS (SNI, certificate) and the Host
    header still use the name: httpcore takes those from the URL, not from here.
    """

    def __init__(self, policy: OutboundPolicy) -> None:
        self._policy = policy
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 -- httpcore's signature
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                addresses = await self._policy.resolve(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        error: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                return await self._backend.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                error = exc  # the name's next address, as a resolver's caller would
        assert error is not None  # getaddrinfo answers at least one address or raises
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 -- httpcore's signature
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise OutboundRefused("outgoing connections go over TCP only, not Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport on a `GuardedBackend`, without proxies from the environment.

    trust_env is off: an HTTP(S)_PROXY would make the proxy, not us, resolve and connect,
    and the check would be on the proxy's address only.
    """

    def __init__(self, policy: OutboundPolicy) -> None:
        super().__init__(trust_env=False)
        # httpx 0.28 takes no network backend, so its pool is replaced by one built the
        # way httpx builds it, on ours. The pool is not open yet: nothing to close.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=_POOL_CONNECTIONS,
            max_keepalive_connections=_POOL_KEEPALIVE,
            network_backend=GuardedBackend(policy),
        )


def guarded_client(policy: OutboundPolicy, *, timeout_s: float) -> httpx.AsyncClient:
    """An HTTP client that reaches only what `policy` allows, and follows no redirect."""
    return httpx.AsyncClient(
        transport=GuardedTransport(policy),
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        trust_env=False,
    )
