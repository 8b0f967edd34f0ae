"""The shell commands a deploy sends to a node, and the parsers of their answers.

Layout of a target on a node (or once on a shared home)::

    <target>/current -> releases/<name>        relative symlink, switched by one rename(2)
    <target>/releases/<UTC time>-<hash>/       a release; ``.mento/ready`` once complete
    <target>/releases/.probe-<run>-<i>         a run's nonce files (shared-target detection)
    <target>/.mento-lock/owner                 held by one deploy or rollback at a time
    <target>/history                           "<UTC time> <name>": releases that went live

A release is *live* once ``current`` pointed at it on every node of a deploy (or
rollback): only then is it appended to ``history``. Releases never live (a deploy
that failed or was interrupted after staging) do not count toward the releases
kept, are never rolled back to, and are removed by the next deploy. A target
without ``history`` (written by an older mento_fab) counts every ready release as live.

Every builder returns one POSIX ``sh`` command line in which everything that
comes from a user or a node (target, release names, pip arguments) is quoted, so
the commands can be tested by running them locally.

>>> remote_dir("~/mento_fab/11019999")
'mento_fab/11019999'
>>> parse_probe("link=releases/a\\nhash=abc\\n")
('releases/a', 'abc')
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence

from mento_fab.deployment.scan import META_DIR, VENV_DIR, Release
from mento_fab.errors import BadInput

__all__ = [
    "HISTORY",
    "LOCK",
    "READY",
    "RELEASE_GLOB",
    "RELEASE_PATTERN",
    "commit_command",
    "discard_command",
    "heartbeat_command",
    "list_command",
    "lock_command",
    "manifest_command",
    "nonce_list_command",
    "nonce_write_command",
    "parse_list",
    "parse_live",
    "parse_lock",
    "parse_probe",
    "probe_command",
    "prune_command",
    "remote_dir",
    "stage_command",
    "switch_command",
    "unlink_current_command",
    "unlock_command",
]

#: Written last when staging: only ready releases are switched to or kept.
READY = f"{META_DIR}/ready"
#: Release directory names: ``<UTC time>-<hash prefix>`` (shell glob and ERE).
RELEASE_GLOB = "[0-9]*T[0-9]*Z-*"
RELEASE_PATTERN = "^[0-9]{8}T[0-9]{6}([.][0-9]+)?Z-[0-9a-f]+$"
#: The lock directory and the live history, next to ``current``.
LOCK = ".mento-lock"
HISTORY = "history"
#: Lines of history kept (the oldest are dropped beyond twice this many).
HISTORY_LINES = 1000
#: Minutes after which a nonce file is a dead run's leftover (a run needs its
#: nonce files for two round trips, then removes them when it takes the lock).
STALE_NONCE_MINUTES = 10
#: Seconds after which a half-done lock take-over is someone's leftover.
STALE_TAKEOVER = 60


def remote_dir(target: str) -> str:
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


def probe_command(target: str) -> str:
    """Read-only: where ``current`` points, its content hash, the last live release,
    and whether a failed or dead run left uploads or staging directories behind."""
    t = shlex.quote(target)
    return (
        f'printf "link=%s\\nhash=%s\\nlive=%s\\nhistory=%s\\nleftovers=%s\\n" '
        f'"$(readlink -- {t}/current 2>/dev/null)" '
        f'"$(cat -- {t}/current/{META_DIR}/content-hash 2>/dev/null)" '
        f'"$(tail -n 1 -- {t}/{HISTORY} 2>/dev/null | cut -d " " -f 2)" '
        f'"$(test -f {t}/{HISTORY} && echo yes)" '
        f'"$(cd -- {t}/releases 2>/dev/null && for d in .staging-* .*.tar .*.drop; '
        'do [ -e "$d" ] && echo yes && break; done)"'
    )


def parse_probe(text: str) -> tuple[str, str]:
    """``(link, content hash)`` from :func:`probe_command`'s output ("" when absent)."""
    values = _values(text)
    return values.get("link", ""), values.get("hash", "")


