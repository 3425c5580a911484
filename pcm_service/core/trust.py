"""What the service believes of a worker: glidein hosts belong to third parties, so a worker's
word is checked against what the service can see (the address its requests come from, the
leases and contexts the service itself gave it). See README "Security"."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from pcm_service.core.errors import Refused
from pcm_service.protocol import ErrorCode

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class WorkerTrust:
    # a worker's blob server must be on the address its requests come from, or in one of these
    # (`pcm serve --peer-network CIDR`: a site whose workers reach the service through NAT)
    peer_networks: tuple[Network, ...] = ()
    max_workers_per_glidein: int = 16  # live registrations one glidein may hold at once
    max_live_workers: int = 100_000  # live registrations in all
    # spot-check audits (core/audit.py): this share of finished batches is run again by another
    # host; a host with audit_bar_after disagreements is barred; an audit agrees when this share
    # of its greedy rows have the same text (below 1.0 where GPUs of different kinds may differ)
    audit_fraction: float = 0.0
    audit_bar_after: int = 1
    audit_agreement: float = 1.0


def address(host: Optional[str]) -> Optional[Address]:
    """An IP address (IPv4-mapped IPv6 as IPv4), or None for a name or nothing."""
    if not host:
        return None
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def audit_address(client_host: Optional[str]) -> Optional[str]:
    """The address that names a worker's host for audits: None on loopback or in-process (the
    trusted submit host, where a worker's declared host name is believed instead)."""
    ip = address(client_host)
    return None if ip is None or ip.is_loopback else str(ip)


def check_blob_url(url: str, client_host: Optional[str], trust: WorkerTrust, field: str = "blob_url") -> None:
    """Refuse a blob server other workers would be sent to that is not the worker's own: on
    another machine (or the fetchers' loopback) it would make PCM a request forger. The URL
    names an IP address, that address is the one the service sees the worker at (or in a
    configured network), and it has no credentials, query or fragment. ``client_host`` None:
    an in-process caller (the service's own executor), believed."""
    if client_host is None:
        return
    parts = urlsplit(url)
    ip = address(parts.hostname)
    if parts.username or parts.password or parts.query or parts.fragment or ip is None:
        raise Refused(ErrorCode.PEER_ADDRESS, f"{field} must be http(s)://IP:PORT/PATH with the worker's own IP"
                                              " address, no user, query or fragment", field)
    if ip == address(client_host) or any(ip in net for net in trust.peer_networks):
        return
    raise Refused(ErrorCode.PEER_ADDRESS, f"{field} names {ip}, but this worker's requests come from"
                                          f" {client_host}: a worker serves chunks only from its own address"
                                          " (or start the service with --peer-network CIDR)", field)
