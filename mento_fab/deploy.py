"""Ship an analysis project to every reserved node, atomically: ``releases/`` + ``current``.

Layout on a node: ``<target>/releases/<UTC time>-<hash>/`` and a relative symlink
``<target>/current -> releases/<name>``. A deploy has two phases so that no node
ever runs a mix of old and new files and no node runs a different version:

1. *stage* the release on every node (one archive per node over SFTP, checksum
   verified, unpacked into ``releases/.staging-<name>`` and renamed into place);
2. only when every node has staged, *switch* ``current`` on every node with
   ``ln -s`` to a temporary name and ``mv -T`` (one atomic ``rename(2)``).

If staging fails anywhere, nothing switches and staged releases are removed.

Cheap redeploys: the content hash (sorted paths, types, modes and contents) names
the release, so an unchanged tree is detected by one command per node. When a node
already has a release, only changed files travel; unchanged files are hard-linked
from the current release (never modified in place: tar unlinks before writing).
A target that several nodes share (a cluster home) is detected with nonce files
and staged and switched once.

Token *contents* are never read: ``.mento/beamtime.env`` and ``.mento/beamtime.json``
carry the token file paths as the nodes see them (see :func:`node_path`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import secrets
import shlex
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import fabric
import pathspec

from mento_fab.errors import BadInput, UnsafeSourceError
from mento_fab.metadata import BeamtimeMetadata
from mento_fab.nodes import connection_node
from mento_fab.runner import (
    DEFAULT_FANOUT,
    NodeError,
    NodeResult,
    RunReport,
    describe_error,
    ensure_open,
    execute,
    map_nodes,
)

__all__ = [
    "DEFAULT_EXCLUDES",
    "DEFAULT_KEEP",
    "DeployReport",
    "Entry",
    "NodeReleases",
    "Release",
    "UnsafeSourceError",
    "beamtime_files",
    "build_release",
    "default_target",
    "deploy",
    "node_path",
    "refuse_secrets",
    "releases",
    "rollback",
]

log = logging.getLogger(__name__)

DEFAULT_KEEP = 5
#: Never shipped: VCS data, byte code, our own metadata directory. Virtual
#: environments are also recognised by their ``pyvenv.cfg``.
DEFAULT_EXCLUDES = (".git/", ".hg/", ".svn/", "__pycache__/", ".venv/", ".mento/")
IGNORE_FILE = ".mentoignore"
META_DIR = ".mento"
VENV_DIR = ".venv"
#: Written last when staging: only ready releases are switched to or kept.
READY = f"{META_DIR}/ready"
#: Release directory names: ``<UTC time>-<hash prefix>``.
RELEASE_GLOB = "[0-9]*T[0-9]*Z-*"
CHUNK = 256 * 1024
#: Bound on every short remote command (probe, list, switch, revert): a node that
#: vanishes mid-deploy turns into a "timed out" result instead of a hang.
COMMAND_TIMEOUT = 60.0
#: Removing releases (prune, cleanup of a staged copy) may walk many files.
REMOVE_TIMEOUT = 600.0
#: Staging: a fixed allowance plus the archive at no less than STAGE_MIN_RATE bytes/s
#: (checksum, hard links, unpack); an ``install`` adds INSTALL_TIMEOUT for pip.
STAGE_TIMEOUT = 300.0
STAGE_MIN_RATE = 1_000_000
INSTALL_TIMEOUT = 1800.0
#: Events passed to ``on_event``: (node, event) — for progress and for tests.
EventCallback = Callable[[str, str], None]

_DIR, _FILE, _LINK = "d", "f", "l"


@dataclass(frozen=True)
class Entry:
    """One path of a release: type, permission bits and content digest (or link target)."""

    path: str  # relative, POSIX, as str (surrogate-escaped when not UTF-8)
    kind: str  # "d", "f" or "l"
    mode: int
    digest: str = ""  # sha256 of a file, target of a link, "" for a directory
    size: int = 0
    mtime: float = 0.0
    source: str | None = None  # local file to read; None for generated files
    data: bytes | None = dataclasses.field(default=None, repr=False)  # generated content

    def key(self) -> tuple[str, str, int, str]:
        """What must be equal for a file to be reused from an earlier release."""
        return (self.path, self.kind, self.mode, self.digest)


@dataclass
class Release:
    """A release built from a source tree: its entries, content hash and archives.

    Only the hash is computed eagerly (what a no-op needs); archives are built on
    demand, the full one at most once, deltas once per base release.
    """

    source: Path
    entries: list[Entry]
    content_hash: str
    created: str  # UTC time stamp, part of the name
    install: bool = False
    _archives: dict[str, bytes] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return f"{self.created}-{self.content_hash[:16]}"

    @property
    def files(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == _FILE]

    @property
    def user_files(self) -> list[Entry]:
        """Files from the source tree (without the generated ``.mento/`` ones)."""
        return [e for e in self.files if not _is_meta(e.path)]

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    def manifest(self) -> bytes:
        """The JSON manifest stored in the release; a later deploy diffs against it."""
        doc = {
            "hash": self.content_hash,
            "entries": [[e.path, e.kind, e.mode, e.digest] for e in self.entries],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def archive(self, base: list[list[Any]] | None = None) -> tuple[bytes, list[str]]:
        """A tar archive of what a node with release ``base`` (a manifest) lacks.

        Returns ``(archive, reused)``: ``reused`` are regular files the node hard-links
        from its current release instead of receiving them. ``base=None``: everything.
        """
        old: set[tuple[str, str, int, str]] = set()
        if base is not None:
            old = {(str(p), str(k), int(m), str(d)) for p, k, m, d in base}
        reused = [
            e.path
            for e in self.entries
            if e.kind == _FILE and e.key() in old and not _is_meta(e.path)
        ]
        cache_key = hashlib.sha256("\0".join(reused).encode("utf-8", "surrogateescape")).hexdigest()
        with self._lock:
            if cache_key not in self._archives:
                skip = set(reused)
                self._archives[cache_key] = self._tar(
                    [e for e in self.entries if e.path not in skip]
                )
            return self._archives[cache_key], reused

    def dropped(self, base: list[list[Any]]) -> list[str]:
        """Paths of a hard-linked copy of release ``base`` that this release replaces or lacks.

        Removed before the delta archive is unpacked, so a changed file is never
        written through a hard link into the base release.
        """
        new = {e.key() for e in self.entries}
        dirs = {e.path for e in self.entries if e.kind == _DIR}
        drop = []
        for path, kind, mode, digest in base:
            path = str(path)
            if _is_meta(path):
                continue  # the whole meta directory is replaced
            if kind == _DIR:
                if path not in dirs:
                    drop.append(path)
            elif kind != _FILE or (path, kind, int(mode), str(digest)) not in new:
                drop.append(path)  # links are always re-created from the archive
        return drop

    def _tar(self, entries: Sequence[Entry]) -> bytes:
        buffer = io.BytesIO()
        extra = [
            Entry(
                f"{META_DIR}/content-hash", _FILE, 0o644, data=(self.content_hash + "\n").encode()
            ),
            Entry(f"{META_DIR}/manifest.json", _FILE, 0o644, data=self.manifest()),
        ]
        with tarfile.open(
            fileobj=buffer,
            mode="w",
            format=tarfile.GNU_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tar:
            for entry in [*entries, *extra]:
                info = tarfile.TarInfo(entry.path)
                info.mode = entry.mode
                info.mtime = int(entry.mtime or time.time())
                info.uname = info.gname = ""
                if entry.kind == _DIR:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif entry.kind == _LINK:
                    info.type = tarfile.SYMTYPE
                    info.linkname = entry.digest
                    tar.addfile(info)
                elif entry.data is not None:
                    info.size = len(entry.data)
                    tar.addfile(info, io.BytesIO(entry.data))
                else:
                    assert entry.source is not None
                    with open(entry.source, "rb") as handle:
                        info.size = os.fstat(handle.fileno()).st_size
                        tar.addfile(info, handle)
        return buffer.getvalue()


def _is_meta(path: str) -> bool:
    return path == META_DIR or path.startswith(META_DIR + "/")


def _ignore_spec(source: Path, excludes: Iterable[str]) -> pathspec.PathSpec:
    lines = list(DEFAULT_EXCLUDES)
    ignore_file = source / IGNORE_FILE
    if ignore_file.is_file():
        lines += ignore_file.read_text(encoding="utf-8", errors="replace").splitlines()
    lines += list(excludes)
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _file_digest(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


#: A file whose mtime or ctime is this recent may still change within the same
#: clock tick: its digest is used but not remembered (git's "racy" rule).
RACY_NS = 2_000_000_000


class _DigestCache:
    """Digests of unchanged source files, so a redeploy hashes only what changed.

    Like rsync's quick check, but also keyed by ctime (which no tool can set back)
    and the inode: same (size, mtime, ctime, inode) means same content. Stored per
    source tree under ``$XDG_CACHE_HOME/mento_fab/digests`` (paths and digests
    only), believed only in a directory of ours that nobody else can write;
    ``MENTO_DIGEST_CACHE=0`` turns it off.
    """

    def __init__(self, root: Path) -> None:
        self.file: Path | None = None
        self.known: dict[str, list[Any]] = {}
        self.seen: dict[str, list[Any]] = {}
        if os.environ.get("MENTO_DIGEST_CACHE", "1") in ("0", "", "off", "no"):
            return
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        name = hashlib.sha256(os.fsencode(root)).hexdigest()[:32]
        self.file = Path(base) / "mento_fab" / "digests" / f"{name}.json"
        try:
            info = self.file.parent.stat()
            if info.st_uid == os.geteuid() and not info.st_mode & 0o022:
                known = json.loads(self.file.read_text(encoding="utf-8"))
                self.known = known if isinstance(known, dict) else {}
        except (OSError, ValueError):
            self.known = {}

    def digest(self, rel: str, full: str, st: os.stat_result) -> tuple[str, int]:
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        old = self.known.get(rel)
        if isinstance(old, list) and len(old) == 5 and old[:4] == key and isinstance(old[4], str):
            digest, size = old[4], st.st_size
        else:
            digest, size = _file_digest(full)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS and size == st.st_size:
            self.seen[rel] = [*key, digest]
        return digest, size

    def save(self) -> None:
        if self.file is None or self.seen == self.known:
            return
        try:
            self.file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=".digests-")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.seen, handle)
            os.replace(tmp, self.file)
        except OSError as exc:
            log.debug("digest cache not saved: %s", exc)


def _link_target(root: Path, path: Path, rel: str) -> str:
    """The symlink's target if it stays inside the tree (absolute ones made relative)."""
    target = os.readlink(path)
    parent = os.path.dirname(os.path.join(str(root), rel))
    resolved = os.path.normpath(os.path.join(parent, target))
    if os.path.commonpath([str(root), resolved]) != str(root):
        raise UnsafeSourceError(
            f"{root / rel}: symlink points outside the source tree ({target}); "
            "copy what it points to into the tree or exclude it"
        )
    if os.path.isabs(target):
        target = os.path.relpath(resolved, parent)
    return target