def parse_leftovers(text: str) -> bool:
    """Whether a probe found a failed or dead run's uploads or staging directories."""
    return _values(text).get("leftovers") == "yes"


def parse_live(text: str) -> str | None:
    """The last live release from a probe's output; None when the target keeps no history."""
    values = _values(text)
    return values.get("live", "") if values.get("history") == "yes" else None


def _values(text: str) -> dict[str, str]:
    return dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)


def nonce_write_command(target: str, nonce: str) -> str:
    """Create the target (if needed) and this node's nonce file in ``releases/``.

    A new target starts with an empty history, so that a release staged by an
    interrupted first deploy is never taken for live.
    """
    t = shlex.quote(target)
    path = shlex.quote(f"{target}/releases/{nonce}")
    return (
        f"{{ [ -d {t}/releases ] || {{ mkdir -p -- {t}/releases && : >> {t}/{HISTORY}; }}; }} "
        f"&& : > {path}"
    )


def nonce_list_command(target: str, run_id: str) -> str:
    """The names of run ``run_id``'s nonce files this node sees, one per line."""
    pattern = shlex.quote(f"{target}/releases/") + f".probe-{shlex.quote(run_id)}-*"
    return f'for f in {pattern}; do echo "${{f##*/}}"; done'


def manifest_command(target: str) -> str:
    """The manifest of the current release (exit non-zero when there is none)."""
    path = f"{target}/current/{META_DIR}/manifest.json"
    return f"cat -- {shlex.quote(path)} 2>/dev/null"


