"""Publishing an output folder atomically, race-free, without ever losing what a user owns.

A folder is written by :func:`staging` into a hidden sibling ``.<name>.lowbit-tmp-<random>`` (same
filesystem), then :func:`publish` renames it into place in one step:

- **without overwrite** the rename refuses an existing target (``renameat2(RENAME_NOREPLACE)`` on
  Linux; elsewhere the name is first claimed with an exclusive ``mkdir`` and the folder renamed onto
  that empty claim). Of two writers racing for one new name exactly one wins; the other gets a
  :class:`~lowbit.errors.CheckpointError`. A folder that someone else creates at the target while a
  save runs is never touched.
- **with overwrite** the two folders are swapped with one ``renameat2(RENAME_EXCHANGE)`` (or two
  renames where that is missing), under an exclusive lock on the parent folder so that two lowbit
  writers replace one after the other. Right before the swap, under the lock, the target is checked
  again (``replaceable``: the caller's rule of what may be replaced); after it, the folder that was
  swapped out must be the very one that was checked (same device and inode), else it is swapped back.
- **crashes**: while it writes, the writer holds an ``flock`` on its staging folder; the kernel
  releases it however the process ends (``kill -9`` included). Each new :func:`staging` of the same
  target first removes the staging and set-aside folders of that target whose lock it can take, i.e.
  that no live process owns.

Folders are created with the permissions ``mkdir`` would give them (``0777`` minus the umask), not
``mkdtemp``'s ``0700``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import CheckpointError

try:  # POSIX; without it (Windows) there are no locks and no stale-folder detection
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms CI runs
    fcntl = None  # type: ignore[assignment]

__all__ = ["TMP_TAG", "OLD_TAG", "staging", "publish", "clean_stale", "fsync_path", "umask", "seal"]

TMP_TAG = ".lowbit-tmp-"
OLD_TAG = ".lowbit-old-"

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def umask() -> int:
    """The process umask (read without changing it where ``/proc`` says it, else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def fsync_path(path: Path, directory: bool = False) -> None:
    """``fsync`` a file, or a folder (its entries) where the platform can open folders."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # platforms that cannot open directories (Windows)
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def seal(folder: Path) -> None:
    """Give every file and folder under the staged ``folder`` the permissions the umask asks for
    (some writers, safetensors among them, create files ``0600``), then fsync them all."""
    mask = umask()
    for p in folder.rglob("*"):
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        if p.is_file():
            fsync_path(p)
    fsync_path(folder, directory=True)


def _renameat2(a: Path, b: Path, flag: int) -> Optional[bool]:
    """``renameat2(a, b, flag)``: True on success, None where the OS or filesystem lacks it;
    raises ``OSError`` (``FileExistsError`` for an existing target under NOREPLACE) otherwise."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flag) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EINVAL)):
        return None
    raise OSError(err, os.strerror(err), str(b))


def _rename_noreplace(a: Path, b: Path) -> Optional[bool]:
    return _renameat2(a, b, _RENAME_NOREPLACE)


def _rename_exchange(a: Path, b: Path) -> Optional[bool]:
    return _renameat2(a, b, _RENAME_EXCHANGE)


@contextlib.contextmanager
def _flocked(path: Path, *, blocking: bool = True) -> Iterator[Optional[int]]:
    """An exclusive ``flock`` on the folder ``path``: yields its descriptor, or ``None`` when
    ``blocking=False`` and another process holds the lock (or the platform has no flock)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield None
                return
        yield fd
    finally:
        os.close(fd)


def _siblings(out_dir: Path) -> list[Path]:
    """The staging and set-aside folders of ``out_dir`` in its parent (any owner, live or dead)."""
    prefixes = (f".{out_dir.name}{TMP_TAG}", f".{out_dir.name}{OLD_TAG}")
    try:
        return [out_dir.parent / n for n in os.listdir(out_dir.parent) if n.startswith(prefixes)]
    except OSError:
        return []


def clean_stale(out_dir: Path) -> list[Path]:
    """Remove the staging / set-aside folders of ``out_dir`` that no live process owns.

    A folder is stale when its ``flock`` can be taken (its writer died, e.g. ``kill -9``); one whose
    lock is held is left alone. Returns the folders removed.
    """
    removed = []
    for p in _siblings(out_dir):
        try:
            if not stat.S_ISDIR(os.lstat(p).st_mode):
                continue
            with _flocked(p, blocking=False) as fd:
                if fd is None or fcntl is None:
                    continue  # a live writer owns it (or no locks here: never guess)
                same = os.fstat(fd)
                now = os.lstat(p)  # still the folder we locked, not a new one at that name
                if (now.st_dev, now.st_ino) != (same.st_dev, same.st_ino):
                    continue
                shutil.rmtree(p)
                removed.append(p)
        except OSError:
            continue  # gone meanwhile, or not ours to remove: never fail a save over litter
    return removed


def _new_locked_folder(out_dir: Path) -> tuple[Path, int]:
    """``(folder, descriptor)``: a new staging folder of ``out_dir`` and an open descriptor holding
    its ``flock``.

    Between ``mkdtemp`` and ``flock`` a concurrent :func:`clean_stale` can take the new, still
    unlocked folder for a dead writer's and remove it; the folder is then not the one locked (or
    gone), and a new one is made.
    """
    for _ in range(16):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{TMP_TAG}", dir=out_dir.parent))
        try:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            continue
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.lstat(tmp)
        except FileNotFoundError:
            same = None
        held = os.fstat(fd)
        if same is not None and (same.st_dev, same.st_ino) == (held.st_dev, held.st_ino):
            return tmp, fd
        os.close(fd)
    raise OSError(errno.EAGAIN, "staging folders keep disappearing under a concurrent cleaner", str(out_dir.parent))


@contextlib.contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A fresh, locked staging folder beside ``out_dir``; removed if the block raises.

    Stale staging folders of ``out_dir`` are cleaned first (:func:`clean_stale`). The lock is held
    until the block ends, so a concurrent cleaner never takes a folder that is being written.
    """
    clean_stale(out_dir)
    tmp, fd = _new_locked_folder(out_dir)
    try:
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)
        if tmp.exists() and not tmp.is_symlink():  # published: gone; swapped out: the old folder
            shutil.rmtree(tmp, ignore_errors=True)


