"""glibc heap tuning (pyheadscale/memory.py), observed through glibc's own mallinfo2().

Each case runs in a fresh interpreter: mallopt settings are process-wide and must be made
before the allocations they govern. hblks is the number of blocks glibc gave their own
mapping; a 300 KiB block (a socket read's buffer is 256 KiB) gets one at glibc's default
128 KiB threshold and none once the server raised it.
"""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import ctypes, sys
from pyheadscale.memory import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
assert tune_malloc() is True
before = libc.mallinfo2().hblks
block = bytearray(300 * 1024)
print(libc.mallinfo2().hblks - before)
"""


def _mapped_blocks(env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **env}, check=True)
    return int(out.stdout.strip())


def test_large_reads_come_from_the_heap() -> None:
    assert _mapped_blocks({}) == 0


def test_the_operators_environment_wins() -> None:
    assert _mapped_blocks({"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}) == 1
    assert _mapped_blocks({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}) == 1


def test_a_setting_glibc_refuses_is_reported() -> None:
    """mallopt returns 0 for a value out of range; tune_malloc then says the heap was not
    tuned as asked. glibc 2.36 accepts any value of the three parameters the server sets,
    so the probe puts M_MXFAST (1, at most 160 bytes) in place of the trim threshold's
    number: glibc itself refuses 4 MiB for it."""
    probe = ("import pyheadscale.memory as m\n"
             "m._M_TRIM_THRESHOLD = 1\n"
             "print(m.tune_malloc())\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "False"