def stage_command(
    target: str,
    release: Release,
    checksum: str,
    base: str | None,
    install: bool,
    pip_args: Sequence[str],
    system_site_packages: bool = False,
) -> str:
    """The one command that verifies, unpacks, links, installs and marks a release ready.

    Expects ``releases/.<name>.tar`` (and, with ``base``, ``releases/.<name>.drop``)
    uploaded. Files are unpacked into ``.staging-<name>`` and renamed to ``<name>``;
    a venv is built after the rename (its scripts hold absolute paths). Only a
    release with ``.mento/ready`` counts: a node that dies half-way leaves nothing
    a rollback or the next deploy would use; the next lock holder removes such
    leftovers (see :func:`lock_command`).
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


def discard_command(target: str, name: str) -> str:
    """Remove a staged (never switched to) release and its uploads."""
    paths = [f"{target}/releases/{p}" for p in (name, f".{name}.tar", f".{name}.drop")]
    return "rm -rf -- " + " ".join(shlex.quote(p) for p in paths)


def switch_command(target: str, release_dir: str, tmp: str) -> str:
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


def unlink_current_command(target: str) -> str:
    """Remove ``current`` (the revert of a node that had no release before)."""
    return f"rm -f -- {shlex.quote(target + '/current')}"


def _live_test(t: str) -> str:
    """Shell function ``live NAME``: true when NAME went live (always, without history)."""
    return (
        f'if [ -f {t}/{HISTORY} ]; then live() {{ awk -v d="$1" '
        f"'$2 == d {{ f = 1 }} END {{ exit !f }}' {t}/{HISTORY}; }}; "
        "else live() { return 0; }; fi; "
    )


def prune_command(target: str, keep: int) -> str:
    """Remove all but the newest ``keep`` live releases before ``current`` (never ``current``).

    Releases that were never live are removed and do not count; live releases newer
    than ``current`` (after a rollback) are kept. Nonce files are left alone: a
    run removes its own when it takes the lock, and a dead run's go after
    :data:`STALE_NONCE_MINUTES` (see :func:`lock_command`), never a running deploy's.
    """
    t = shlex.quote(target)
    return (
        f"cd -- {t}/releases || exit 0; "
        + _live_test("..")
        + "cur=$(readlink ../current); cur=${cur##*/}; seen=0; n=0; rc=0; "
        f"for d in $(ls -1r | grep -E '{RELEASE_PATTERN}'); do "
        'if [ "$d" = "$cur" ]; then seen=1; continue; fi; '
        'if ! live "$d"; then rm -rf -- "$d" || rc=1; continue; fi; '
        "[ $seen = 1 ] || continue; "  # newer than current (after a rollback): keep
        f'n=$((n+1)); if [ $n -gt {int(keep)} ]; then rm -rf -- "$d" || rc=1; fi; done; '
        "exit $rc"
    )


def commit_command(target: str, name: str, when: str) -> str:
    """Append ``name`` to the live history (creating it from the ready releases first).

    A target without history (an older mento_fab's) records its ready releases as
    live before the first entry, so none of them is taken for never-live.
    """
    t = shlex.quote(target)
    h = shlex.quote(f"{target}/{HISTORY}")
    new = shlex.quote(f"{target}/.{HISTORY}.new")
    return (
        f"if [ ! -e {h} ]; then for d in {t}/releases/{RELEASE_GLOB}; do "
        f'[ -e "$d/{READY}" ] && printf -- "- %s\\n" "${{d##*/}}"; done > {h} || exit 1; fi; '
        f"printf '%s %s\\n' {shlex.quote(when)} {shlex.quote(name)} >> {h} || exit 1; "
        f"if [ $(wc -l < {h}) -gt {2 * HISTORY_LINES} ]; then "
        f"tail -n {HISTORY_LINES} -- {h} > {new} && mv -f -- {new} {h}; fi"
    )


def list_command(target: str) -> str:
    """Where ``current`` points, the ready releases, then the live history (``h=`` lines)."""
    t = shlex.quote(target)
    return (
        f'printf "link=%s\\n" "$(readlink -- {t}/current 2>/dev/null)"; '
        f'for d in {t}/releases/{RELEASE_GLOB}; do [ -e "$d/{READY}" ] && '
        'printf "%s\\n" "${d##*/}"; done; '
        f"if [ -f {t}/{HISTORY} ]; then echo history=yes; tail -n {HISTORY_LINES} -- "
        f"{t}/{HISTORY} | sed 's/^/h=/'; fi; true"
    )


def parse_list(text: str) -> tuple[str | None, list[str], list[tuple[str, str]] | None]:
    """``(current name or None, ready releases oldest first, history or None)``.

    The history is ``[(UTC time, name), ...]`` oldest first; None for a target that
    keeps none (then every ready release counts as live).
    """
    lines = text.splitlines()
    link = lines[0].partition("=")[2] if lines else ""
    names = sorted(ln for ln in lines[1:] if "=" not in ln)
    history: list[tuple[str, str]] | None = None
    if "history=yes" in lines:
        history = []
        for line in lines:
            if line.startswith("h="):
                when, _, name = line[2:].partition(" ")
                if name:
                    history.append((when, name))
    return link.rsplit("/", 1)[-1] or None, names, history


# --------------------------------------------------------------------- the lock


def _tidy(target: str) -> str:
    """Leftovers of runs that died, removed by the next lock holder (never ``current``).

    Half-staged releases, staging directories, uploads, temporary links, old nonce
    files, and ready releases that never went live.
    """
    t = shlex.quote(target)
    return (
        f"(cd -- {t}/releases 2>/dev/null || exit 0; "
        f"find . -maxdepth 1 -name '.probe-*' -mmin +{STALE_NONCE_MINUTES} "
        "-exec rm -f -- {} + 2>/dev/null; "
        + _live_test("..")
        + "cur=$(readlink ../current); cur=${cur##*/}; "
        f'for d in .staging-* .*.tar .*.drop {RELEASE_GLOB}; do [ -e "$d" ] || continue; '
        'case "$d" in "$cur") continue;; esac; '
        f'if [ -e "$d/{READY}" ] && live "$d"; then continue; fi; rm -rf -- "$d"; done; '
        "rm -f -- ../.current-*) || true"
    )


def lock_command(
    target: str,
    owner: dict[str, str],
    takeover: str | None = None,
    tidy: bool = True,
    nonces: Iterable[str] = (),
) -> str:
    """Try once to take the target's lock for run ``owner["run"]``; then probe.

    Prints ``state=locked`` (taken now, or already this run's: a shared target seen
    from a second node) or ``state=held`` with ``age=`` (seconds since the holder's
    last heartbeat) and ``owner.<key>=`` lines. ``takeover`` names the run of a
    lock found dead: it is removed first, under a take-over mutex, and only if that
    run still holds it. ``tidy`` removes dead runs' leftovers once the lock is ours.
    ``nonces``, this run's nonce files, are removed first: they served their purpose.
    """
    t = shlex.quote(target)
    lock = shlex.quote(f"{target}/{LOCK}")
    mutex = shlex.quote(f"{target}/{LOCK}.takeover")
    me = shlex.quote(owner["run"])
    record = " ".join(shlex.quote(f"{k}={v}") for k, v in owner.items())
    holder = f"\"$(sed -n 's/^run=//p' {lock}/owner 2>/dev/null)\""
    lines = [f"mkdir -p -- {t} || exit 1"]
    removals = " ".join(shlex.quote(f"{target}/releases/{n}") for n in nonces)
    if removals:
        lines.append(f"rm -f -- {removals}")
    if takeover is not None:
        lines.append(
            f"if mkdir -- {mutex} 2>/dev/null; then "
            f"if [ {holder} = {shlex.quote(takeover)} ]; then rm -rf -- {lock}; fi; "
            f"rmdir -- {mutex}; else m=$(stat -c %Y -- {mutex} 2>/dev/null || date +%s); "
            f"if [ $(( $(date +%s) - m )) -gt {STALE_TAKEOVER} ]; then rmdir -- {mutex}; fi; fi"
        )
    lines += [
        f"if mkdir -- {lock} 2>/dev/null; then "
        f"printf '%s\\n' {record} > {lock}/owner.new && mv -f -- {lock}/owner.new {lock}/owner "
        f"|| {{ rm -rf -- {lock}; echo 'cannot write the lock' >&2; exit 4; }}; "
        + (f"{_tidy(target)}; " if tidy else "")
        + "echo state=locked; "
        f"elif [ {holder} = {me} ]; then echo state=locked; "
        f'else echo state=held; f={lock}/owner; [ -e "$f" ] || f={lock}; '
        'echo "age=$(( $(date +%s) - $(stat -c %Y -- "$f" 2>/dev/null || date +%s) ))"; '
        f"sed 's/^/owner./' {lock}/owner 2>/dev/null; fi",
        probe_command(target),
    ]
    return "\n".join(lines)


def parse_lock(text: str) -> tuple[bool, int, dict[str, str]]:
    """``(ours, age in seconds, holder's owner record)`` from :func:`lock_command`."""
    values = _values(text)
    owner = {k[6:]: v for k, v in values.items() if k.startswith("owner.")}
    try:
        age = int(values.get("age", "0"))
    except ValueError:
        age = 0
    return values.get("state") == "locked", age, owner


def heartbeat_command(target: str, run: str) -> str:
    """Mark the lock as still held by ``run`` (its owner file's mtime is the heartbeat)."""
    lock = shlex.quote(f"{target}/{LOCK}")
    return (
        f"if [ \"$(sed -n 's/^run=//p' {lock}/owner 2>/dev/null)\" = {shlex.quote(run)} ]; "
        f"then touch -c -- {lock}/owner; else echo 'lock lost' >&2; exit 5; fi"
    )


def unlock_command(target: str, run: str, nonces: Iterable[str] = ()) -> str:
    """Give the lock back if ``run`` holds it, and remove the run's nonce files."""
    lock = shlex.quote(f"{target}/{LOCK}")
    removals = " ".join(shlex.quote(f"{target}/releases/{n}") for n in nonces)
    return (
        (f"rm -f -- {removals}; " if removals else "")
        + f"if [ \"$(sed -n 's/^run=//p' {lock}/owner 2>/dev/null)\" = {shlex.quote(run)} ]; "
        f"then rm -rf -- {lock}; fi; true"
    )
