"""A peer on another host reads the coordinator's loopback and wildcard addresses as the host it dialled."""

from __future__ import annotations

from proto.addresses import is_local, reachable_maddrs, reachable_url

ID = "12D3KooWFt9CUm9xuGPydH53RKqBhSW95JQ9GfsdNmzngjCuwsxK"


def test_local_addresses():
    for host in ("127.0.0.1", "127.8.9.1", "0.0.0.0", "::1", "[::]", "localhost", "LOCALHOST", ""):
        assert is_local(host), host
    for host in ("10.0.0.7", "192.0.2.2", "coord.example.org", "2001:db8::1"):
        assert not is_local(host), host


def test_checkpoint_url_points_at_the_dialled_host():
    url = "http://127.0.0.1:8080/checkpoints/round-000010/"
    assert reachable_url(url, "10.0.0.7") == "http://10.0.0.7:8080/checkpoints/round-000010/"
    assert reachable_url("http://0.0.0.0:8080/x", "coord.example.org") == "http://coord.example.org:8080/x"
    assert reachable_url(url, "2001:db8::1") == "http://[2001:db8::1]:8080/checkpoints/round-000010/"
    assert reachable_url(url, "127.0.0.1") == url  # same machine: as announced
    assert reachable_url("http://203.0.113.7:8080/x", "10.0.0.7") == "http://203.0.113.7:8080/x"  # --announce-host wins
    assert reachable_url("", "10.0.0.7") == ""


def test_dht_addresses_put_the_dialled_host_first():
    maddrs = [f"/ip4/127.0.0.1/tcp/31337/p2p/{ID}", f"/ip4/192.0.2.2/tcp/31337/p2p/{ID}"]
    assert reachable_maddrs(maddrs, "10.0.0.7") == [f"/ip4/10.0.0.7/tcp/31337/p2p/{ID}", f"/ip4/192.0.2.2/tcp/31337/p2p/{ID}"]
    assert reachable_maddrs(maddrs, "127.0.0.1") == maddrs
    # The dialled address is already announced: once.
    assert reachable_maddrs(maddrs, "192.0.2.2") == [f"/ip4/192.0.2.2/tcp/31337/p2p/{ID}"]
    # A name that does not resolve here stays a name libp2p resolves itself.
    assert reachable_maddrs(maddrs[:1], "no-such-host.invalid") == [f"/dns4/no-such-host.invalid/tcp/31337/p2p/{ID}"]
