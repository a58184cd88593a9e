"""Kill-safe writes for exports: stage, verify, then publish under final names.

An export writes into a staging folder inside the output folder (``.bypass_export.staging-<pid>-<random>``).
Nothing gets a final name until it is complete and checked. Publishing moves the staged files into place
one by one, the graph last: the graph's weights live in a file with a new name each time
(``unet.onnx.<id>.data``), so the graph's own rename is the single switch from the old export to the new
one, and a previous export stays whole until that instant. Files with fixed names that are replaced
(``config.json``, an engine) are kept aside until the switch and put back if it fails.

A staging folder left by a killed process (SIGKILL, power loss) is removed by the next export into the
same folder: each live export holds an exclusive ``flock`` on a file in its staging folder, which the
kernel releases when the process dies. Weight files that no graph refers to any more (a kill between
the switch and the removal of the old weights) are removed then too.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import time

try:
    import fcntl
except ImportError:  # Windows: staging folders are recognised by their owner's process id instead
    fcntl = None

STAGING_PREFIX = ".bypass_export.staging-"
_LOCK_NAME = ".lock"
_DATA_PATTERN = r"\.[0-9a-f]{12}\.data"
_DATA_NAME = re.compile(r"(.+)" + _DATA_PATTERN + "$")


def data_name(graph_name: str) -> str:
    """A fresh name for a graph's weight file: ``<graph>.<12 hex digits>.data``."""
    return f"{graph_name}.{secrets.token_hex(6)}.data"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _is_stale(path: str) -> bool:
    """True when no live process owns the staging folder ``path``."""
    lock = os.path.join(path, _LOCK_NAME)
    if fcntl is not None:
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:  # being created right now, or its owner died before locking
            try:
                return time.time() - os.stat(path).st_mtime > 60
            except FileNotFoundError:
                return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its owner holds the lock: alive
        finally:
            os.close(fd)
        return True
    match = re.match(re.escape(STAGING_PREFIX) + r"(\d+)-", os.path.basename(path))
    return match is not None and not _pid_alive(int(match.group(1)))


def clean_stale(folder: str) -> list[str]:
    """Remove staging folders in ``folder`` whose export is no longer running; returns what was removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(folder, name)
        if name.startswith(STAGING_PREFIX) and os.path.isdir(path) and _is_stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def _folder_lock(folder: str):
    """Serialise publishing (and the removal of unreferenced weights) between exports into one folder."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def external_data_files(graph_path: str) -> set[str]:
    """Names of the weight files a graph refers to (empty if it cannot be read)."""
    try:
        import onnx

        model = onnx.load(graph_path, load_external_data=False)
    except Exception:
        return set()
    names = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return names


def data_in_use(folder: str) -> set[str]:
    """The weight files any ONNX graph in ``folder`` refers to: a graph renamed or copied by its user
    keeps the weights file named after its first name, which no export may then remove."""
    used: set[str] = set()
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".onnx") and os.path.isfile(path):
            used |= external_data_files(path)
    return used


def remove_unreferenced_data(folder: str, graph_name: str, in_use: set[str] | None = None) -> list[str]:
    """Remove ``<graph>.<id>.data`` files that no graph in ``folder`` refers to (debris of a kill).
    ``in_use``: ``data_in_use`` of the folder, when the caller has it already."""
    keep = data_in_use(folder) if in_use is None else in_use
    pattern = re.compile(re.escape(graph_name) + _DATA_PATTERN + "$")
    removed = []
    for name in os.listdir(folder):
        if pattern.match(name) and name not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    return removed


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (cheap, atomic); a copy where the file system has none."""
    try:
        os.link(src, dst)
    except (PermissionError, NotImplementedError) as exc:  # e.g. no hard links on this file system
        if os.path.lexists(dst):
            raise FileExistsError(f"{dst!r} exists") from exc
        shutil.copy2(src, dst)


def _move_no_clobber(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (checked atomically where hard links exist)."""
    try:
        os.link(src, dst)
    except (PermissionError, NotImplementedError):
        if os.path.lexists(dst):
            raise FileExistsError(f"{dst!r} exists; pass overwrite=True (CLI: --overwrite) to replace") from None
        os.replace(src, dst)
        return
    os.remove(src)


class Staging:
    """A private folder inside ``folder`` for one export; ``publish`` gives the staged files their final names.

    Use as a context manager: the staging folder is removed on exit, whatever happened.
    """

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        with _folder_lock(self.folder):  # debris of killed exports: staging folders, unreferenced weights
            clean_stale(self.folder)
            graphs = {m.group(1) for m in map(_DATA_NAME.match, os.listdir(self.folder)) if m}
            in_use = data_in_use(self.folder) if graphs else set()  # every graph read once, not once per name
            for graph in graphs:
                remove_unreferenced_data(self.folder, graph, in_use)
        name = f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.path = os.path.join(self.folder, name)
        os.mkdir(self.path, 0o700)
        self._lock_fd = os.open(os.path.join(self.path, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        if fcntl is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def publish(self, names: list[str], *, overwrite: bool, graph: str | None = None) -> list[str]:
        """Move the staged files ``names`` to the output folder, ``graph`` (one of them) last; returns
        their final paths. Without ``overwrite`` an existing target is an error and nothing is moved. On
        any failure the folder is as before: files already moved are taken back, replaced ones restored.
        After the switch, the weight files the previous ``graph`` referred to (and no longer used) go."""
        order = [n for n in names if n != graph] + ([graph] if graph in names else [])
        backup = os.path.join(self.path, ".previous")
        os.makedirs(backup, exist_ok=True)
        with _folder_lock(self.folder):
            if not overwrite:
                existing = [n for n in order if os.path.lexists(os.path.join(self.folder, n))]
                if existing:
                    raise FileExistsError(
                        f"{', '.join(os.path.join(self.folder, n) for n in existing)} "
                        f"{'exists' if len(existing) == 1 else 'exist'}; "
                        "pass overwrite=True (CLI: --overwrite) to replace"
                    )
            old_data = external_data_files(os.path.join(self.folder, graph)) if graph else set()
            done: list[tuple[str, str | None]] = []  # (final path, kept-aside previous file or None)
            try:
                for name in order:
                    target = os.path.join(self.folder, name)
                    kept = None
                    if os.path.lexists(target):
                        if os.path.isdir(target) and not os.path.islink(target):
                            raise IsADirectoryError(f"{target!r} is a folder; remove it or choose another --out")
                        kept = os.path.join(backup, name)
                        _link_or_copy(target, kept)  # the previous file, restored if a later step fails
                    if overwrite:
                        os.replace(self.file(name), target)
                    else:
                        _move_no_clobber(self.file(name), target)  # fails if the name appeared meanwhile
                    done.append((target, kept))
            except BaseException:
                for target, kept in reversed(done):
                    with contextlib.suppress(OSError):
                        if kept is not None:
                            os.replace(kept, target)
                        else:
                            os.remove(target)
                raise
            if graph:
                in_use = data_in_use(self.folder)  # the new graph's, and any other graph's (a user's copy)
                for name in old_data - in_use:
                    if os.path.basename(name) == name:  # only plain names beside the graph
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(os.path.join(self.folder, name))
                remove_unreferenced_data(self.folder, graph, in_use)
        return [os.path.join(self.folder, n) for n in names]
