import ipaddress

import pytest

from pyheadscale.state.ipam import IPAllocationError, IPAllocator


def test_sequential_skips_network_and_continues() -> None:
    a = IPAllocator("100.64.0.0/10", "fd7a:115c:a1e0::/48")
    v4, v6 = a.allocate()
    assert v4 == ipaddress.ip_address("100.64.0.1")
    assert v6 == ipaddress.ip_address("fd7a:115c:a1e0::1")
    assert a.allocate()[0] == ipaddress.ip_address("100.64.0.2")


def test_never_hands_out_used() -> None:
    used = [ipaddress.ip_address("100.64.0.1"), ipaddress.ip_address("100.64.0.2")]
    a = IPAllocator("100.64.0.0/10", None, used=used)
    assert a.allocate() == (ipaddress.ip_address("100.64.0.3"), None)


def test_exhaustion_small_prefix() -> None:
    a = IPAllocator("10.0.0.0/30", None)  # .0 network, .3 broadcast -> two usable
    got = {a.allocate()[0], a.allocate()[0]}
    assert got == {ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2")}
    with pytest.raises(IPAllocationError):
        a.allocate()
    a.release(ipaddress.ip_address("10.0.0.1"))
    assert a.allocate()[0] == ipaddress.ip_address("10.0.0.1")


def test_v6_failure_releases_v4() -> None:
    a = IPAllocator("10.0.0.0/29", "fd00::/127")  # v6: both addresses reserved
    with pytest.raises(IPAllocationError):
        a.allocate()
    assert a.free_count()[0] == 6


def test_reserved_addresses_skipped() -> None:
    a = IPAllocator("100.100.100.96/29", None, used=[])
    out = set()
    for _ in range(5):
        out.add(a.allocate()[0])
    assert ipaddress.ip_address("100.100.100.100") not in out
    with pytest.raises(IPAllocationError):
        a.allocate()
    chrome = IPAllocator("100.115.0.0/16", None)
    assert not chrome.reserve(ipaddress.ip_address("100.115.92.5"))
    b = IPAllocator("100.115.92.0/22", None, strategy="random")
    for _ in range(300):
        v4 = b.allocate()[0]
        assert v4 not in ipaddress.ip_network("100.115.92.0/23")
    six = IPAllocator(None, "fd7a:115c:a1e0::50/124")
    got6 = [six.allocate()[1] for _ in range(13)]
    assert ipaddress.ip_address("fd7a:115c:a1e0::53") not in got6
    with pytest.raises(IPAllocationError):
        six.allocate()


def test_random_stays_in_prefix_and_unique() -> None:
    a = IPAllocator("10.1.0.0/24", None, strategy="random")
    seen = {a.allocate()[0] for _ in range(254)}
    assert len(seen) == 254
    assert all(x in ipaddress.ip_network("10.1.0.0/24") for x in seen)
    with pytest.raises(IPAllocationError):
        a.allocate()


def test_large_prefix_is_fast() -> None:
    a = IPAllocator("100.64.0.0/10", None)
    for _ in range(20000):
        a.allocate()
    assert a.free_count()[0] == (1 << 22) - 2 - 512 - 1 - 20000


def test_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        IPAllocator(None, None)
    with pytest.raises(ValueError):
        IPAllocator("10.0.0.0/8", None, strategy="fancy")