def _identity(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def publish(tmp: Path, out_dir: Path, *, overwrite: bool, replaceable: Callable[[Path], None]) -> None:
    """Rename the staged folder ``tmp`` to ``out_dir`` (see the module docstring).

    Args:
        tmp: the folder from :func:`staging`, complete and fsynced.
        out_dir: the target (absolute).
        overwrite: replace an existing ``out_dir`` if ``replaceable`` accepts it.
        replaceable: raises :class:`CheckpointError` when ``out_dir`` must not be replaced.

    Raises:
        CheckpointError: ``out_dir`` exists (and ``overwrite`` is off, or ``replaceable`` refuses
            it, or it changed between the check and the swap).
    """
    parent = out_dir.parent
    with _flocked(parent):
        for _ in range(2):  # a target that appears between the two steps is handled by the second pass
            if not os.path.lexists(out_dir):
                try:
                    if _claim_new(tmp, out_dir):
                        fsync_path(parent, directory=True)
                        return
                except FileExistsError:
                    pass
                continue
            if not overwrite:
                raise CheckpointError(f"out_dir: {str(out_dir)!r} already exists; pass overwrite=True to replace it")
            replaceable(out_dir)
            checked = _identity(out_dir)
            if _rename_exchange(tmp, out_dir):
                if _identity(tmp) != checked:  # replaced by someone else between check and swap
                    _rename_exchange(tmp, out_dir)
                    raise CheckpointError(f"out_dir: {str(out_dir)!r} was replaced by another process during the save; not replacing it")
                fsync_path(parent, directory=True)
                return  # tmp holds the old folder now; staging() removes it
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{OLD_TAG}", dir=parent))
            os.rmdir(old)
            os.rename(out_dir, old)
            if _identity(old) != checked:
                os.rename(old, out_dir)
                raise CheckpointError(f"out_dir: {str(out_dir)!r} was replaced by another process during the save; not replacing it")
            os.rename(tmp, out_dir)
            fsync_path(parent, directory=True)
            shutil.rmtree(old, ignore_errors=True)
            return
    raise CheckpointError(f"out_dir: {str(out_dir)!r} keeps changing under another process; not saving")


def _claim_new(tmp: Path, out_dir: Path) -> bool:
    """Rename ``tmp`` to the absent ``out_dir``, failing with ``FileExistsError`` if it appears."""
    if _rename_noreplace(tmp, out_dir):
        return True
    # No renameat2 here: claim the name with an exclusive mkdir, then rename onto that empty claim
    # (POSIX lets a folder replace an empty one; anything put into the claim makes the rename fail).
    os.mkdir(out_dir)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(out_dir)
        raise
    return True
