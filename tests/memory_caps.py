"""A host address-space cap shared by the tests that prove an op never allocates what it must not
(an S x S attention tensor, an int32-overflowing router output)."""

from __future__ import annotations

import contextlib
import resource
import sys


@contextlib.contextmanager
def host_allocation_cap(extra_bytes: int):
    """Caps this process's address space at its current size + extra_bytes (Linux), so an op that
    allocates too much fails to allocate instead of filling the machine's memory."""
    if not sys.platform.startswith("linux"):
        yield
        return
    with open("/proc/self/status") as status:
        vm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm_kb * 1024 + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
