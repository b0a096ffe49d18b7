"""blockd.secondary_lists.apply_result: a transfer's records into the zone a list serves (pure)."""

from __future__ import annotations

import pytest

from blockd import rpz
from blockd.policy import PolicyError
from blockd.secondary_lists import apply_result
from blockd.xfr import FullZone, Incremental

ORIGIN = "rpz.example"
NX = b"\x00"  # CNAME .
SOA_RDATA = b"\x02ns\x07example\x00\x01h\x07example\x00" + bytes.fromhex("00000002 00000e10 00000258 00015180 0000003c")


def soa(serial: int) -> tuple[str, int, int, int, bytes]:
    return (ORIGIN, 6, 1, 300, SOA_RDATA[:-20] + serial.to_bytes(4, "big") + SOA_RDATA[-16:])


def trigger(name: str) -> tuple[str, int, int, int, bytes]:
    return (f"{name}.{ORIGIN}", 5, 1, 300, NX)


def full(count: int, serial: int = 1) -> FullZone:
    return FullZone(soa(serial), [trigger(f"n{index}.example") for index in range(count)])


def test_a_full_zone_builds_the_served_zone_and_empties_the_record_list() -> None:
    result = full(50_000)
    zone = apply_result(None, ORIGIN, result, allow_shrink=False)
    assert len(zone) == 50_000 and zone.soa.serial == 1
    assert zone.exact["n49999.example"] is rpz.NXDOMAIN_RULE
    assert result.records == []  # consumed as it went in


def test_an_incremental_transfer_applies_to_a_copy() -> None:
    old = apply_result(None, ORIGIN, full(10), allow_shrink=False)
    change = Incremental(1, 2, [([trigger("n0.example")], [trigger("new.example")])], soa(2))
    new = apply_result(old, ORIGIN, change, allow_shrink=False)
    assert "new.example" in new.exact and "n0.example" not in new.exact and new.soa.serial == 2
    assert "n0.example" in old.exact and old.soa.serial == 1  # the serving copy is untouched


def test_an_ixfr_deleting_more_than_half_needs_allow_shrink() -> None:
    old = apply_result(None, ORIGIN, full(10), allow_shrink=False)
    deleted = [trigger(f"n{index}.example") for index in range(6)]
    change = Incremental(1, 2, [(deleted, [trigger(f"m{index}.example") for index in range(6)])], soa(2))
    with pytest.raises(PolicyError, match="deletes 6 of 10 triggers; refusing it"):
        apply_result(old, ORIGIN, change, allow_shrink=False)
    assert len(apply_result(old, ORIGIN, change, allow_shrink=True)) == 10


def test_an_ixfr_without_a_copy_and_a_deletion_of_what_is_not_there_are_refused() -> None:
    change = Incremental(1, 2, [([trigger("n0.example")], [])], soa(2))
    with pytest.raises(PolicyError, match="without a copy"):
        apply_result(None, ORIGIN, change, allow_shrink=False)
    old = apply_result(None, ORIGIN, full(3), allow_shrink=False)
    missing = Incremental(1, 2, [([trigger("absent.example")], [])], soa(2))
    with pytest.raises(PolicyError, match="IXFR 1 -> 2"):
        apply_result(old, ORIGIN, missing, allow_shrink=False)


def test_records_outside_the_zone_are_refused_with_the_zone_named() -> None:
    bad = FullZone(soa(1), [("tiktok.com.other.example", 5, 1, 300, NX)])
    with pytest.raises(PolicyError, match=f"zone {ORIGIN}: "):
        apply_result(None, ORIGIN, bad, allow_shrink=False)
