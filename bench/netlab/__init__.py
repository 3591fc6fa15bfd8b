"""netlab: emulated hosts on home-internet links (namespaces, tc shaping, user-space delay, NAT).

    from bench.netlab import Lab
    with Lab() as lab:
        a = lab.add_host("a", "home")
        b = lab.add_host("b", "home-asym", nat=True)
        b.popen(["python3", "-m", "http.server"])
        print(lab.counters(a))

See lab.py for the topology and profiles.py for what the figures mean.
"""

from .cleanup import cleanup_stale
from .commands import NetlabError
from .delay_router import DelayStats
from .lab import Host, Lab, LabConfig, LinkCounters
from .preflight import can_make_namespaces
from .profiles import PROFILES, Profile, get_profile

__all__ = ["Host", "Lab", "LabConfig", "LinkCounters", "DelayStats", "NetlabError", "PROFILES", "Profile",
           "get_profile", "can_make_namespaces", "cleanup_stale"]
