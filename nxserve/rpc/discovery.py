"""Where the decode replicas are: a static list, DNS names that follow a Deployment as it scales
and rolls, or both.

`--decode` takes comma-separated entries in gRPC's naming syntax:

- `HOST:PORT`: one replica, for good.
- `dns:///NAME:PORT`: every address NAME resolves to, through the system resolver (the pod's
  /etc/resolv.conf and its search domains, /etc/hosts): in Kubernetes a headless Service, whose
  name resolves to the ready pods behind it.
- `dns://SERVER[:PORT]/NAME:PORT`: the same, asking the DNS server SERVER (port 53 by default)
  directly, as gRPC's c-ares resolver does with an authority.

The router resolves names every few seconds and when a replica fails (`DecodeRouter`). A name that
does not exist or has no addresses (a headless Service with no ready pod) resolves to none; a
resolver that fails or times out leaves the known addresses as they were.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass


class DiscoveryError(Exception):
    """The resolver failed (timed out, refused, no server): the known addresses stay."""


@dataclass(frozen=True)
class DnsName:
    """A name whose addresses are decode replicas, all on `port`."""

    name: str
    port: int
    server: tuple[str, int] | None = None
    """The DNS server to ask (address, port); None: the system resolver."""

    def __str__(self) -> str:
        authority = "" if self.server is None else f"{_host_port(*self.server)}"
        return f"dns://{authority}/{self.name}:{self.port}"


def parse_decode(value: str) -> tuple[list[str], list[DnsName]]:
    """`--decode`'s entries split into static HOST:PORT targets and DNS names (ValueError, naming
    the entry, for anything else)."""
    targets: list[str] = []
    names: list[DnsName] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        if entry.startswith("dns:"):
            names.append(_parse_dns(entry))
        else:
            host, port = _split_host_port(entry, what="decode replica")
            targets.append(_host_port(host, port))
    if not targets and not names:
        raise ValueError("no decode replicas given: pass --decode HOST:PORT[,HOST:PORT...] or dns:///NAME:PORT")
    return targets, names


def _parse_dns(entry: str) -> DnsName:
    rest = entry.removeprefix("dns:")
    if not rest.startswith("//"):
        raise ValueError(f"{entry!r} is not a DNS target: write dns:///NAME:PORT or dns://SERVER[:PORT]/NAME:PORT")
    authority, slash, endpoint = rest[2:].partition("/")
    if not slash or not endpoint:
        raise ValueError(f"{entry!r} names no host: write dns:///NAME:PORT or dns://SERVER[:PORT]/NAME:PORT")
    name, port = _split_host_port(endpoint, what=f"{entry!r}")
    server = None
    if authority:
        if authority.startswith("["):  # [v6] or [v6]:port
            host, _, rest = authority[1:].partition("]")
            server_port = rest.removeprefix(":") or "53"
        elif authority.count(":") == 1:
            host, server_port = authority.split(":")
        else:
            host, server_port = authority, "53"
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{entry!r}: the DNS server must be an IP address, got {host!r}") from None
        server = (host, _port(server_port, what=f"{entry!r}'s DNS server"))
    return DnsName(name=name, port=port, server=server)


def _split_host_port(value: str, *, what: str) -> tuple[str, int]:
    if value.startswith("["):  # [v6]:port
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"{what} {value!r} is invalid: write [ADDRESS]:PORT for IPv6")
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{what} {value!r} is invalid: write HOST:PORT")
    return host, _port(port, what=what)


def _port(value: str, *, what: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"{what}: port {value!r} is invalid: allowed 1..65535")
    return int(value)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(name: DnsName, *, timeout_s: float = 2.0) -> set[str]:
    """The HOST:PORT targets `name` resolves to now (empty: the name is gone or has no addresses);
    DiscoveryError when the resolver itself failed."""
    if name.server is None:
        return await _system(name, timeout_s)
    return await _ask(name, timeout_s)


async def _system(name: DnsName, timeout_s: float) -> set[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(name.name, name.port, type=socket.SOCK_STREAM), timeout_s)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return set()
        raise DiscoveryError(f"cannot resolve {name.name}: {exc}") from exc
    except TimeoutError:
        raise DiscoveryError(f"resolving {name.name} took over {timeout_s:g}s") from None
    return {_host_port(str(info[4][0]), name.port) for info in infos}


async def _ask(name: DnsName, timeout_s: float) -> set[str]:
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    assert name.server is not None
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [name.server[0]]
    resolver.port = name.server[1]
    resolver.lifetime = timeout_s
    found: set[str] = set()
    for kind in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name.name, kind, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException as exc:
            raise DiscoveryError(f"cannot resolve {name.name} ({kind}) at {name.server[0]}:{name.server[1]}: {exc}") from exc
        found |= {_host_port(record.to_text(), name.port) for record in answer}
    return found
