"""A fault-injecting SQLite VFS for tests: SQLite's own I/O-error tests, in Python.

`FaultVFS` sits on the "unix" VFS and hands out `FaultFile`s that do every operation of the
real file, except that `xWrite`, `xSync` and `xTruncate` first ask the VFS's plan whether
this one is to fail. The plan picks operations by op ("write", "sync", "truncate") and file
kind ("main", "wal", "journal", "other", from the open flags), then fails either the n-th
matching operation since `arm` (once, or from then on with `persist=True`) or each one with
probability `p` (a seeded random.Random, so a run is reproducible), optionally only on (or
never on) threads of a given name prefix. A failing operation does
nothing and raises `apsw.IOError` or `apsw.FullError`, which SQLite sees as SQLITE_IOERR or
SQLITE_FULL from the disk.

    vfs = fault_vfs()                  # registered once per process as "sqliteq-fault"
    vfs.arm(op="write", kind="wal", nth=5, error=apsw.FullError)
    ...                                # the 5th WAL write from now fails
    vfs.disarm()
    vfs.injected                       # faults raised since the last arm
    vfs.ops                            # {(kind, op): count} since the last arm
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import apsw

VFS_NAME = "sqliteq-fault"
OPS = ("write", "sync", "truncate")
KINDS = ("main", "wal", "journal", "other")

_FLAGS = apsw.mapping_open_flags
_KIND_FLAGS = (
    ("main", _FLAGS["SQLITE_OPEN_MAIN_DB"]),
    ("wal", _FLAGS["SQLITE_OPEN_WAL"]),
    ("journal", _FLAGS["SQLITE_OPEN_MAIN_JOURNAL"]),
)


def file_kind(open_flags: int) -> str:
    """Which kind of file SQLite opens, from the flags it passes to xOpen."""
    for kind, flag in _KIND_FLAGS:
        if open_flags & flag:
            return kind
    return "other"


@dataclass
class Plan:
    """Which operations fail. `op`/`kind` None match any; `nth` counts matching operations
    from `arm` (1 = the first); `p` fails each matching operation with that probability."""

    op: str | None = None
    kind: str | None = None
    nth: int | None = None
    p: float = 0.0
    error: type[apsw.Error] = apsw.IOError
    persist: bool = False
    rng: random.Random = field(default_factory=random.Random)
    thread: str | None = None       # only operations on threads whose name starts so
    matched: int = 0

    def matches(self, kind: str, op: str) -> bool:
        if not ((self.op is None or self.op == op) and (self.kind is None or self.kind == kind)):
            return False
        return self.thread is None or threading.current_thread().name.startswith(self.thread)


class FaultVFS(apsw.VFS):
    """The "unix" VFS, with faults injected as `plan` says (thread-safe)."""

    def __init__(self, name: str = VFS_NAME) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.plan: Plan | None = None
        self.ops: Counter[tuple[str, str]] = Counter()
        self.injected = 0
        self.injected_at: list[tuple[str, str, int]] = []   # (kind, op, matched count)
        super().__init__(name, "unix")

    def arm(self, op: str | None = None, kind: str | None = None, nth: int | None = None,
            p: float = 0.0, error: type[apsw.Error] = apsw.IOError, persist: bool = False,
            seed: int = 0, thread: str | None = None) -> None:
        """Fail the `nth` matching operation from now (and every later one if `persist`), or
        each matching operation with probability `p`. Operations match by op, file kind and,
        if given, the prefix of the name of the thread doing them (`thread`). Resets `ops`
        and `injected`."""
        if op is not None and op not in OPS:
            raise ValueError(f"op must be one of {OPS}, not {op!r}")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if (nth is None) == (not p):
            raise ValueError("give exactly one of nth and p")
        with self._lock:
            self.ops = Counter()
            self.injected = 0
            self.injected_at = []
            self.plan = Plan(op, kind, nth, p, error, persist, random.Random(seed), thread)

    def disarm(self) -> None:
        """No more faults (the counters keep what happened while armed)."""
        with self._lock:
            self.plan = None

    def reset(self) -> None:
        with self._lock:
            self.plan = None
            self.ops = Counter()
            self.injected = 0
            self.injected_at = []

    def count(self, op: str | None = None, kind: str | None = None) -> int:
        """Operations seen since the last arm, of this op and kind (None: any)."""
        with self._lock:
            return sum(n for (k, o), n in self.ops.items()
                       if (op is None or o == op) and (kind is None or k == kind))

    def should_fail(self, kind: str, op: str) -> type[apsw.Error] | None:
        """Count the operation; the error to raise instead of doing it, if any."""
        with self._lock:
            self.ops[(kind, op)] += 1
            plan = self.plan
            if plan is None or not plan.matches(kind, op):
                return None
            plan.matched += 1
            if plan.nth is not None:
                fail = plan.matched == plan.nth or (plan.persist and plan.matched > plan.nth)
            else:
                fail = plan.rng.random() < plan.p
            if not fail:
                return None
            self.injected += 1
            self.injected_at.append((kind, op, plan.matched))
            return plan.error

    def xOpen(self, name: str | apsw.URIFilename | None, flags: list[int]) -> FaultFile:
        return FaultFile(self, name, flags)


class FaultFile(apsw.VFSFile):
    """A file of the "unix" VFS whose writes, syncs and truncates may fail."""

    def __init__(self, vfs: FaultVFS, filename: str | apsw.URIFilename | None,
                 flags: list[int]) -> None:
        self.fault_vfs = vfs
        self.kind = file_kind(flags[0])
        super().__init__("unix", filename, flags)

    def _check(self, op: str) -> None:
        error = self.fault_vfs.should_fail(self.kind, op)
        if error is not None:
            raise error(f"injected {error.__name__} on {op} of the {self.kind} file")

    def xWrite(self, data: Any, offset: int) -> None:
        self._check("write")
        super().xWrite(data, offset)

    def xSync(self, flags: int) -> None:
        self._check("sync")
        super().xSync(flags)

    def xTruncate(self, newsize: int) -> None:
        self._check("truncate")
        super().xTruncate(newsize)


_instance: FaultVFS | None = None
_instance_lock = threading.Lock()


def fault_vfs() -> FaultVFS:
    """The process's FaultVFS, registered as "sqliteq-fault" on first use."""
    global _instance
    with _instance_lock:
        if _instance is None:
            _instance = FaultVFS()
        return _instance
