"""Crash-safe file writes: the new files appear whole, or the old ones stay; a kill leaves nothing half-written.

`atomic_write(paths)` gives one temporary file next to each target, for the body to fill (through
`AtomicWrite.write`, or by name). When the body returns, every temporary is fsynced, then renamed
over its target in the given order (the first rename is the commit point), then the directories
are fsynced. When the body raises, the temporaries are removed and every target is untouched.
Killed at any moment, each target is exactly its old or its new content (rename is atomic).

A target that cannot be replaced (a directory in its place) is refused before anything is written.
A rename after the first (the commit) that still fails does not raise: it is recorded in
`AtomicWrite.late` and that target keeps its old content; the caller decides what that means
(save_adapter: a stale readable copy, with a warning).

Temporary files are named `.<target name>.<writer pid>-<8 random chars>.tmp`, the target name cut to
its first TEMP_NAME_BYTES bytes so that the whole fits NAME_MAX (255 bytes) for any target name
that does (the C++ writer names its temporaries the same way), and their writer holds
an exclusive flock on each while it lives (the kernel drops it when the process dies, SIGKILL
included). Every write first removes the temporaries of its target names that no process holds
locked (clean_stale_temps): a live writer's temporary is never removed, so concurrent writers do
not break each other; the last rename wins.
"""
import contextlib
import errno
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional, Sequence, Tuple

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

# Unlocked temporaries of ours that are removed by the next write to the same target (see above).
STALE_EMPTY_SECONDS = 10.0
STALE_UNLOCKED_SECONDS = 3600.0
_TEMP_SUFFIX = ".tmp"
# The most bytes of the target name a temporary's name keeps: NAME_MAX (255) less the rest of the
# name ('.' + '.' + a pid of up to 7 digits + '-' + 8 random chars + '.tmp' = 22 bytes).
TEMP_NAME_BYTES = 233


def _temp_stem(target: Path) -> str:
    """The target's name as its temporaries spell it: its first TEMP_NAME_BYTES bytes."""
    return os.fsdecode(os.fsencode(target.name)[:TEMP_NAME_BYTES])


def _file_mode() -> int:
    """The mode open() would give a new file: 0o666 minus the process umask (mkstemp uses 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _temp_patterns(target: Path) -> Tuple["re.Pattern", "re.Pattern"]:
    """Our temporaries' names: `.<name>.<pid>-<8 chars>.tmp` (tempfile.mkstemp's 8 characters of
    [a-z0-9_]), and `.<name>.<8 chars>.tmp` as loldu wrote them before it locked its temporaries."""
    tail = r"[a-z0-9_]{8}" + re.escape(_TEMP_SUFFIX)
    return (re.compile(re.escape(f".{_temp_stem(target)}.") + r"([0-9]+)-" + tail),
            re.compile(re.escape(f".{target.name}.") + tail))


def _try_lock(fd: int) -> Optional[bool]:
    """Exclusive non-blocking flock: True if taken, False if another open file holds it, None if
    this file system cannot lock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # another user's process, or not a pid we can ask about
        return True
    return True


