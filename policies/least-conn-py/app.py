"""least-conn-py: the least-conn policy written in Python, to show a policy
in Python and to measure it beside the Rust one (`make bench-pick`).

Same algorithm as policies/least-conn: fewest calls in flight per unit of
weight; every candidate compared up to SCAN_ALL, the power of two choices
above that.

Built by `make policies` with componentize-py (from PyPI, in .venv): it
bundles a Python interpreter into the component, about 18 MB, so it is
published through `weir policy publish` (chunked) rather than one etcd value,
and needs `[policy] memory_mib` of 32 or more. See docs/writing-a-policy.md.
"""

import wit_world
from wit_world.imports import backends
from componentize_py_types import Err

# Up to this many candidates, all are compared.
SCAN_ALL = 4


def lighter(a: backends.Load, b: backends.Load) -> bool:
    """Calls in flight per unit of weight, compared without division. Idle
    candidates tie, and ties keep the first (randomly placed) one."""
    return a.active_requests * max(b.weight, 1) <= b.active_requests * max(a.weight, 1)


class WitWorld(wit_world.WitWorld):
    def pick(self, count: int, generation: int, random: int) -> int:
        if count == 0:
            raise Err("no candidates")
        if count <= SCAN_ALL:
            # Start at a random candidate so ties spread instead of piling on 0.
            start = random % count
            best, best_load = start, backends.load_of(start)
            for step in range(1, count):
                i = (start + step) % count
                load = backends.load_of(i)
                if not lighter(best_load, load):
                    best, best_load = i, load
            return best
        a = random % count
        # A second, different candidate from the high bits.
        b = (a + 1 + ((random >> 32) % (count - 1))) % count
        return a if lighter(backends.load_of(a), backends.load_of(b)) else b