def build_release(
    source: str | os.PathLike[str],
    excludes: Iterable[str] = (),
    *,
    extra_files: dict[str, bytes] | None = None,
    install: bool = False,
) -> Release:
    """Scan ``source`` into a :class:`Release` (hash now, archives later).

    ``excludes`` are gitignore patterns added to the defaults and ``.mentoignore``.
    ``extra_files`` (``.mento/...`` paths) are generated files shipped with mode 0600,
    part of the hash. Symlinks are kept as links when they stay inside the tree and
    refused otherwise; sockets, FIFOs and devices are skipped.
    """
    root = Path(source).expanduser()
    if not root.is_dir():
        raise BadInput(f"source is not a directory: {root}")
    root = root.resolve()
    spec = _ignore_spec(root, excludes)
    digests = _DigestCache(root)
    entries: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        kept_dirs = []
        for name in sorted(dirnames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            full = Path(dirpath, name)
            if full.is_symlink():  # os.walk lists links to directories as dirnames
                filenames.append(name)
                continue
            if spec.match_file(rel + "/") or (full / "pyvenv.cfg").is_file():
                log.debug("excluded directory %s", rel)
                continue
            kept_dirs.append(name)
            st = full.lstat()
            entries.append(Entry(rel, _DIR, stat.S_IMODE(st.st_mode), mtime=st.st_mtime))
        dirnames[:] = kept_dirs
        for name in sorted(filenames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            full = Path(dirpath, name)
            if spec.match_file(rel):
                log.debug("excluded file %s", rel)
                continue
            st = full.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                entries.append(Entry(rel, _LINK, 0o777, _link_target(root, full, rel)))
            elif stat.S_ISREG(st.st_mode):
                digest, size = digests.digest(rel, str(full), st)
                entries.append(Entry(rel, _FILE, mode, digest, size, st.st_mtime, source=str(full)))
            else:
                log.warning("skipping %s: not a regular file, directory or symlink", rel)
    digests.save()
    for rel, data in sorted((extra_files or {}).items()):
        if not _is_meta(rel):
            raise BadInput(f"generated files must live under {META_DIR}/: {rel}")
        if not any(e.path == META_DIR for e in entries):
            entries.append(Entry(META_DIR, _DIR, 0o700))
        entries.append(
            Entry(rel, _FILE, 0o600, hashlib.sha256(data).hexdigest(), len(data), data=data)
        )
    entries.sort(key=lambda e: e.path.encode("utf-8", "surrogateescape"))
    digest = hashlib.sha256(b"mento-release-1\n")
    if install:
        digest.update(b"install\n")
    for e in entries:
        digest.update(
            f"{e.path}\0{e.kind}\0{e.mode:o}\0{e.digest}\n".encode("utf-8", "surrogateescape")
        )
    now = time.time()  # milliseconds: names sort by time even for quick redeploys
    created = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    return Release(root, entries, digest.hexdigest(), created, install)


# --------------------------------------------------------------- beamtime files


def node_path(path: str, session_root: str | os.PathLike[str] | None, blfs: str | None) -> str:
    """Where a session file (a token file) is seen on the nodes.

    Decision: the beamline filesystem's session directory (the directory of the
    metadata file) is what the nodes see at ``blfs_mountpoint``, so
    ``<session root>/shared/asapo-token.txt`` becomes
    ``<blfs_mountpoint>/shared/asapo-token.txt``. Paths outside the session root
    (e.g. on the core filesystem, already visible on the cluster) stay as they are.
    """
    if not session_root or not blfs:
        return path
    root = os.path.abspath(session_root)
    absolute = os.path.abspath(path)
    if os.path.commonpath([root, absolute]) != root:
        return path
    rel = os.path.relpath(absolute, root)
    return str(PurePosixPath(blfs) / rel) if rel != "." else blfs


def beamtime_files(
    md: BeamtimeMetadata, session_root: str | os.PathLike[str] | None = None
) -> dict[str, bytes]:
    """``.mento/beamtime.env`` and ``.mento/beamtime.json`` for a release: no secrets.

    Token values are file paths as the nodes see them; their contents are never read.
    """
    online, asapo = md.online, md.asapo
    blfs = online.blfs_mountpoint if online else None
    values: dict[str, str | None] = {
        "beamline": md.beamline,
        "beamtime": md.beamtime,
        "tag": md.tag,
        "core_path": md.corefs_path,
        "blfs_mountpoint": blfs,
        "partition": online.slurm.partition if online else None,
        "reservation": online.slurm.reservation if online else None,
        "asapo_endpoint": asapo.endpoint if asapo else None,
        "asapo_token_ro_file": node_path(asapo.token_ro, session_root, blfs) if asapo else None,
        "asapo_token_rw_file": node_path(asapo.token_rw, session_root, blfs) if asapo else None,
    }
    env_lines = ["# written by mento_fab deploy: source it; token values are file paths"]
    for key, value in values.items():
        env_lines.append(f"MENTO_{key.upper()}={shlex.quote(value or '')}")
    return {
        f"{META_DIR}/beamtime.env": ("\n".join(env_lines) + "\n").encode(),
        f"{META_DIR}/beamtime.json": (json.dumps(values, indent=2) + "\n").encode(),
    }


def _secret_files(md: BeamtimeMetadata) -> dict[str, str]:
    """The beamtime's secret files (real path -> what it is), from the metadata."""
    named: list[tuple[str, str]] = []
    if md.online is not None:
        named.append((md.online.ssh.key, "the SSH private key"))
    if md.asapo is not None:
        named += [(md.asapo.token_ro, "an ASAPO token"), (md.asapo.token_rw, "an ASAPO token")]
    return {os.path.realpath(path): what for path, what in named if path}


def refuse_secrets(release: Release, md: BeamtimeMetadata) -> None:
    """Raise :class:`UnsafeSourceError` if ``release`` would ship a secret of ``md``.

    Files written by the tool must never hold a key or token (run from the session
    directory, ``shared/id_rsa`` would be in the tree): refused by real path, and by
    content digest for copies elsewhere in the tree. The message names the file only.
    """
    secret = _secret_files(md)
    digests: dict[str, str] = {}
    sizes: set[int] | None = set()  # None: some secret unreadable, compare every path
    for path, what in secret.items():
        try:
            digest, size = _file_digest(path)
        except OSError:
            sizes = None  # unreadable here: the path comparison still applies
            continue
        if sizes is not None:
            sizes.add(size)
        if size:  # an empty token would match every empty file
            digests.setdefault(digest, f"{what} ({path})")
    for entry in release.files:
        if entry.source is None:
            continue
        # The secret itself has the secret's size: resolve only those paths
        # (realpath of every file of a large tree costs more than its hashing).
        if sizes is not None and entry.size not in sizes:
            real = None
        else:
            real = os.path.realpath(entry.source)
        if real in secret:
            raise UnsafeSourceError(
                f"{entry.source}: refusing to ship {secret[real]}; exclude it or deploy "
                "from a directory without it"
            )
        if entry.digest in digests:
            raise UnsafeSourceError(
                f"{entry.source}: same content as {digests[entry.digest]}; refusing to ship it"
            )


def default_target(md: BeamtimeMetadata) -> str:
    """``~/mento_fab/<beamtime id>`` in the temporary account's home."""
    return f"~/mento_fab/{md.beamtime}"


def _remote_dir(target: str) -> str:
    """A target as the remote shell and SFTP take it: ``~/x`` becomes ``x`` (home-relative)."""
    target = target.strip()
    if not target:
        raise BadInput("target directory must not be empty")
    if target in ("~", "~/"):
        raise BadInput("target must be a directory below the home, not the home itself")
    if target.startswith("~/"):
        target = target[2:]
    elif target.startswith("~"):
        raise BadInput(f"target {target!r}: only ~/ (the account's own home) is supported")
    target = target.rstrip("/") or "/"
    if target == "/":
        raise BadInput("target must not be /")
    return target


# ----------------------------------------------------------------------- reports


@dataclass
class DeployReport:
    """What a deploy (or rollback) did, per node; ``run`` has the shared per-node shape."""

    action: str  # "deploy" | "rollback"
    outcome: str  # "switched", "unchanged", "aborted", "dry-run"
    target: str
    release: str | None
    content_hash: str | None
    run: RunReport
    shared: list[list[str]] = field(default_factory=list)  # nodes sharing one target directory
    details: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.run.ok

    @property
    def exit_status(self) -> int:
        return self.run.exit_status

    def json_extra(self) -> dict[str, Any]:
        """The operation's own keys for :func:`mento_fab.report.to_json`."""
        return {
            "action": self.action,
            "outcome": self.outcome,
            "target": self.target,
            "release": self.release,
            "content_hash": self.content_hash,
            "shared": self.shared,
            "details": self.details,
        }


@dataclass
class NodeReleases:
    """The releases one node has (oldest first) and the one ``current`` points at."""

    node: str
    current: str | None
    releases: list[str]
    error: str | None = None


# ----------------------------------------------------------------------- helpers


def _check(result: NodeResult, what: str) -> NodeResult:
    """Raise a one-line NodeError unless the command succeeded."""
    if result.error:
        raise NodeError(result.error)
    if result.exit != 0:
        lines = [x for x in result.stderr.strip().splitlines() if "previous errors" not in x]
        detail = "; ".join(lines[-3:]) or f"exit {result.exit}"
        raise _CommandFailed(f"{what} failed: {detail}", result)
    return result


class _CommandFailed(NodeError):
    def __init__(self, message: str, result: NodeResult) -> None:
        super().__init__(message)
        self.result = result


def _upload(sftp: Any, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` with pipelined SFTP writes (one round trip at close)."""
    view = memoryview(data)
    with sftp.open(path, "wb") as handle:
        handle.set_pipelined(True)
        for start in range(0, len(view), CHUNK):
            handle.write(view[start : start + CHUNK])


def _probe_command(target: str) -> str:
    t = shlex.quote(target)
    return (
        f'printf "link=%s\\nhash=%s\\n" "$(readlink -- {t}/current 2>/dev/null)" '
        f'"$(cat -- {t}/current/{META_DIR}/content-hash 2>/dev/null)"'
    )


def _parse_probe(text: str) -> tuple[str, str]:
    values = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
    return values.get("link", ""), values.get("hash", "")


def _switch_command(target: str, release_dir: str, tmp: str) -> str:
    """Point ``current`` at ``releases/<name>`` with one rename; refuse a missing release.

    ``release_dir`` may come from a node's ``readlink`` (a revert): quoted whole,
    message included, never spliced into another quoted string.
    """
    t = shlex.quote(target)
    link = shlex.quote(release_dir)
    tmp_q = shlex.quote(f"{target}/{tmp}")
    missing = shlex.quote(f"release {release_dir} missing")
    return (
        f"test -d {t}/{link} || {{ echo {missing} >&2; exit 3; }}; "
        f"ln -sfn -- {link} {tmp_q} && mv -T -- {tmp_q} {t}/current"
    )


def _prune_command(target: str, keep: int, nonces: Iterable[str]) -> str:
    """Remove all but the newest ``keep`` releases before ``current`` (never ``current``).

    Also removes every nonce file: this run's, and those a node that died during an
    earlier run left behind (one deploy per target at a time is assumed).
    """
    t = shlex.quote(target)
    removals = " ".join(shlex.quote(f"{target}/releases/{n}") for n in nonces)
    cleanup = f"rm -f -- {removals}; " if removals else ""
    return (
        f"{cleanup}cd -- {t}/releases || exit 0; rm -f -- .probe-*; "
        "cur=$(readlink ../current); cur=${cur##*/}; seen=0; n=0; rc=0; "
        f"for d in $(ls -1r | grep -E '^[0-9]{{8}}T[0-9]{{6}}([.][0-9]+)?Z-[0-9a-f]+$'); do "
        'if [ "$d" = "$cur" ]; then seen=1; continue; fi; '
        "[ $seen = 1 ] || continue; "  # newer than current (after a rollback): keep
        f'n=$((n+1)); if [ $n -gt {int(keep)} ]; then rm -rf -- "$d" || rc=1; fi; done; '
        "exit $rc"
    )


def _stage_command(
    target: str,
    release: Release,
    checksum: str,
    base: str | None,
    install: bool,
    pip_args: Sequence[str],
    system_site_packages: bool = False,
) -> str:
    """The one command that verifies, unpacks, links, installs and marks a release ready.

    Files are unpacked into ``.staging-<name>`` and renamed to ``<name>``; a venv is
    built after the rename (its scripts hold absolute paths). Only a release with
    ``.mento/ready`` counts: a node that dies half-way leaves nothing a rollback or
    the next deploy would use, and the next stage removes such leftovers.
    """
    name = release.name
    lines = [
        "set -e",
        f"cd -- {shlex.quote(f'{target}/releases')}",
        # Names live in shell variables, so the trap below (itself a quoted string)
        # holds only variable references, never a quoted value.
        f"stage={shlex.quote(f'.staging-{name}')}",
        f"tarball={shlex.quote(f'.{name}.tar')}",
        f"drop={shlex.quote(f'.{name}.drop')}",
        f"final={shlex.quote(name)}",
        "ok=0",
        """trap 'rm -rf -- "$stage" "$tarball" "$drop"; [ $ok = 1 ] || rm -rf -- "$final"' EXIT""",
        # leftovers of earlier runs that died half-way (never the current release)
        "cur=$(readlink ../current || true); cur=${cur##*/}",
        f'for old in .staging-* {RELEASE_GLOB}; do case "$old" in "$stage"|"$cur") continue;; '
        f'esac; [ -e "$old/{READY}" ] || rm -rf -- "$old"; done',
        'sum=$(openssl dgst -sha256 -r -- "$tarball" 2>/dev/null || sha256sum -- "$tarball")',
        f'[ "${{sum%% *}}" = {shlex.quote(checksum)} ] || '
        '{ echo "checksum mismatch after upload" >&2; exit 3; }',
        'mkdir -- "$stage"',
    ]
    if base:
        # Hard-link the whole base release (one cp, about twice as fast as linking
        # the reused files one by one), then remove what the new release replaces
        # or lacks; its meta files and virtual environment are never carried over.
        lines += [
            f"base={shlex.quote(base)}",
            "set --",
            'for f in "$base"/* "$base"/.[!.]* "$base"/..?*; do',
            f'  case "${{f##*/}}" in {META_DIR}|{VENV_DIR}) continue;; esac',
            '  if [ -e "$f" ] || [ -L "$f" ]; then set -- "$@" "$f"; fi',
            "done",
            'if [ $# -gt 0 ]; then cp -al -- "$@" "$stage/"; fi',
            '(cd -- "$stage" && xargs -0 -r rm -rf -- < "../$drop")',
        ]
    lines.append('tar -x -p --no-same-owner -f "$tarball" -C "$stage"')
    lines.append('mv -T -- "$stage" "$final"')
    if install:
        pip = " ".join(shlex.quote(a) for a in pip_args)
        venv_opts = "--system-site-packages " if system_site_packages else ""
        lines += [
            '(cd -- "$final"',  # a subshell: the EXIT trap's paths stay right
            "if [ -f requirements.txt ] || [ -f pyproject.toml ] || [ -f setup.py ]; then",
            f"  python3 -m venv {venv_opts}{VENV_DIR} >&2",
            "  export PIP_DISABLE_PIP_VERSION_CHECK=1",
            f"  if [ -f requirements.txt ]; then {VENV_DIR}/bin/pip install -q {pip} "
            "-r requirements.txt >&2; fi",
            "  if [ -f pyproject.toml ] || [ -f setup.py ]; then "
            f"{VENV_DIR}/bin/pip install -q {pip} . >&2; fi",
            "fi)",
        ]
    lines += [f': > "$final/{READY}"', "ok=1"]
    return "\n".join(lines)


# ------------------------------------------------------------------------ deploy


def _stage_timeout(size: int, install: bool) -> float:
    """Seconds a stage command may take: generous, but bounded (a vanished node)."""
    seconds = STAGE_TIMEOUT + size / STAGE_MIN_RATE
    return seconds + INSTALL_TIMEOUT if install else seconds


def _result(node: str, value: Any, start: float, stdout: str = "") -> NodeResult:
    """A NodeResult from a map_nodes value (exception or message)."""
    seconds = time.monotonic() - start
    if isinstance(value, _CommandFailed):
        return NodeResult(node, value.result.exit, stdout, str(value), None, seconds)
    if isinstance(value, BaseException):
        return NodeResult(node, None, stdout, "", describe_error(value), seconds)
    return NodeResult(node, 0, stdout or str(value or ""), "", None, seconds)


def _shared_groups(
    conns: list[fabric.Connection], target: str, fanout: int
) -> tuple[list[list[fabric.Connection]], dict[str, BaseException], list[str]]:
    """Group nodes that see the same target directory (a cluster home) by nonce files.

    Every node writes its own nonce file, then every node lists which it sees: two
    parallel round trips however many nodes there are.
    """
    run_id = secrets.token_hex(6)
    nonce = {connection_node(c): f".probe-{run_id}-{i}" for i, c in enumerate(conns)}
    t = shlex.quote(target)

    def write(conn: fabric.Connection) -> None:
        path = shlex.quote(f"{target}/releases/{nonce[connection_node(conn)]}")
        command = f"mkdir -p -- {t}/releases && : > {path}"
        _check(execute(conn, command, timeout=COMMAND_TIMEOUT), "creating the target")

    errors: dict[str, BaseException] = {}
    for node, value in map_nodes(conns, write, fanout=fanout).items():
        if isinstance(value, BaseException):
            errors[node] = value
    alive = [c for c in conns if connection_node(c) not in errors]

    def look(conn: fabric.Connection) -> frozenset[str]:
        pattern = shlex.quote(f"{target}/releases/") + f".probe-{run_id}-*"
        command = f'for f in {pattern}; do echo "${{f##*/}}"; done'
        res = _check(execute(conn, command, timeout=COMMAND_TIMEOUT), "probe")
        return frozenset(line for line in res.stdout.split() if line.startswith(".probe-"))

    seen: dict[frozenset[str], list[fabric.Connection]] = {}
    looked = map_nodes(alive, look, fanout=fanout)
    for conn, (node, value) in zip(alive, looked.items(), strict=True):
        if isinstance(value, BaseException):
            errors[node] = value
            continue
        key = value if nonce[node] in value else frozenset({nonce[node]})
        seen.setdefault(key, []).append(conn)
    return list(seen.values()), errors, list(nonce.values())


def deploy(
    group: Iterable[fabric.Connection],
    md: BeamtimeMetadata,
    source: str | os.PathLike[str] = ".",
    target: str | None = None,
    *,
    excludes: Iterable[str] = (),
    session_root: str | os.PathLike[str] | None = None,
    install: bool = False,
    pip_args: Sequence[str] = (),
    system_site_packages: bool = False,
    keep: int = DEFAULT_KEEP,
    dry_run: bool = False,
    fanout: int = DEFAULT_FANOUT,
    on_event: EventCallback | None = None,
    release: Release | None = None,
) -> DeployReport:
    """Deploy ``source`` to ``target`` on every node of ``group``; two-phase, all or none.

    ``session_root`` (the metadata file's directory) lets token paths be translated
    to what the nodes see. ``install`` builds ``.venv`` in the release from
    ``requirements.txt``/``pyproject.toml`` with ``pip install <pip_args>`` (e.g.
    ``--no-index --find-links DIR``) before the switch; ``system_site_packages``
    lets the venv see the node's own packages (e.g. setuptools + wheel for
    ``--no-build-isolation`` builds without network). ``on_event(node, event)``
    is called with ``probed``, ``staging``, ``staged``, ``switched``.
    Never raises for a node's failure; raises :class:`DeployError` for bad input.
    """
    start = time.monotonic()
    if keep < 0:
        raise BadInput("--keep must be 0 or more")
    target_label = target or default_target(md)
    remote = _remote_dir(target_label)
    conns = list(group)
    if release is None:
        release = build_release(
            source, excludes, extra_files=beamtime_files(md, session_root), install=install
        )
    refuse_secrets(release, md)
    log.info(
        "release %s: %d files, %d bytes from %s",
        release.name,
        len(release.files),
        release.size,
        release.source,
    )
    event = on_event or (lambda node, what: None)

    def finish(outcome: str, results: dict[str, NodeResult], **kw: Any) -> DeployReport:
        run = RunReport(
            command=f"deploy {release.name} to {target_label}",
            results=[results[connection_node(c)] for c in conns],
            seconds=time.monotonic() - start,
        )
        return DeployReport(
            "deploy", outcome, target_label, release.name, release.content_hash, run, **kw
        )

    # Phase 0: one read-only command per node: what is current there?
    probe_start = time.monotonic()
    probed = map_nodes(
        conns, lambda c: execute(c, _probe_command(remote), timeout=COMMAND_TIMEOUT), fanout=fanout
    )
    results: dict[str, NodeResult] = {}
    current: dict[str, tuple[str, str]] = {}
    for node, value in probed.items():
        res = value if isinstance(value, NodeResult) else _result(node, value, probe_start)
        if res.ok:
            current[node] = _parse_probe(res.stdout)
            event(node, "probed")
        else:
            results[node] = dataclasses.replace(res, stdout="", stderr=res.stderr)
    unchanged = {n for n, (_, h) in current.items() if h == release.content_hash}
    for node in unchanged:
        results[node] = NodeResult(node, 0, f"unchanged: already at {current[node][0]}", "")
    details: dict[str, dict[str, Any]] = {
        n: {"state": "unchanged", "current": current[n][0]} for n in unchanged
    }
    unreachable = sorted(n for n, r in results.items() if not r.ok)
    if len(results) == len(conns) or (unreachable and not dry_run):
        # Nothing to do, or a node we cannot reach: then no node may switch.
        for node in unreachable:
            details[node] = {"state": "failed"}
        for conn in conns:
            node = connection_node(conn)
            if node not in results:
                results[node] = NodeResult(
                    node, 0, f"not staged: {', '.join(unreachable)} failed", ""
                )
                details[node] = {"state": "aborted"}
        return finish("aborted" if unreachable else "unchanged", results, details=details)
    todo = [c for c in conns if connection_node(c) not in results]

    if dry_run:

        def plan(conn: fabric.Connection) -> str:
            node = connection_node(conn)
            base = _read_manifest(conn, remote) if current[node][0] else None
            data, reused = release.archive(base)
            details[node] = {"state": "dry-run", "bytes": len(data), "reused": len(reused)}
            return (
                f"would send {len(data)} bytes ({len(release.user_files) - len(reused)} files, "
                f"{len(reused)} reused) to {target_label}/releases/{release.name}"
            )

        plan_start = time.monotonic()
        for node, value in map_nodes(todo, plan, fanout=fanout).items():
            results[node] = _result(node, value, plan_start)
        outcome = "dry-run" if all(r.ok for r in results.values()) else "aborted"
        return finish(outcome, results, details=details)

    # Which nodes share one target directory: stage and switch once per group.
    groups, errors, nonces = _shared_groups(todo, remote, fanout)
    for node, exc in errors.items():
        results[node] = _result(node, exc, start)
    reps = [g[0] for g in groups]
    members = {connection_node(g[0]): [connection_node(c) for c in g] for g in groups}
    shared = [m for m in members.values() if len(m) > 1]

    # Phase 1: stage on one node per group.
    def stage(conn: fabric.Connection) -> str:
        node = connection_node(conn)
        event(node, "staging")
        link, _ = current[node]
        base_manifest = _read_manifest(conn, remote) if link else None
        data, reused = release.archive(base_manifest)
        base_dir = link.rsplit("/", 1)[-1] if base_manifest is not None and reused else None
        sftp = ensure_open(conn).open_sftp_client()
        # A stalled transfer (vanished node) raises instead of waiting forever.
        sftp.get_channel().settimeout(COMMAND_TIMEOUT)
        try:
            _upload(sftp, f"{remote}/releases/.{release.name}.tar", data)
            if base_dir:
                drop = release.dropped(base_manifest or [])
                listing = b"\0".join(p.encode("utf-8", "surrogateescape") for p in drop)
                _upload(sftp, f"{remote}/releases/.{release.name}.drop", listing)
        finally:
            sftp.close()
        checksum = hashlib.sha256(data).hexdigest()
        command = _stage_command(
            remote, release, checksum, base_dir, install, pip_args, system_site_packages
        )
        _check(execute(conn, command, timeout=_stage_timeout(len(data), install)), "staging")
        event(node, "staged")
        details[node] = {
            "state": "staged",
            "bytes": len(data),
            "sent_files": len(release.user_files) - len(reused),
            "reused": len(reused),
            "base": link or None,
        }
        return f"staged {len(data)} bytes ({len(reused)} files reused)"

    stage_start = time.monotonic()
    staged = map_nodes(reps, stage, fanout=fanout) if not errors else {}
    failed = [n for n, v in staged.items() if isinstance(v, BaseException)]
    if errors or failed:
        # Nothing switches anywhere; remove what was staged (the failed ones clean
        # up after themselves; a dead node's leftovers go with its next deploy).
        # Clean up wherever the connection still works (after a failed command too).
        def reachable(conn: fabric.Connection) -> bool:
            value = staged.get(connection_node(conn))
            return not isinstance(value, BaseException) or isinstance(value, _CommandFailed)

        staged_dir = shlex.quote(f"{remote}/releases/{release.name}")
        nonce_files = " ".join(shlex.quote(f"{remote}/releases/{n}") for n in nonces)
        cleanup = f"rm -rf -- {staged_dir} {nonce_files}"
        map_nodes(
            [c for c in reps if reachable(c)],
            lambda c: execute(c, cleanup, timeout=REMOVE_TIMEOUT),
            fanout=fanout,
        )
        blame = sorted(set(failed) | set(errors))
        for rep in reps:
            node = connection_node(rep)
            for member in members[node]:
                if node in failed:
                    value = staged[node]
                    res = _result(member, value, stage_start)
                elif node in staged:
                    res = NodeResult(
                        member, 0, f"staged, then removed: not switched ({', '.join(blame)} failed)"
                    )
                else:
                    res = NodeResult(member, 0, "not staged: another node failed")
                results.setdefault(member, res)
                details.setdefault(member, {}).update(state="aborted")
        for node in errors:
            details.setdefault(node, {}).update(state="failed")
        for node in failed:
            for member in members[node]:
                details.setdefault(member, {}).update(state="failed")
        log.warning("deploy aborted: staging failed on %s", ", ".join(blame))
        return finish("aborted", results, shared=shared, details=details)

    # Phase 2: every group staged: switch everywhere. Nothing is pruned yet, so a
    # failure anywhere can still switch every other node back to what it had.
    tmp = f".current-{secrets.token_hex(6)}"

    def switch(conn: fabric.Connection) -> None:
        command = _switch_command(remote, f"releases/{release.name}", tmp)
        _check(execute(conn, command, timeout=COMMAND_TIMEOUT), "switching current")
        event(connection_node(conn), "switched")

    switch_start = time.monotonic()
    switched = map_nodes(reps, switch, fanout=fanout)
    bad = [n for n, v in switched.items() if isinstance(v, BaseException)]
    stuck = _revert(reps, remote, current, bad, fanout) if bad else {}

    # Phase 3: every node is on the new release: prune. A failure leaves an old
    # release behind, a warning only: the nodes are consistent either way.
    warnings: dict[str, str] = {}
    if not bad:
        prune_command = _prune_command(remote, keep, nonces)

        def prune(conn: fabric.Connection) -> None:
            _check(execute(conn, prune_command, timeout=REMOVE_TIMEOUT), "pruning old releases")

        for node, value in map_nodes(reps, prune, fanout=fanout).items():
            if isinstance(value, BaseException):
                warnings[node] = f"warning: {describe_error(value)}"
                log.warning("%s: %s", node, warnings[node])

    for rep in reps:
        node = connection_node(rep)
        for member in members[node]:
            if node in bad:
                results[member] = _result(member, switched[node], switch_start)
                details.setdefault(member, dict(details[node])).update(state="failed")
            elif node in stuck:
                # Still on the new release while the others went back: a failure.
                results[member] = _result(member, stuck[node], switch_start)
                details.setdefault(member, dict(details[node])).update(
                    state="failed", current=f"releases/{release.name}"
                )
            elif bad:
                results[member] = NodeResult(member, 0, "switched back: another node failed")
                details.setdefault(member, dict(details[node])).update(state="reverted")
            else:
                note = "" if member == node else f" (shared with {node})"
                results[member] = NodeResult(
                    member, 0, f"switched to {release.name}{note}", warnings.get(node, ""), None,
                    time.monotonic() - start,
                )  # fmt: skip
                details.setdefault(member, dict(details[node])).update(state="switched")
                if member != node:
                    details[member]["shared_with"] = node
                if node in warnings:
                    details[member]["warning"] = warnings[node]
    return finish("aborted" if bad else "switched", results, shared=shared, details=details)


def _revert(
    reps: list[fabric.Connection],
    remote: str,
    current: dict[str, tuple[str, str]],
    bad: list[str],
    fanout: int,
) -> dict[str, BaseException]:
    """Switch nodes that did switch back to what they had, so no node runs a mix.

    Returns the nodes that could not be switched back (node -> why): the caller must
    report them as failed, they are still on the new release.
    """
    tmp = f".current-{secrets.token_hex(6)}"

    def back(conn: fabric.Connection) -> None:
        link = current[connection_node(conn)][0]
        if link:
            command = _switch_command(remote, link, tmp)
        else:
            command = f"rm -f -- {shlex.quote(remote + '/current')}"
        _check(execute(conn, command, timeout=COMMAND_TIMEOUT), "switching back")

    done = map_nodes([c for c in reps if connection_node(c) not in bad], back, fanout=fanout)
    stuck = {n: v for n, v in done.items() if isinstance(v, BaseException)}
    for node, exc in stuck.items():
        log.warning("%s: could not switch back: %s", node, describe_error(exc))
    return stuck


def _read_manifest(conn: fabric.Connection, remote: str) -> list[list[Any]] | None:
    """The entries of the node's current release, or None (then everything is sent)."""
    path = f"{remote}/current/{META_DIR}/manifest.json"
    res = execute(conn, f"cat -- {shlex.quote(path)} 2>/dev/null", timeout=COMMAND_TIMEOUT)
    if not res.ok:
        if res.error:
            raise NodeError(res.error)
        return None
    try:
        doc = json.loads(res.stdout)
        entries = doc["entries"]
        return [list(e) for e in entries if isinstance(e, list) and len(e) == 4]
    except (ValueError, KeyError, TypeError):
        log.warning("%s: unreadable manifest in the current release", connection_node(conn))
        return None


# --------------------------------------------------------------------- rollback


def _list_command(remote: str) -> str:
    t = shlex.quote(remote)
    return (
        f'printf "link=%s\\n" "$(readlink -- {t}/current 2>/dev/null)"; '
        f'for d in {t}/releases/{RELEASE_GLOB}; do [ -e "$d/{READY}" ] && '
        'printf "%s\\n" "${d##*/}"; done; true'
    )


def releases(
    group: Iterable[fabric.Connection],
    md: BeamtimeMetadata,
    target: str | None = None,
    *,
    fanout: int = DEFAULT_FANOUT,
) -> tuple[RunReport, dict[str, NodeReleases]]:
    """What each node has under ``target``: releases (oldest first) and the current one."""
    start = time.monotonic()
    remote = _remote_dir(target or default_target(md))
    conns = list(group)
    outcome = map_nodes(
        conns, lambda c: execute(c, _list_command(remote), timeout=COMMAND_TIMEOUT), fanout=fanout
    )
    found: dict[str, NodeReleases] = {}
    results = []
    for node, value in outcome.items():
        res = value if isinstance(value, NodeResult) else _result(node, value, start)
        results.append(res)
        if not res.ok:
            found[node] = NodeReleases(node, None, [], res.error or res.stderr.strip())
            continue
        lines = res.stdout.splitlines()
        link = lines[0].partition("=")[2] if lines else ""
        found[node] = NodeReleases(node, link.rsplit("/", 1)[-1] or None, sorted(lines[1:]))
    run = RunReport(f"releases {target or default_target(md)}", results, time.monotonic() - start)
    return run, found


def rollback(
    group: Iterable[fabric.Connection],
    md: BeamtimeMetadata,
    target: str | None = None,
    *,
    to: str | None = None,
    fanout: int = DEFAULT_FANOUT,
) -> DeployReport:
    """Switch every node back to the release before ``current`` (or to release ``to``).

    Two-phase like a deploy: first every node must have the same release to go to
    (same content hash); only then does any node switch.
    """
    start = time.monotonic()
    label = target or default_target(md)
    remote = _remote_dir(label)
    conns = list(group)
    listing, found = releases(conns, md, target, fanout=fanout)
    results: dict[str, NodeResult] = {}
    choice: dict[str, str] = {}
    for res in listing.results:
        node = res.node
        info = found[node]
        if not res.ok:
            results[node] = dataclasses.replace(res, stdout="")
            continue
        if to is not None:
            if to not in info.releases:
                results[node] = NodeResult(node, 1, "", f"no release {to} here", None)
                continue
            choice[node] = to
            continue
        if info.current is None or info.current not in info.releases:
            results[node] = NodeResult(node, 1, "", "nothing to roll back: no current release")
            continue
        older = [r for r in info.releases if r < info.current]
        if not older:
            results[node] = NodeResult(node, 1, "", f"no release before {info.current}")
            continue
        choice[node] = older[-1]
    hashes = {name.rsplit("-", 1)[-1] for name in choice.values()}
    if not results and len(hashes) > 1:
        for node, name in choice.items():
            results[node] = NodeResult(
                node, 1, "", f"nodes disagree on the previous release (here {name}); use --to"
            )
    details = {n: {"state": "aborted", "to": c} for n, c in choice.items()}
    chosen = next(iter(choice.values()), None)

    def finish(outcome: str) -> DeployReport:
        run = RunReport(
            f"rollback {label}", [results[connection_node(c)] for c in conns],
            time.monotonic() - start,
        )  # fmt: skip
        return DeployReport("rollback", outcome, label, chosen, None, run, details=details)

    if results:
        for node in choice:
            results.setdefault(node, NodeResult(node, 0, "not switched: another node failed"))
        return finish("aborted")
    tmp = f".current-{secrets.token_hex(6)}-"

    def switch(conn: fabric.Connection) -> str:
        node = connection_node(conn)
        command = _switch_command(remote, f"releases/{choice[node]}", tmp + node)
        _check(execute(conn, command, timeout=COMMAND_TIMEOUT), "switching current")
        return f"switched back to {choice[node]}"

    switched = map_nodes(conns, switch, fanout=fanout)
    bad = [n for n, v in switched.items() if isinstance(v, BaseException)]
    stuck: dict[str, BaseException] = {}
    if bad:
        previous = {n: (f"releases/{found[n].current}", "") for n in choice}
        stuck = _revert(conns, remote, previous, bad, fanout)
    for node, value in switched.items():
        results[node] = _result(node, value, start)
        if node in stuck:
            results[node] = _result(node, stuck[node], start)
        elif bad and node not in bad:
            results[node] = NodeResult(node, 0, "switched, then back: another node failed")
        failed = node in bad or node in stuck
        details[node]["state"] = "failed" if failed else ("reverted" if bad else "switched")
    return finish("aborted" if bad else "switched")
