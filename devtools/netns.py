"""Network namespaces for the test beds (the kubelet rehearsal, the uplink bed): made, entered, removed.

All of it needs root. A namespace is named with its maker's prefix and process id
(``pfu1234-site``), so a later run can remove what a killed one left behind
(``remove_stale_namespaces``). A thread enters a namespace with ``setns``, which
moves only that thread: sockets it creates and processes it starts live there,
the rest of the process stays where it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def run(*argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


def netns_list() -> list[str]:
    out = run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    out = run("ip", "netns", "pids", name, check=False).stdout
    return [int(pid) for pid in out.split()]


def remove_netns(name: str) -> None:
    """Kill whatever still runs in a namespace, then remove it and its /etc/netns folder."""
    for _ in range(50):  # a process can fork while we kill: look again until none is left
        pids = netns_pids(name)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    run("ip", "netns", "delete", name, check=False)
    shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def remove_stale_namespaces(prefix: str) -> list[str]:
    """Remove the namespaces ``<prefix><pid>-...`` whose process is gone (killed before it could
    clean up); return their names."""
    stale = []
    for name in netns_list():
        match = re.fullmatch(rf"{prefix}(\d+)-.*", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            remove_netns(name)
            stale.append(name)
    return stale


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns into {what}")


def enter_netns(name: str) -> None:
    """Move the calling thread into a network namespace (only this thread: setns is per thread)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(fd, name)
    finally:
        os.close(fd)


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the calling thread inside a namespace for the block, and put it back where it was after."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        enter_netns(name)
        try:
            yield
        finally:
            _setns(home, "the namespace the thread came from")
    finally:
        os.close(home)


def call_in(name: str, function: Callable[..., T], *args: Any, timeout: float = 120.0) -> T:
    """Call ``function(*args)`` in a thread inside a namespace; its result, or its exception."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            enter_netns(name)
            outcome["result"] = function(*args)
        except BaseException as exc:  # handed to the caller, whatever it is
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"in-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{getattr(function, '__name__', function)} in {name} took over {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]  # type: ignore[no-any-return]


def thread_in(name: str, function: Callable[[], object], *, thread_name: str) -> threading.Thread:
    """Start a daemon thread running ``function`` inside a namespace (threads it starts are there too)."""

    def target() -> None:
        enter_netns(name)
        function()

    thread = threading.Thread(target=target, name=thread_name, daemon=True)
    thread.start()
    return thread
