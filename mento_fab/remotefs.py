"""The shell commands ``put`` and ``get`` run on a node, and how their answers are read.

Everything the user typed is quoted; only the glob characters of a ``get``
pattern reach the node's shell unquoted, so ``~/run*/out.h5`` is expanded there
and nothing else is. Paths starting with ``~/`` (or relative ones) are in the
account's home, where every command starts. The commands need a POSIX shell,
GNU tar and GNU find, as on any Linux cluster node.

A ``get`` pattern is split where the first wildcard is: the part before is a
directory on the node, the part after names what is fetched *and* where it lands
below ``LOCAL_DIR/<node>/``, so it must not contain ``..``.

>>> split_pattern("~/scans/run*/out.h5")
('scans', 'run*/out.h5')
>>> split_pattern("/var/log/syslog")
('/var/log', 'syslog')
>>> print(glob_word("run [1]*/a b.h5"))
'run '[1]*'/a b.h5'
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
from dataclasses import dataclass

from mento_fab.errors import BadPath

__all__ = [
    "Listed",
    "PutTarget",
    "glob_word",
    "list_command",
    "nonce_command",
    "parse_listing",
    "parse_probe",
    "probe_command",
    "receive_command",
    "remote_path",
    "send_command",
    "split_pattern",
]

_GLOB = re.compile(r"[*?[]")
_BRACKET = re.compile(r"\[!?[A-Za-z0-9._-]+\]")
PROBE_PREFIX = ".mento-probe-"


def remote_path(text: str) -> str:
    """A path as the node's shell takes it: ``~/x`` and ``x`` are in the home (``.``)."""
    text = text.strip()
    if not text:
        raise BadPath("the remote path is empty")
    if "\0" in text or "\n" in text:
        raise BadPath("the remote path holds a NUL or newline")
    if text == "~" or text == "~/":
        return "."
    if text.startswith("~/"):
        text = text[2:].lstrip("/") or "."
    elif text.startswith("~"):
        raise BadPath(f"{text}: only ~/ (the beamtime account's home) is supported")
    return text


def glob_word(pattern: str) -> str:
    """One shell word: ``*``, ``?`` and simple ``[...]`` classes stay live, the rest is quoted."""
    parts: list[str] = []
    literal = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        bracket = _BRACKET.match(pattern, i) if char == "[" else None
        if char in "*?" or bracket:
            if literal:
                parts.append(shlex.quote(literal))
                literal = ""
            text = bracket.group(0) if bracket else char
            parts.append(text)
            i += len(text)
            continue
        literal += char
        i += 1
    if literal:
        parts.append(shlex.quote(literal))
    return "".join(parts)


def split_pattern(remote: str) -> tuple[str, str]:
    """``(directory on the node, pattern below it)`` for ``get``; see the module docstring."""
    path = remote_path(remote).rstrip("/") or "/"
    if path == "/":
        raise BadPath(f"{remote}: name a file or directory below /, not / itself")
    parts = path.split("/")
    first = next((i for i, part in enumerate(parts) if _GLOB.search(part)), len(parts) - 1)
    base = "/".join(parts[:first]) or ("/" if path.startswith("/") else ".")
    rest = [p for p in parts[first:] if p not in ("", ".")]
    if not rest or rest[-1] == "..":
        raise BadPath(f"{remote}: must end in a file or directory name, not {parts[-1]!r}")
    if ".." in rest:
        raise BadPath(f"{remote}: '..' after the first wildcard would escape LOCAL_DIR")
    return base, "/".join(rest)


# ------------------------------------------------------------------------- put


@dataclass(frozen=True)
class PutTarget:
    """Where ``put`` writes on one node: ``into/name``, and what is there now."""

    into: str  # directory on the node (as the shell takes it)
    name: str  # name of the file or directory created in it
    there: str  # "none", "dir" or "other": what ``into/name`` is now
    writable: bool
    physical: str  # ``pwd -P`` of ``into``, for messages


def probe_command(dest: str, local_name: str, nonce: str) -> str:
    """Decide ``into``/``name`` for ``put`` like ``cp``/``scp`` and leave a nonce file there.

    An existing directory ``dest`` receives ``local_name``; otherwise ``dest`` is
    the new name in its parent. A trailing ``/`` makes ``dest`` a directory first.
    """
    path = remote_path(dest)
    if path.endswith("/") and path.strip("/"):
        make = f"mkdir -p -- {shlex.quote(path)} 2>/dev/null || {{ echo state=nodir; exit 0; }}; "
    else:
        make = ""
    path = path.rstrip("/") or "/"
    parent, name = posixpath.split(path)
    q = shlex.quote
    return (
        f"{make}if [ -d {q(path)} ]; then into={q(path)}; name={q(local_name)}; case=dir; "
        f"else into={q(parent or '.')}; name={q(name)}; case=new; fi; "
        'cd -- "$into" 2>/dev/null || { echo state=nodir; exit 0; }; '
        'if [ -d "$name" ]; then there=dir; '
        'elif [ -e "$name" ] || [ -L "$name" ]; then there=other; else there=none; fi; '
        f"if : > {q(nonce)} 2>/dev/null; then w=yes; else w=no; fi; "
        "printf 'state=ok\\ncase=%s\\nthere=%s\\nwritable=%s\\npwd=%s\\n' "
        '"$case" "$there" "$w" "$(pwd -P)"'
    )


