"""File plumbing for the whole package: the one atomic writer, the one torch reader, the one
JSON reader, durable appends, output-folder checks and locks, and named fault points.

Every file chameleon_ext writes goes through :func:`atomic_write` (or a helper built on it),
so each has the same guarantees:

* the data goes to a temp file in the target's own folder (same filesystem, so the final
  ``os.replace`` is atomic): readers see the old file or the new one, never a mix;
* the file and then its folder are fsynced, so a power loss after return keeps the new file;
* on any failure (an exception, ENOSPC, Ctrl-C) the temp file is removed and the previous
  file is left untouched; a writer killed outright (SIGKILL) leaves a temp file whose name
  holds its host and pid, and :func:`remove_stale_temps` deletes it on the next run;
* permissions are 0o644 (checkpoints and weights are ordinary shared files).

Errors are :class:`~chameleon_ext.errors.ChameleonUserError` with one line naming the path,
what it is and the reason ("cannot write weights file 'out/weights.json': No space left on
device"), so the CLI prints them and exits 2.

Fault points. Tests inject faults deterministically through the ``CHAMELEON_FAULT``
environment variable: a comma-separated list of ``POINT=ACTION`` where ``POINT`` is an
``fnmatch`` pattern over point names and ``ACTION`` is ``enospc``, ``eio``, ``raise``
(RuntimeError), ``kill`` (SIGKILL this process) or ``sleep:SECONDS``. Every atomic write
passes the points ``write:NAME:open``, ``write:NAME:data`` (before the data is flushed) and
``write:NAME:replace`` (data written, before the rename), where NAME is the file's base name;
a whole folder written through :func:`staged_folder` passes ``folder:NAME:staged``,
``folder:NAME:swapped`` (and ``folder:NAME:aside`` where the filesystem cannot exchange two
paths); other modules add their own with :func:`fault_point` (e.g. ``train:step:120``).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import socket
import time
from typing import Any, Iterator, Optional, Union

from .errors import ChameleonUserError

PathLike = Union[str, os.PathLike]

FAULT_ENV = "CHAMELEON_FAULT"
_TMP_TAG = ".chameleon-tmp"
_HOST = socket.gethostname().replace(".", "_") or "host"


# -- fault points ----------------------------------------------------------------------------


def fault_point(name: str) -> None:
    """Act on ``name`` if ``CHAMELEON_FAULT`` names it (a no-op otherwise: one dict lookup)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        pattern, _, action = item.strip().partition("=")
        if not pattern or not fnmatch.fnmatchcase(name, pattern):
            continue
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if action == "eio":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if action == "raise":
            raise RuntimeError(f"fault injected at {name}")
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action.startswith("sleep:"):
            time.sleep(float(action.split(":", 1)[1]))


# -- errors ----------------------------------------------------------------------------------


def os_error_reason(exc: BaseException) -> str:
    """The short reason of an OSError ("No space left on device"), else the exception text."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_error(path: PathLike, what: str, exc: BaseException) -> ChameleonUserError:
    return ChameleonUserError(f"cannot write {what} {os.fspath(path)!r}: {os_error_reason(exc)}")


# -- writing ---------------------------------------------------------------------------------


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


def temp_path(path: PathLike) -> str:
    """A fresh temp name beside ``path`` that :func:`remove_stale_temps` recognises (for
    writers that must place a file by other means than :func:`atomic_write`, e.g. a link)."""
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    return _temp_name(folder, base)


def _temp_name(folder: str, base: str) -> str:
    # Host and pid in the name let a later run tell a dead writer's leftovers from a live one's.
    return os.path.join(folder, f".{base}.{_HOST}.{os.getpid()}.{os.urandom(4).hex()}{_TMP_TAG}")


@contextlib.contextmanager
def atomic_write(path: PathLike, what: str = "file", mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path`` for writing (``mode`` "wb" or "w"); on leaving the
    block without an exception, fsync it, rename it onto ``path`` and fsync the folder.

    OSErrors (a read-only folder, a full disk) become one-line ChameleonUserErrors naming
    ``what`` and ``path``; the temp file never outlives a failure.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    if os.path.isdir(path):
        raise ChameleonUserError(f"cannot write {what} {path!r}: it is a folder")
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fault_point(f"write:{base}:open")
        tmp = _temp_name(folder, base)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.fchmod(fd, 0o644)  # independent of the umask, as documented
        kwargs = {"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            fault_point(f"write:{base}:data")
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"write:{base}:replace")
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(folder)
    except OSError as exc:
        raise write_error(path, what, exc) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_bytes(path: PathLike, data: bytes, what: str = "file") -> str:
    with atomic_write(path, what, "wb") as f:
        f.write(data)
    return os.fspath(path)


def write_text(path: PathLike, text: str, what: str = "file") -> str:
    with atomic_write(path, what, "w") as f:
        f.write(text)
    return os.fspath(path)


def write_json(path: PathLike, obj: Any, what: str = "JSON file", sort_keys: bool = False) -> str:
    """Atomically write ``obj`` as indented JSON. NaN and infinities are refused (they are not
    JSON), so a non-finite number can never reach a file other tools parse."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=False)
    except ValueError as exc:
        raise ChameleonUserError(f"cannot write {what} {os.fspath(path)!r}: {exc}") from exc
    return write_text(path, text + "\n", what)


