"""Groups defined by interfaces and VLAN ids: their connected subnets, kept current.

Config: [groups.X] interfaces = ["eth0.120"], vlans = [120].  InterfaceNetworks re-reads the
connected subnets of those interfaces on netlink address/link changes and on a timer (in the
netlink worker thread, through the adapter), and reports the mapping when it changed; the
daemon turns it into a new policy snapshot (Policy.with_interface_networks).
Metrics (set by the daemon): blockd_group_interface_networks{group}.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from blockd.egress import NetlinkChange
from blockd.netlink_services import Coalescer, EgressAdapter, Runner
from blockd.prefix_table import IPNetwork

_log = Logger()


@dataclass(frozen=True)
class InterfaceSelector:
    """Which interfaces define a group: by name, and every interface on one of the VLAN ids."""

    names: tuple[str, ...] = ()
    vlans: tuple[int, ...] = ()


InterfaceMap = Mapping[str, Mapping[str, tuple[IPNetwork, ...]]]  # key -> interface -> subnets


def networks_of(interfaces: Mapping[str, tuple[IPNetwork, ...]]) -> tuple[IPNetwork, ...]:
    """Every subnet of a key's interfaces, each once, in a stable order."""
    unique = {n for networks in interfaces.values() for n in networks}
    return tuple(sorted(unique, key=lambda n: (n.version, int(n.network_address), n.prefixlen)))


class InterfaceNetworks(service.Service):
    """Reports the subnets of selected interfaces whenever they change.

    selectors maps a key (a group name) to the interfaces defining it; on_change receives
    {key: {interface: subnets}} for every key, and is called at start-up and after every
    change.  A named interface that does not exist is a warning, once; it counts as soon as it
    appears.  A failed read keeps the previous mapping.
    """

    name = "interface-networks"  # type: ignore[assignment]  # Twisted: Service.name = None, unannotated

    def __init__(
        self,
        clock: Any,
        adapter: EgressAdapter,
        runner: Runner,
        selectors: Mapping[str, InterfaceSelector],
        on_change: Callable[[InterfaceMap], None],
        interval: float = 30.0,
    ):
        self.clock = clock
        self.adapter = adapter
        self.runner = runner
        self.selectors = dict(selectors)
        self.on_change = on_change
        self.interval = interval
        self.current: InterfaceMap | None = None
        self.ready: defer.Deferred[None] = defer.Deferred()
        self._missing: set[tuple[str, str]] = set()
        self._refresher = Coalescer(self._refresh)
        self._refresher.enabled = False
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        super().startService()
        self._refresher.enabled = True
        # Fires after the first read: the daemon should classify clients only from then on.
        self.ready = self.request_refresh()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802 (Twisted API)
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._refresher.enabled = False
        return self._refresher.when_idle()

    def request_refresh(self) -> defer.Deferred[None]:
        return self._refresher.request()

    def netlink_event(self, change: NetlinkChange) -> None:
        if change in (NetlinkChange.ADDRESS, NetlinkChange.LINK):
            self.request_refresh()

    def _tick(self) -> None:
        try:
            self.request_refresh()
        except Exception:  # noqa: BLE001 (keep the safety-net timer alive)
            _log.failure("interfaces: periodic re-read could not be requested")

    def _refresh(self) -> defer.Deferred[None]:
        reading = self.runner(self._read_in_worker, dict(self.selectors))
        reading.addCallbacks(self._read, self._read_failed)
        return reading

    def _read_in_worker(self, selectors: Mapping[str, InterfaceSelector]) -> dict[str, dict[str, tuple]]:
        return {
            key: self.adapter.interface_networks(selector.names, selector.vlans) for key, selector in selectors.items()
        }

    def _read(self, mapping: dict[str, dict[str, tuple[IPNetwork, ...]]]) -> None:
        for key, selector in self.selectors.items():
            for name in selector.names:
                if name not in mapping.get(key, {}):
                    if (key, name) not in self._missing:
                        self._missing.add((key, name))
                        _log.warn(
                            "interfaces: {interface} (group {group}) does not exist; "
                            "its subnets join the group when it appears",
                            interface=name,
                            group=key,
                        )
                elif (key, name) in self._missing:
                    self._missing.discard((key, name))
                    _log.info("interfaces: {interface} (group {group}) appeared", interface=name, group=key)
        if mapping == self.current:
            return
        self.current = mapping
        for key, interfaces in sorted(mapping.items()):
            networks = ", ".join(str(n) for n in networks_of(interfaces)) or "none"
            _log.info("interfaces: group {group} subnets: {networks}", group=key, networks=networks)
        self.on_change(mapping)

    def _read_failed(self, failure: Failure) -> None:
        _log.failure("interfaces: could not read interface addresses (keeping the last ones)", failure)