def parse_probe(text: str, dest: str, local_name: str) -> PutTarget | None:
    """The probe's answer; None when the destination's directory does not exist."""
    values = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
    if values.get("state") != "ok":
        return None
    path = remote_path(dest).rstrip("/") or "/"
    if values.get("case") == "dir":
        into, name = path, local_name
    else:
        parent, name = posixpath.split(path)
        into = parent or "."
    return PutTarget(
        into, name, values.get("there", "none"), values.get("writable") == "yes",
        values.get("pwd", into),
    )  # fmt: skip


def nonce_command(into: str, run: str, *, remove: bool = False) -> str:
    """List this run's nonce files in ``into`` (nodes that see each other's share a
    directory), or remove them."""
    pattern = shlex.quote(f"{PROBE_PREFIX}{run}-") + "*"
    if remove:
        return f"cd -- {shlex.quote(into)} && rm -f -- {pattern}"
    return f'cd -- {shlex.quote(into)} && for f in {pattern}; do [ -e "$f" ] && echo "$f"; done'


def receive_command(target: PutTarget, run: str, merge: bool, probes: str | None = None) -> str:
    """``tar -x`` of the stream into ``target``, the nonces removed.

    A new file or directory is unpacked beside its place and renamed into it (no
    reader sees half of it; a file is replaced in one rename); a directory sent
    onto an existing one is merged file by file (``merge``). ``probes`` names the
    run whose nonce files go (default ``run``).
    """
    q = shlex.quote
    head = (
        f"cd -- {q(target.into)} || exit 3; rm -f -- {q(PROBE_PREFIX + (probes or run) + '-')}*; "
    )
    if merge:
        return head + "exec tar -x -f - --no-same-owner --keep-directory-symlink"
    return head + (
        f"stage={q(f'.mento-put-{run}')}; trap 'rm -rf -- \"$stage\"' EXIT; "
        'mkdir -- "$stage" || exit 3; '
        'tar -x -f - -C "$stage" --no-same-owner || exit $?; '
        f'mv -f -T -- "$stage"/{q(target.name)} {q(target.name)}'
    )


# ------------------------------------------------------------------------- get


def _matches(base: str, pattern: str, body: str) -> str:
    return (
        f"cd -- {shlex.quote(base)} 2>/dev/null || exit 3; n=0; "
        f"for p in {glob_word(pattern)}; do "
        'case "${p##*/}" in .|..) continue;; esac; '
        'if [ -e "$p" ] || [ -L "$p" ]; then n=$((n+1)); ' + body + "; fi; done"
    )


def list_command(base: str, pattern: str) -> str:
    """Every file and directory the pattern names, recursively: ``type size path\\0``.

    Exit 3: no such directory; 4: nothing matched.
    """
    return (
        _matches(base, pattern, "find -L \"./$p\" -printf '%y %s %p\\0'")
        + '; [ "$n" -gt 0 ] || exit 4'
    )


def send_command(base: str, pattern: str) -> str:
    """A tar stream of the files and directories the pattern names.

    Links are followed, as ``scp`` does; ``find -L`` walks (it detects link loops,
    which make ``tar -h`` recurse until it crashes) and tar archives its list.
    """
    return (
        _matches(base, pattern, 'find -L "./$p" \\( -type f -o -type d \\) -print0')
        + " | tar -c -f - -h --hard-dereference --no-recursion --null -T -"
    )


@dataclass(frozen=True)
class Listed:
    """One thing a ``get`` pattern names on a node: a file (``f``), directory (``d``) or other."""

    kind: str
    size: int
    name: str  # relative, normalised: where it lands below LOCAL_DIR/<node>


def parse_listing(data: bytes) -> list[Listed]:
    """``find -printf '%y %s %p\\0'`` output; names keep undecodable bytes (surrogateescape)."""
    found = []
    for record in data.split(b"\0"):
        if not record:
            continue
        kind, size, path = record.split(b" ", 2)
        name = os.path.normpath(path.decode("utf-8", "surrogateescape"))
        found.append(Listed(kind.decode(), int(size), name))
    return found
