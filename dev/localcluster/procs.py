"""Start long-running cluster processes detached, and stop exactly those processes again by pid file.

A pid file holds the pid and the executable path; a pid is only signalled if /proc says it still runs that
executable, so a recycled pid never gets killed by mistake.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from .config import Layout


def _pid_file(layout: Layout, name: str) -> Path:
    return layout.run / f"{name}.pid"


def _exe_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def running_pid(layout: Layout, name: str) -> int | None:
    """The pid of our process `name` if it is alive and still the binary we started."""
    path = _pid_file(layout, name)
    if not path.exists():
        return None
    pid_text, _, exe = path.read_text().partition("\n")
    pid = int(pid_text)
    actual = _exe_of(pid)
    # A deleted-and-rebuilt binary shows up as "<path> (deleted)"; that is still our process.
    if actual is None or actual.removesuffix(" (deleted)") != exe.strip():
        return None
    return pid


def start(layout: Layout, name: str, argv: list[str | Path], env: dict[str, str] | None = None) -> int:
    """Start `argv` in its own session (it outlives `dev/cluster up`) unless it already runs."""
    pid = running_pid(layout, name)
    if pid is not None:
        return pid
    layout.run.mkdir(parents=True, exist_ok=True)
    layout.logs.mkdir(parents=True, exist_ok=True)
    exe = str(Path(argv[0]).resolve())
    with (layout.logs / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    _pid_file(layout, name).write_text(f"{proc.pid}\n{exe}\n")
    time.sleep(0.3)
    if proc.poll() is not None:
        raise SystemExit(f"{name} exited at once (code {proc.returncode}); see {layout.logs / f'{name}.log'}")
    return proc.pid


def stop_pid(pid: int, grace: float = 10.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if _exe_of(pid) is None or _is_zombie(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while _exe_of(pid) is not None and not _is_zombie(pid):
        time.sleep(0.1)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def stop(layout: Layout, name: str, grace: float = 10.0) -> bool:
    """Stop our process `name` if it runs; remove its pid file. Returns whether something was stopped."""
    pid = running_pid(layout, name)
    if pid is not None:
        stop_pid(pid, grace)
    _pid_file(layout, name).unlink(missing_ok=True)
    return pid is not None


def pids_with_arg(needle: str) -> list[int]:
    """Pids whose command line contains `needle` (a path unique to this cluster, e.g. our containerd socket).

    Used for containerd's shims, which containerd (not we) starts and which re-parent to init.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def pss_kib(pid: int) -> int:
    """Proportional set size of one process (shared pages split among their users), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (containerd shims -> pause and container processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found
