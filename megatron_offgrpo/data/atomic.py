"""Crash-safe replacement of a dataset's files: the one atomic-write helper of :mod:`megatron_offgrpo.data`, the
journaled multi-file commit, its recovery, and the removal of temporaries that killed writers left behind.

Names. A temporary or backup of a file ``F`` made by process ``PID`` is called ``F.tmp<PID>`` or
``F.tmp<PID>.<more>``: the writer's data files are ``P.tmp<PID>.bin``, ``P.tmp<PID>.ref_logp.idx``, ...; the
atomic-write temporary of ``P.json`` is ``P.json.tmp<PID>``; the backup of ``P.bin`` during a commit is
``P.bin.tmp<PID>.bak``. :func:`remove_stale_temps` relies on that to find the leftovers of dead processes.

Commit protocol (:func:`commit_files`), once every new file is written under a temporary name:

1. fsync every new file: the bytes are on disk before any final name points at them.
2. Write the journal ``P.commit.json`` atomically and exclusively (a second committer of ``P`` fails here): the
   moves (temporary -> final name), a backup name for each destination that exists now (the old manifest
   included), the destinations that have no previous version, the new manifest, and the writer's host and pid.
3. Hard-link every existing destination to its backup name: the old version now survives any rename.
4. Remove the old manifest (a reader that skips recovery sees "no manifest" during the window, never the old
   manifest over new files), rename the new files into place, write the new manifest atomically.
5. Remove the backups, then the journal. (Backups first: a kill in between leaves a journal whose manifest is in
   place, which recovery finishes; the other order could leave orphaned backups that nothing lists.)

Recovery (:func:`recover_commit`) runs in the next writer and in every reader before it reads the manifest: no
journal -> nothing to do; journal of a live process on this host -> :class:`CommitInProgressError`; the journal's
manifest is in place -> finish step 5; otherwise roll back: each backup is renamed over its destination and the
destinations without a previous version are removed. The previous dataset is then back byte for byte (the very
same inodes). Every recovery step is idempotent, so a recovery that is itself killed, or several readers
recovering at once, end in the same state.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from megatron_offgrpo.data.format import (
    PER_TOKEN_ARRAYS,
    DatasetFormatError,
    commit_journal_path,
    manifest_path,
)

logger = logging.getLogger(__name__)

JOURNAL_FORMAT = "megatron-offgrpo-commit"
JOURNAL_VERSION = 1

# Test-only fault injection: when this environment variable equals the name given to kill_point(), the process
# SIGKILLs itself there (tests kill real processes at exact points of a build or a commit).
TEST_KILL_ENV = "MEGATRON_OFFGRPO_TEST_KILL_AT"


class CommitInProgressError(DatasetFormatError):
    """Another live process is committing this prefix now (or one on another host may be)."""


def kill_point(name: str) -> None:
    """SIGKILL this process if ``$MEGATRON_OFFGRPO_TEST_KILL_AT == name`` (tests only; a no-op otherwise)."""
    if os.environ.get(TEST_KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ---- atomic single-file write ----


def fsync_dir(path: str) -> None:
    """fsync a directory so that the renames / links / removals in it survive a power loss (best effort: some
    filesystems refuse to open or sync a directory)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """Flush a written (closed) file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``, never a part.

    Writes ``path.tmp<pid>``, flushes and fsyncs it, moves it into place (``os.replace``), and fsyncs the
    directory. With ``exclusive``, the move is a hard link that fails with :class:`FileExistsError` when ``path``
    exists, so that of two processes creating the same file exactly one wins.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # no hard links on this filesystem: check-then-rename (a race is then possible)
                if os.path.lexists(path):
                    raise FileExistsError(path) from None
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_json(path: str, obj: Any, exclusive: bool = False) -> None:
    """:func:`atomic_write_bytes` of ``obj`` as indented, key-sorted JSON."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"), exclusive=exclusive)


# ---- processes ----


def _proc_start_time(pid: int) -> Optional[str]:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid from the original process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after its closing parenthesis.
    rest = stat[stat.rfind(")") + 2:].split()
    return rest[19] if len(rest) > 19 else None  # field 22 of the full line


