"""Drop the lines Ray prints on every healthy run that are not errors of the job (issue 15).

Ray's C++ core worker writes its log lines straight to file descriptor 2, so Python's logging
cannot filter them. ``ray_false_alarms_filtered()`` points the driver's fd 2 at a pipe read by a
small child process (this module run as a script) that forwards every byte except whole lines
matching ``FALSE_ALARMS``. A child, not a thread: if the driver dies (a crash, a SIGKILL), the
child still forwards whatever was written, its crash dump included, and exits at end of input.
Ray's own log files keep every line.

This module imports nothing beyond the standard library and runs isolated (``-I``: its folder,
which holds a ``select.py``, must not shadow the standard library): it starts in ~30 ms.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

FALSE_ALARMS = (
    # Error level, once per actor of every Ray Data actor pool: Ray Data passes each pool's
    # constructor arguments (its DataContext and map transformer) by object-store reference and
    # holds those references for the pool's life, and Ray's core worker warns about any such
    # actor with max_restarts > 0 (ray-project/ray#53727). Restarts work (tests/test_faults.py).
    re.compile(
        rb"core_worker\.cc:\d+: Actor with class name: '[^']*' and ID: '[0-9a-f]+' has "
        rb"constructor arguments in the object store and max_restarts > 0\."
    ),
)


def _is_false_alarm(line: bytes) -> bool:
    return any(p.search(line) for p in FALSE_ALARMS)


def forward(src: int, dst: int) -> None:
    """Copy ``src`` to ``dst`` until end of input, leaving out false-alarm lines. Text without a
    newline yet (a progress bar's carriage-return update) goes through at once, unless it could
    be the start of a log line (``[``...), which waits for its newline."""
    pending = b""
    while chunk := os.read(src, 1 << 16):
        pending += chunk
        lines = pending.split(b"\n")
        pending = lines.pop()
        out = b"".join(line + b"\n" for line in lines if not _is_false_alarm(line))
        if pending and not pending.lstrip(b"\r").startswith(b"["):
            out, pending = out + pending, b""
        if out:
            os.write(dst, out)
    if pending and not _is_false_alarm(pending):
        os.write(dst, pending)


@contextlib.contextmanager
def ray_false_alarms_filtered() -> Iterator[None]:
    """For the block, this process's fd 2 (and so ``sys.stderr``) passes through the filter."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-I", "-S", __file__], stdin=read_end, stdout=saved, close_fds=True
    )
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer here is gone: the child sees end of input
        os.close(saved)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)  # its last lines out before ours (the summary follows)


if __name__ == "__main__":
    # A stop is the driver's to handle: Ctrl-C reaches the whole terminal process group and
    # `ray job stop` signals the job's every process. This filter ends at end of input, when the
    # driver has closed its end or died, so nothing the driver writes while it stops is lost.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    forward(0, 1)
