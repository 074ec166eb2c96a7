"""Private files and directories: the data directory 0700, databases and keys 0600.

The data directory holds the Noise and DERP private keys and (by default) the SQLite
database, which holds pre-auth keys and API key hashes. New ones are created private; an
existing one that others can read is tightened, with a log line, unless it is the working or
home directory (changing those would surprise more than it protects; a warning says why).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("pyheadscale.files")

__all__ = ["private_dir", "private_file"]


def private_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        p.mkdir(mode=0o700, parents=True)
        os.chmod(p, 0o700)  # mkdir's mode is narrowed by the umask only; make it exact
        return p
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077 == 0:
        return p
    resolved = p.resolve()
    if resolved in (Path.cwd().resolve(), Path.home().resolve()) or p.stat().st_uid != os.getuid():
        log.warning("%s is readable by other users (mode %o); it holds private keys", p, mode)
        return p
    os.chmod(p, mode & 0o700)
    log.info("%s was mode %o; now %o (it holds private keys)", p, mode, mode & 0o700)
    return p


def private_file(path: str | os.PathLike[str]) -> Path:
    """Create `path` empty with mode 0600 if missing, else take group/other access away."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077 and p.stat().st_uid == os.getuid():
            os.chmod(p, mode & 0o700)
            log.info("%s was mode %o; now %o", p, mode, mode & 0o700)
        return p
    os.close(fd)
    os.chmod(p, 0o600)
    return p