def save_torch(obj: Any, path: PathLike, what: str = "torch file") -> str:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    with atomic_write(path, what, "wb") as f:
        torch.save(obj, f)
    return os.fspath(path)


def append_line(path: PathLike, line: str, what: str = "log file") -> None:
    """Append one line durably (``O_APPEND`` + fsync): a kill loses at most this line, never
    what was there before. Used for metrics logs that grow during a run."""
    path = os.fspath(path)
    if "\n" in line:
        raise ValueError("append_line writes a single line")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise write_error(path, what, exc) from exc


# -- whole folders ---------------------------------------------------------------------------

_RENAME_EXCHANGE = 2  # renameat2 flag (Linux 3.15+): swap two paths in one step
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step; False where the OS or filesystem
    cannot (the caller then falls back to two renames)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def _aside_name(path: str) -> str:
    folder, base = os.path.split(path)
    return _temp_name(folder, base + "~previous")


def recover_folder(path: str) -> None:
    """Settle what a :func:`staged_folder` killed in its two-rename fallback left: a previous
    folder moved aside (``~previous`` temp of a dead writer) goes back to ``path`` when ``path``
    is missing (killed between the renames), and is deleted when ``path`` exists (killed after
    the swap)."""

    folder, base = os.path.split(path)
    prefix = f".{base}~previous."
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(_TMP_TAG))
    except OSError:
        return
    for name in names:
        parts = name[: -len(_TMP_TAG)].rsplit(".", 3)
        if len(parts) != 4 or parts[1] != _HOST or not parts[2].isdigit() or _pid_alive(int(parts[2])):
            continue
        if os.path.exists(path):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        else:
            os.rename(os.path.join(folder, name), path)


@contextlib.contextmanager
def staged_folder(path: PathLike, what: str = "folder") -> Iterator[str]:
    """A fresh temp folder beside ``path`` to write a whole folder's files into; on leaving the
    block without an exception it takes ``path``'s place in one step and the previous folder is
    deleted. So readers (and a writer killed at any point) see the old folder or the new one,
    never a mix: before the swap ``path`` is untouched, the temp folder of a killed writer is
    deleted by the next :func:`remove_stale_temps` of the parent folder.

    The swap is an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``); where the filesystem
    cannot exchange, the old folder is first renamed aside, and a writer killed between the two
    renames has its old folder put back by the next call. Fault points:
    ``folder:NAME:staged`` (every file written, before the swap) and ``folder:NAME:swapped``
    (after it, before the old folder is deleted), NAME being ``path``'s base name."""

    # The real folder is replaced (a symlink to it stays a symlink), beside it on its filesystem.
    path = os.path.realpath(os.fspath(path))
    parent, base = os.path.split(path)
    staged = None
    try:
        os.makedirs(parent, exist_ok=True)
        recover_folder(path)
        remove_stale_temps(parent)
        staged = _temp_name(parent, base)
        os.mkdir(staged, 0o755)
        yield staged
        fault_point(f"folder:{base}:staged")
        _fsync_dir(staged)  # (its files were written with atomic_write: each already fsynced)
        if not os.path.exists(path):
            os.rename(staged, path)
            old = None
        elif _exchange(staged, path):
            old = staged  # the exchange left the previous folder under the temp name
        else:
            old = _aside_name(path)
            os.rename(path, old)
            fault_point(f"folder:{base}:aside")
            os.rename(staged, path)
        staged = None
        _fsync_dir(parent)
        fault_point(f"folder:{base}:swapped")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise write_error(path, what, exc) from exc
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)


