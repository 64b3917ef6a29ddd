"""One writer per run directory: an exclusive ``fcntl.flock`` on ``OUT/.lock``, held by a
training run (fresh, ``--resume`` or ``--overwrite``) from before it looks at the directory until
it ends, however it ends.

The lock file holds the holder's pid, host and start time; a second run into the same directory
is refused with them named. The lock belongs to the open file, so the kernel drops it when the
holder dies (even by SIGKILL): a lock file left by a dead process is taken over. On release the
file is removed; a run that opened the file just before that checks, once it holds the lock,
that it still locks the file at the path (else it opens the new one), so two runs never hold
locks on two different files.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

LOCK_FILE = ".lock"


class RunDirectoryBusy(ValueError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """``with RunLock(out):`` holds ``out``'s lock (creating ``out``), or raises ``RunDirectoryBusy``."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self.fd: Optional[int] = None
        self.created_dir = False
        self.previous: Optional[dict] = None  # the record of a dead holder whose lock file was taken over

    def acquire(self) -> "RunLock":
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file, not a directory")
        if not self.out.exists():
            self.out.mkdir(parents=True, exist_ok=True)
            self.created_dir = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if not isinstance(e, BlockingIOError):  # a file system without locks (some network mounts)
                    os.close(fd)
                    self._cleanup_dir()
                    raise OSError(f"--out {self.out}: cannot lock {self.path} ({e.strerror}); train into a "
                                  "directory on a local file system") from None
                holder = _read_record(fd)
                os.close(fd)
                self._cleanup_dir()
                raise RunDirectoryBusy(
                    f"--out {self.out} is in use by another training run ({_describe(holder)}): one run writes a "
                    "directory at a time; wait for it to end, stop it, or train into another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file we opened while releasing: lock the new one
        self.previous = _read_record(fd) or None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still held: nobody can take the lock of a file being removed
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self.created_dir:  # a run refused before it wrote anything leaves no directory behind
            try:
                self.out.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_record(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(record: dict) -> str:
    if not record.get("pid"):
        return "its pid is not recorded yet"
    where = f" on {record['host']}" if record.get("host") and record["host"] != socket.gethostname() else ""
    since = f", since {record['started']}" if record.get("started") else ""
    return f"pid {record['pid']}{where}{since}"