def _is_stale(fd: int, match: Optional["re.Match"]) -> Optional[os.stat_result]:
    """The stat of the temporary open as `fd` if it may be removed, else None (see clean_stale_temps)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return None
    age = time.time() - st.st_mtime
    locked = _try_lock(fd) if match else None
    if locked is False:
        return None  # a live writer's file
    if locked is None:
        stale = age > STALE_UNLOCKED_SECONDS
    else:
        stale = st.st_size > 0 or age > STALE_EMPTY_SECONDS or not _pid_alive(int(match.group(1)))
    return st if stale else None


def clean_stale_temps(target) -> List[str]:
    """Removes the temporary files of `target` that killed writers left behind; returns their paths.

    Only names of our pattern are considered, and a file is removed only when no process holds its
    flock (its writer is gone: the kernel drops the lock of a dead process) and it is non-empty
    (written after locking), or empty with its writer's pid (in the name) gone or older than
    STALE_EMPTY_SECONDS (a live writer may be between creating and locking it). Without flock, and
    for the unlocked temporaries of older loldu versions: older than STALE_UNLOCKED_SECONDS.
    Best effort: a file that cannot be examined is left.
    """
    target = Path(target)
    ours, legacy = _temp_patterns(target)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    removed = []
    for n in names:
        m = ours.fullmatch(n)
        if m is None and not legacy.fullmatch(n):
            continue
        p = target.parent / n
        try:  # no symlink followed, no FIFO waited on
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            st = _is_stale(fd, m)
            if st is None:
                continue
            now = os.stat(p, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):  # still the file examined
                os.unlink(p)
                removed.append(str(p))
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _locked_temp(target: Path, mode: int) -> Tuple[int, str]:
    """A new temporary file next to `target`, with `mode`, exclusively flocked: (fd, path)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{_temp_stem(target)}.{os.getpid()}-", suffix=_TEMP_SUFFIX)
    try:
        if fcntl is not None:
            try:  # blocking: a cleaner examining the new (empty) file holds it for a moment only
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without locks: cleaners fall back to the file's age
                pass
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def _fsync_dir(directory: Path) -> None:
    """Makes completed renames durable; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _require_replaceable(target: Path) -> None:
    """Raises IsADirectoryError when `target` is a directory: no file can be renamed over it."""
    if target.is_dir() and not target.is_symlink():
        raise IsADirectoryError(errno.EISDIR, "a directory is in the way of the file", str(target))


class AtomicWrite:
    """The temporaries of one atomic_write, in the order of its targets."""

    def __init__(self, targets: List[Path]):
        self.targets = targets
        self.temps: List[str] = []  # the temporary file of each target, for the body to write by name
        self.late: List[Tuple[Path, OSError]] = []  # renames after the commit that failed (filled on exit)
        self._fds: List[int] = []
        self._synced: set = set()

    def write(self, i: int, data) -> None:
        """Writes `data` (bytes-like) into the temporary of target i, and fsyncs it."""
        fd = self._fds[i]
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        self._synced.add(i)

    def _commit(self) -> None:
        for i, fd in enumerate(self._fds):  # data written by name is made durable before its rename
            if i not in self._synced:
                os.fsync(fd)
        for i, (tmp, p) in enumerate(zip(self.temps, self.targets)):
            try:
                os.replace(tmp, p)
            except OSError as e:
                if i == 0:
                    raise
                self.late.append((p, e))
        for d in {p.parent for p in self.targets}:
            _fsync_dir(d)


@contextlib.contextmanager
def atomic_write(paths: Sequence) -> Iterator[AtomicWrite]:
    """Replaces each of `paths` by what the body writes into its temporary file, atomically (see the
    module docstring).

    Every target is checked first (a directory in the way raises before anything is written), and
    stale temporaries of the same targets are removed (clean_stale_temps). The new ones are created
    with the mode a plain open() would give them (0o666 & ~umask) and stay flocked while they live.
    Raises OSError (callers name their own error type) on any failure up to the first rename; after
    it, failed renames are listed in `late`.
    """
    w = AtomicWrite([Path(p) for p in paths])
    try:
        for p in w.targets:
            _require_replaceable(p)
        mode = _file_mode()
        for p in w.targets:
            clean_stale_temps(p)
        for p in w.targets:
            fd, tmp = _locked_temp(p, mode)
            w._fds.append(fd)
            w.temps.append(tmp)
        yield w
        w._commit()
    finally:
        for fd, tmp in zip(w._fds, w.temps):  # unlink before closing: the file stays locked until it is gone
            if os.path.exists(tmp):
                os.unlink(tmp)
            os.close(fd)


# -- reading ---------------------------------------------------------------------------------------
_FILE_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class NotRegularFile(OSError):
    """The path exists but is not a regular file; `kind` says what it is ("a FIFO (named pipe)", ...)."""

    def __init__(self, path, mode: int):
        self.kind = next((name for test, name in _FILE_TYPES if test(mode)), "not a regular file")
        super().__init__(errno.EINVAL, f"is {self.kind}, not a regular file", str(path))


@contextlib.contextmanager
def open_regular(path) -> Iterator[Tuple[BinaryIO, int]]:
    """(file, size) of `path` (symlinks followed) opened for reading, only if it is a regular file.

    os.stat decides before anything is opened, so a FIFO (whose open or read would wait for a
    writer), a device (/dev/zero reads without end) or a directory is never read: NotRegularFile.
    The open itself does not block (O_NONBLOCK) and is checked again with fstat, so a file swapped
    in between is refused too. Other failures raise OSError (FileNotFoundError, ENAMETOOLONG, ...).
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(path, st.st_mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, st.st_mode)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f, st.st_size


def read_regular(path, max_bytes: int) -> bytes:
    """The whole of the regular file `path` (open_regular), refused with OSError (EFBIG) when it is
    larger than `max_bytes`, before anything is read."""
    with open_regular(path) as (f, size):
        data = f.read(max_bytes + 1) if size <= max_bytes else b""
        if size > max_bytes or len(data) > max_bytes:  # too large, or grown while read
            raise OSError(errno.EFBIG, f"{max(size, len(data))} bytes, more than the {max_bytes} such a file may "
                          "have", str(path))
        return data
