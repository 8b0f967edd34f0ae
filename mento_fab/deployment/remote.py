"""The shell commands a deploy sends to a node, and the parsers of their answers.

Layout of a target on a node (or once on a shared home)::

    <target>/current -> releases/<name>        relative symlink, switched by one rename(2)
    <target>/releases/<UTC time>-<hash>/       a release; ``.mento/ready`` once complete
    <target>/releases/.probe-<run>-<i>         a run's nonce files (shared-target detection)

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
    "READY",
    "RELEASE_GLOB",
    "RELEASE_PATTERN",
    "discard_command",
    "list_command",
    "manifest_command",
    "nonce_list_command",
    "nonce_write_command",
    "parse_list",
    "parse_probe",
    "probe_command",
    "prune_command",
    "remote_dir",
    "stage_command",
    "switch_command",
    "unlink_current_command",
]

#: Written last when staging: only ready releases are switched to or kept.
READY = f"{META_DIR}/ready"
#: Release directory names: ``<UTC time>-<hash prefix>`` (shell glob and ERE).
RELEASE_GLOB = "[0-9]*T[0-9]*Z-*"
RELEASE_PATTERN = "^[0-9]{8}T[0-9]{6}([.][0-9]+)?Z-[0-9a-f]+$"


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
    """Read-only: where ``current`` points and the content hash of that release."""
    t = shlex.quote(target)
    return (
        f'printf "link=%s\\nhash=%s\\n" "$(readlink -- {t}/current 2>/dev/null)" '
        f'"$(cat -- {t}/current/{META_DIR}/content-hash 2>/dev/null)"'
    )


def parse_probe(text: str) -> tuple[str, str]:
    """``(link, content hash)`` from :func:`probe_command`'s output ("" when absent)."""
    values = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
    return values.get("link", ""), values.get("hash", "")


def nonce_write_command(target: str, nonce: str) -> str:
    """Create the target (if needed) and this node's nonce file in ``releases/``."""
    path = shlex.quote(f"{target}/releases/{nonce}")
    return f"mkdir -p -- {shlex.quote(target)}/releases && : > {path}"


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
    a rollback or the next deploy would use, and the next stage removes such leftovers.
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


def discard_command(target: str, name: str, nonces: Iterable[str]) -> str:
    """Remove a staged (never switched to) release and this run's nonce files."""
    paths = [f"{target}/releases/{name}", *(f"{target}/releases/{n}" for n in nonces)]
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


def prune_command(target: str, keep: int, nonces: Iterable[str]) -> str:
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
        f"for d in $(ls -1r | grep -E '{RELEASE_PATTERN}'); do "
        'if [ "$d" = "$cur" ]; then seen=1; continue; fi; '
        "[ $seen = 1 ] || continue; "  # newer than current (after a rollback): keep
        f'n=$((n+1)); if [ $n -gt {int(keep)} ]; then rm -rf -- "$d" || rc=1; fi; done; '
        "exit $rc"
    )


def list_command(target: str) -> str:
    """Where ``current`` points, then the ready releases, one per line."""
    t = shlex.quote(target)
    return (
        f'printf "link=%s\\n" "$(readlink -- {t}/current 2>/dev/null)"; '
        f'for d in {t}/releases/{RELEASE_GLOB}; do [ -e "$d/{READY}" ] && '
        'printf "%s\\n" "${d##*/}"; done; true'
    )


def parse_list(text: str) -> tuple[str | None, list[str]]:
    """``(current release name or None, ready releases oldest first)`` from :func:`list_command`."""
    lines = text.splitlines()
    link = lines[0].partition("=")[2] if lines else ""
    return link.rsplit("/", 1)[-1] or None, sorted(lines[1:])
