"""Let `headscale serve` look like Headscale's process to tools that find it by name.

Headplane (the web UI) finds the server to send SIGHUP to by scanning /proc: a process whose
`comm` is `headscale` and whose `cmdline`, split on NUL bytes, has `serve` as its second
word. A Python server is `python3 /…/bin/headscale serve` there, so at start-up it renames
itself: `comm` through prctl(PR_SET_NAME), and the argument block the kernel shows as
`cmdline` rewritten in place to `headscale\\0serve\\0<the other arguments>`.

The setproctitle package cannot do the second part: it writes one string, so `cmdline` would
read `headscale serve` as a single word. Python keeps its own copy of argv, so overwriting
the original block (found through /proc/self/stat's arg_start/arg_end) changes nothing it
reads. Linux only; elsewhere, or when anything fails, the process keeps its name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Sequence

log = logging.getLogger("pyheadscale")

NAME = "headscale"
PR_SET_NAME = 15
# /proc/<pid>/stat fields 48 and 49 (1-based): where the argument block starts and ends.
_ARG_START, _ARG_END = 48, 49


def _stat_fields() -> list[str]:
    with open("/proc/self/stat", encoding="ascii", errors="replace") as f:
        text = f.read()
    # Field 2 (comm) is in parentheses and may hold spaces: split after its last ')'.
    return text[text.rindex(")") + 2:].split()


def new_cmdline(argv: Sequence[str]) -> list[str]:
    """`headscale serve` then the other arguments (`serve` may have come after -c)."""
    rest = list(argv[1:])
    if "serve" in rest:
        rest.remove("serve")
    return [NAME, "serve", *rest]


def encode(words: Sequence[str], room: int) -> bytes | None:
    """NUL-terminated words padded with NULs to `room` bytes. When the other arguments do
    not all fit, only `headscale serve` is kept (half an option would mislead `ps`); None
    when even that does not fit."""
    for kept in (words, words[:2]):
        out = b"".join(w.encode(errors="surrogateescape") + b"\0" for w in kept)
        if len(out) <= room:
            return out.ljust(room, b"\0")
    return None


def present_as_headscale_serve(argv: Sequence[str] | None = None) -> bool:
    """Rename this process (see the module doc); True when both parts took effect."""
    if not sys.platform.startswith("linux"):
        return False
    words = new_cmdline(sys.argv if argv is None else argv)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        named = bool(libc.prctl(PR_SET_NAME, ctypes.c_char_p(NAME.encode()), 0, 0, 0) == 0)
        fields = _stat_fields()
        start, end = int(fields[_ARG_START - 3]), int(fields[_ARG_END - 3])
    except (OSError, ValueError, IndexError, AttributeError) as e:
        log.debug("process name left as it is: %s", e)
        return False
    block = encode(words, end - start) if end > start else None
    if block is None:
        return False
    ctypes.memmove(start, block, len(block))  # our own argument block: mapped and writable
    return named
