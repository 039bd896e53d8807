"""The workdir of a training run: one writer at a time, writable, room for checkpoints.

* `WorkdirLock`: an exclusive ``fcntl.flock`` on ``WORKDIR/.fszjax.lock``. A second
  `fszjax pretrain` on the same workdir refuses with one line naming the running one
  (pid, host, start time). The operating system drops the lock when the holding process
  ends for any reason (SIGKILL, OOM, a crashed host's NFS client aside), so a crashed run
  never leaves it stuck; the file itself stays and is harmless. On several processes only
  process 0 takes it (the others write into the same directory under its lock).
* `check_writable`: creates and removes a probe file (permission bits say nothing about a
  read-only mount or a root-owned directory).
* `check_free_space`: at least ``need`` bytes free (the caller passes two checkpoints).

Every failure is a `WorkdirError` (a `UserError`: one line, exit status 2).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import time

from fszjax.errors import UserError

LOCK_NAME = ".fszjax.lock"


class WorkdirError(UserError):
  """The workdir cannot be used (locked, read-only, full); the message names the fix."""


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO,
                   errno.EFBIG}
# How TensorStore (which writes the arrays, in C++) words the same failures.
STORAGE_WORDS = ("No space left", "RESOURCE_EXHAUSTED", "Disk quota", "File too large",
                  "PERMISSION_DENIED", "Permission denied", "Read-only file system",
                  "Input/output error", "OS error 28", "OS error 13", "OS error 30", "OS error 5:",
                  "OS error 27")


def storage_fault(e: BaseException) -> str | None:
  """A short reason if `e` (or its cause/context) is a storage failure, else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
      return os.strerror(e.errno)
    text = str(e)
    for w in STORAGE_WORDS:
      if w in text:
        for full in ("No space left on device", "Disk quota exceeded", "File too large",
                     "Permission denied", "Read-only file system", "Input/output error"):
          if full in text:
            return full
        return "no space left on device" if w in ("RESOURCE_EXHAUSTED", "OS error 28") else w
    e = e.__cause__ or e.__context__
  return None


def describe_storage_error(e: BaseException, reason: str) -> str:
  """One line for a storage failure outside a checkpoint save (config, metrics, ...)."""
  where = getattr(e, "filename", None)
  where = f" {where}" if where else ""
  return (f"storage error on{where} ({reason}); free space or fix permissions there (or pass "
          "another --workdir), then rerun the same command to resume")


def mb(nbytes: float) -> str:
  """Bytes as a short human string ("12.3 MB", "1.50 GB")."""
  if nbytes >= 1e9:
    return f"{nbytes / 1e9:.2f} GB"
  return f"{nbytes / 1e6:.1f} MB"


def make(path: str) -> str:
  """Creates `path` (and parents); a one-line `WorkdirError` if that is not possible."""
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create the workdir {path} ({e.strerror}); pass a --workdir in a "
                       "writable directory") from None
  if not os.path.isdir(path):
    raise WorkdirError(f"workdir {path} is not a directory; pass a directory as --workdir")
  return path


def check_writable(path: str) -> None:
  """Raises `WorkdirError` unless a file can be created in `path` (a real write, not
  permission bits: root ignores them, a read-only mount does not)."""
  probe = os.path.join(path, f".fszjax-write-test-{os.getpid()}")
  try:
    with open(probe, "wb") as f:
      f.write(b"ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(_not_writable(path, e)) from None


def _not_writable(path: str, e: OSError) -> str:
  return (f"workdir {path} is not writable ({e.strerror}); fix its permissions (chmod -R u+w), "
          "remount it read-write, or pass another --workdir")


def free_bytes(path: str) -> int:
  return shutil.disk_usage(path).free


def check_free_space(path: str, need: int, what: str) -> None:
  """Raises `WorkdirError` if the filesystem of `path` has less than `need` bytes free."""
  free = free_bytes(path)
  if free < need:
    raise WorkdirError(
        f"{path} has {mb(free)} free but {what} need about {mb(need)}; free {mb(need - free)} "
        "there or pass another --workdir")


class WorkdirLock:
  """Context manager holding an exclusive flock on ``path/.fszjax.lock`` (when `enabled`)."""

  def __init__(self, path: str, enabled: bool = True, what: str = "fszjax pretrain"):
    self.path = os.path.abspath(os.path.expanduser(path))
    self.enabled = enabled
    self.what = what
    self._fd: int | None = None

  @property
  def lock_path(self) -> str:
    return os.path.join(self.path, LOCK_NAME)

  def acquire(self) -> "WorkdirLock":
    if not self.enabled:
      return self
    make(self.path)
    try:
      fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(_not_writable(self.path, e)) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = ""
      try:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
      except OSError:
        pass
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirError(
            f"workdir {self.path} is in use by another run ({holder or 'unknown process'}); "
            "wait for it to finish, stop it, or pass another --workdir") from None
      raise WorkdirError(f"cannot lock {self.lock_path} ({e.strerror}); pass a --workdir on a "
                         "filesystem that supports flock") from None
    info = (f"{self.what}, pid {os.getpid()} on {socket.gethostname()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, info.encode(), 0)
    except OSError:
      pass  # the lock holds even if its description cannot be written (full disk)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      try:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
      finally:
        os.close(self._fd)
        self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def is_locked(path: str) -> str | None:
  """The holder's description if another process holds the lock of workdir `path`."""
  lock_path = os.path.join(os.path.abspath(os.path.expanduser(path)), LOCK_NAME)
  if not os.path.exists(lock_path):
    return None
  fd = os.open(lock_path, os.O_RDONLY)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      return os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown process"
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None
  finally:
    os.close(fd)