def remove_stale_temps(folder: PathLike, base: Optional[str] = None) -> list:
    """Delete temp files (and temp folders, such as a half-built dataset) left in ``folder`` by
    writers on this host that are no longer alive; return their paths. With ``base``, only the
    temps of ``os.path.join(folder, base)`` (named by :func:`temp_path`). Live writers' temps
    and other hosts' are left alone."""
    folder = os.fspath(folder)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.endswith(_TMP_TAG) or (base is not None and not name.startswith(f".{base}.")):
            continue
        parts = name[: -len(_TMP_TAG)].rsplit(".", 3)
        if len(parts) != 4 or parts[1] != _HOST or not parts[2].isdigit():
            continue
        if _pid_alive(int(parts[2])) or parts[0].endswith("~previous"):
            continue  # (a folder moved aside is put back by staged_folder, never deleted here)
        full = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if os.path.isdir(full) and not os.path.islink(full):  # a staged folder (staged_folder)
                shutil.rmtree(full)
            else:
                os.unlink(full)
            removed.append(full)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_writable_folder(path: PathLike, what: str = "output folder") -> str:
    """Create ``path`` if needed and prove a file can be written there, before any long work.
    An existing file in its place, a read-only folder or a full disk is a one-line error."""
    path = os.fspath(path)
    if not path:
        raise ChameleonUserError(f"{what} must be a folder path, got an empty string")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ChameleonUserError(f"{what} {path!r} is an existing file, expected a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = _temp_name(path, "write-probe")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ChameleonUserError(f"{what} {path!r} is not writable: {os_error_reason(exc)}") from exc
    return path


# -- reading ---------------------------------------------------------------------------------


def _check_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise ChameleonUserError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise ChameleonUserError(f"{what} {path!r} is a folder, expected a file")


def read_json(path: PathLike, what: str = "JSON file", expect: type = dict) -> Any:
    """Parse a JSON file, with one-line errors naming ``what`` for every way it can fail."""
    path = os.fspath(path)
    _check_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except UnicodeDecodeError as exc:
        raise ChameleonUserError(f"{what} {path!r} is not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ChameleonUserError(
            f"{what} {path!r} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except OSError as exc:
        raise ChameleonUserError(f"cannot read {what} {path!r}: {os_error_reason(exc)}") from None
    if expect is not None and not isinstance(obj, expect):
        raise ChameleonUserError(
            f"{what} {path!r}: expected a JSON {'object' if expect is dict else expect.__name__} "
            f"at top level, got {type(obj).__name__}")
    return obj


def read_json_or_none(path: PathLike) -> Optional[dict]:
    """A cache's metadata: the JSON object at ``path``, or None if it is absent or damaged
    (the caller then recomputes what it describes)."""
    try:
        return read_json(path, "cache entry")
    except ChameleonUserError:
        return None


def torch_load_failure(exc: BaseException) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` failed, without torch's
    multi-line advice to switch ``weights_only`` off."""
    text = str(exc)
    if "Weights only load failed" in text:
        return "it is not a file of tensors written by torch.save (not a chameleon_ext file?)"
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


def read_torch(path: PathLike, what: str = "torch file") -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, with one-line errors naming ``what``."""
    import torch

    path = os.fspath(path)
    _check_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ChameleonUserError(f"cannot read {what} {path!r}: {os_error_reason(exc)}") from exc
    except Exception as exc:
        raise ChameleonUserError(f"{what} {path!r} cannot be read: {torch_load_failure(exc)}") from exc


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# -- output-folder lock ----------------------------------------------------------------------


class FolderLock:
    """An exclusive lock on an output folder, so two runs never interleave their files.

    The lock is a file ``.chameleon.lock`` created with O_EXCL holding ``host pid``. A lock whose
    process is dead on this host is stale and taken over (with a notice through ``on_stale``);
    a live one, or one from another host, is an error naming the holder. Released on exit
    (``with FolderLock(...)`` or :meth:`release`).
    Only rank 0 of a distributed run should take it.
    """

    NAME = ".chameleon.lock"

    def __init__(self, folder: PathLike, what: str = "output folder", on_stale=None):
        self.folder = os.fspath(folder)
        self.what = what
        self.path = os.path.join(self.folder, self.NAME)
        self.on_stale = on_stale
        self.held = False

    def acquire(self) -> "FolderLock":
        check_writable_folder(self.folder, self.what)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or not self._stale(holder):
                    who = f"process {holder[1]} on {holder[0]}" if holder else "another process"
                    raise ChameleonUserError(
                        f"{self.what} {self.folder!r} is in use by {who} (lock {self.path!r}); "
                        "wait for it, or remove the lock if that run is gone") from None
                if self.on_stale:
                    self.on_stale(f"removing stale lock {self.path!r} of dead process {holder[1]}")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            except OSError as exc:
                raise ChameleonUserError(
                    f"cannot lock {self.what} {self.folder!r}: {os_error_reason(exc)}") from exc
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.held = True
            return self
        raise ChameleonUserError(f"cannot lock {self.what} {self.folder!r}: the lock keeps reappearing")

    def _holder(self):
        try:
            with open(self.path) as f:
                host, pid = f.read().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None

    @staticmethod
    def _stale(holder) -> bool:
        host, pid = holder
        return host == socket.gethostname() and pid != os.getpid() and not _pid_alive(pid)

    def release(self) -> None:
        if self.held:
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