def pid_alive(pid: int, start_time: Optional[str] = None) -> bool:
    """Whether process ``pid`` runs on this host (a zombie does not; with ``start_time``, nor a reused pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        if stat[stat.rfind(")") + 2:].split()[:1] == ["Z"]:
            return False
    except OSError:
        pass
    if start_time is not None:
        now = _proc_start_time(pid)
        if now is not None and now != start_time:
            return False
    return True


# ---- journaled commit ----


def _dirs(paths: Iterable[str]) -> List[str]:
    return sorted({os.path.dirname(os.path.abspath(p)) for p in paths})


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.lexists(dst):  # a leftover of an earlier process that had our pid
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:  # no hard links here: a copy is slower but just as good a backup
        # Copied under another name first: a backup that exists is always complete (rollback trusts it).
        part = dst + ".part"
        shutil.copy2(src, part)
        fsync_file(part)
        os.replace(part, dst)


def commit_files(prefix: str, moves: Sequence[Tuple[str, str]], manifest: Mapping[str, Any]) -> None:
    """Rename ``moves`` (temporary -> final path) into place and write ``manifest`` as ``P.json``, such that a
    process killed at any instant leaves either the previous version of every destination or the new one of
    every destination (after :func:`recover_commit`, which the next reader or writer runs).

    An exception inside the commit rolls back at once and is re-raised. Raises :class:`CommitInProgressError`
    when another live process is committing ``prefix``.
    """
    pid = os.getpid()
    jpath, mpath = commit_journal_path(prefix), manifest_path(prefix)
    jdir = os.path.dirname(os.path.abspath(jpath))

    def rel(p: str) -> str:
        # Relative to the journal, so that a dataset directory moved after a kill still recovers.
        return os.path.relpath(os.path.abspath(p), jdir)

    # An earlier killed commit is finished or rolled back before the destinations are looked at: what exists
    # now decides what gets a backup and what is new.
    recover_commit(prefix)
    for src, _ in moves:
        fsync_file(src)
    backups: List[Tuple[str, str]] = []
    created: List[str] = []
    for dst in [d for _, d in moves] + [mpath]:
        if os.path.lexists(dst):
            backups.append((dst, f"{dst}.tmp{pid}.bak"))
        else:
            created.append(dst)
    journal = {
        "format": JOURNAL_FORMAT,
        "version": JOURNAL_VERSION,
        "host": socket.gethostname(),
        "pid": pid,
        "pid_start": _proc_start_time(pid),
        "moves": [[rel(s), rel(d)] for s, d in moves],
        "backups": [[rel(d), rel(b)] for d, b in backups],
        "created": [rel(d) for d in created],
        "manifest": json.loads(json.dumps(manifest)),  # exactly what reading P.json back will give
    }
    try:
        atomic_write_json(jpath, journal, exclusive=True)
    except FileExistsError:
        raise CommitInProgressError(
            f"another process started committing {prefix} at the same time (journal {jpath}); nothing was replaced; "
            "run one build of a prefix at a time"
        ) from None
    kill_point("commit:journal")
    all_dirs = _dirs([jpath, *(d for _, d in moves)])
    try:
        for dst, bak in backups:
            _link_or_copy(dst, bak)
        for d in all_dirs:
            fsync_dir(d)
        kill_point("commit:backups")
        if os.path.lexists(mpath):
            os.remove(mpath)
        for k, (src, dst) in enumerate(moves):
            os.replace(src, dst)
            kill_point(f"commit:rename{k}")
        for d in all_dirs:
            fsync_dir(d)
        atomic_write_json(mpath, journal["manifest"])
        kill_point("commit:manifest")
    except BaseException:
        try:
            _rollback(jpath, journal)
        except Exception as e:  # noqa: BLE001 - the journal stays; the next reader / writer recovers
            logger.error("rolling back the failed commit of %s failed (%s); the next load or build retries", prefix, e)
        raise
    _finish(jpath, journal)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:  # another recovering process got there first
        pass


def _finish(jpath: str, journal: Mapping[str, Any]) -> None:
    """Step 5: the new version is complete; drop the backups, then the journal."""
    jdir = os.path.dirname(os.path.abspath(jpath))
    for _, bak in journal["backups"]:
        _remove(os.path.join(jdir, bak))
    kill_point("commit:backups_removed")
    _remove(jpath)
    fsync_dir(jdir)


def _rollback(jpath: str, journal: Mapping[str, Any]) -> None:
    """Put every destination back as it was before the journal was written; then drop the journal."""
    jdir = os.path.dirname(os.path.abspath(jpath))
    touched = [os.path.join(jdir, d) for d, _ in journal["backups"]] + [os.path.join(jdir, d) for d in journal["created"]]
    for dst, bak in journal["backups"]:
        dst, bak = os.path.join(jdir, dst), os.path.join(jdir, bak)
        if os.path.lexists(bak):
            try:
                os.replace(bak, dst)
            except FileNotFoundError:
                pass
            # rename() of two links to the same inode succeeds without removing the source (POSIX): this is the
            # case when the kill came after the link but before the new file was renamed over dst.
            if os.path.lexists(bak):
                _remove(bak)
    for dst in journal["created"]:
        _remove(os.path.join(jdir, dst))
    for d in _dirs(touched):
        fsync_dir(d)
    _remove(jpath)
    fsync_dir(jdir)


def _read_journal(prefix: str) -> Optional[Dict[str, Any]]:
    jpath = commit_journal_path(prefix)
    try:
        with open(jpath, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        journal = json.loads(text)
    except ValueError as e:
        raise DatasetFormatError(
            f"{jpath}: unreadable commit journal ({e}); it is written atomically, so something else wrote it: "
            "move it away, then check the dataset with megatron_offgrpo.data.verify.verify_dataset"
        ) from None
    if not isinstance(journal, dict) or journal.get("format") != JOURNAL_FORMAT:
        raise DatasetFormatError(f"{jpath}: not a commit journal of this project; move it away")
    return journal


def recover_commit(prefix: str, assume_dead: bool = False) -> Optional[str]:
    """Finish or roll back a commit of ``prefix`` whose writer died (see the module docstring).

    Returns ``None`` when there was no journal, else ``"finished"`` or ``"rolled back"`` (also logged).
    Raises :class:`CommitInProgressError` when the journal's writer is alive on this host, or ran on another host
    (whose processes cannot be checked from here; pass ``assume_dead=True`` once that writer is surely gone).
    """
    journal = _read_journal(prefix)
    if journal is None:
        return None
    jpath = commit_journal_path(prefix)
    pid, host = int(journal["pid"]), journal.get("host")
    if not assume_dead and pid != os.getpid():
        if host == socket.gethostname():
            if pid_alive(pid, journal.get("pid_start")):
                raise CommitInProgressError(
                    f"a build is committing {prefix} now (pid {pid}, journal {jpath}); wait for it to finish, then "
                    "load again"
                )
        else:
            raise CommitInProgressError(
                f"a build on host {host} (pid {pid}) is committing {prefix} now, or was killed there (journal {jpath}); "
                f"wait for it, or load once on {host} to recover; if that writer is surely gone, run "
                f"megatron_offgrpo.data.atomic.recover_commit({prefix!r}, assume_dead=True)"
            )
    if _manifest_in_place(prefix, journal["manifest"]):
        _finish(jpath, journal)
        logger.warning("%s: completed the commit of pid %d, which was killed after writing the manifest", prefix, pid)
        return "finished"
    _rollback(jpath, journal)
    logger.warning("%s: rolled back the commit of pid %d, which was killed before it finished; the previous "
                   "version is in place", prefix, pid)
    return "rolled back"


def _manifest_in_place(prefix: str, manifest: Mapping[str, Any]) -> bool:
    try:
        with open(manifest_path(prefix), encoding="utf-8") as f:
            return json.load(f) == manifest
    except (OSError, ValueError):
        return False


# ---- leftovers of killed writers ----


def _stems(prefix: str) -> List[str]:
    """Every file name of a dataset at ``prefix`` that can have temporaries or backups ``<stem>.tmp<pid>...``."""
    suffixes = [".json", ".commit.json", ".bin", ".idx", ".meta.parquet", ".meta.groups.parquet"]
    suffixes += [f".{a}{s}" for a in PER_TOKEN_ARRAYS for s in (".bin", ".idx")]
    return [prefix] + [prefix + s for s in suffixes]


def remove_stale_temps(prefix: str, extra_paths: Sequence[str] = ()) -> List[str]:
    """Recover an interrupted commit of ``prefix`` (:func:`recover_commit`), then remove the temporaries and
    backups (``<file>.tmp<pid>...``) of ``prefix``'s files and of ``extra_paths`` (e.g. the rejects JSONL) whose
    process is no longer alive on this host. Returns the removed paths (and logs them).

    Files of live processes are kept: another build of the same prefix may be running.
    """
    recover_commit(prefix)
    by_dir: Dict[str, List[str]] = {}
    for stem in [*_stems(prefix), *extra_paths]:
        by_dir.setdefault(os.path.dirname(os.path.abspath(stem)), []).append(os.path.basename(stem))
    removed: List[str] = []
    for d, stems in by_dir.items():
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        pattern = re.compile(r"^(?:%s)\.tmp(\d+)(?:\..+)?$" % "|".join(re.escape(s) for s in stems))
        for name in sorted(names):
            m = pattern.match(name)
            if m is None:
                continue
            pid = int(m.group(1))
            if pid == os.getpid() or pid_alive(pid):
                continue
            path = os.path.join(d, name)
            try:
                size = os.path.getsize(path)
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(path)
            logger.warning("removed %s (%d bytes): left by pid %d, which is no longer running", path, size, pid)
    return removed
