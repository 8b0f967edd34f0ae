"""``deploy``, ``rollback`` and ``releases``: ship the analysis code to the reserved nodes.

Thin wrappers over :mod:`mento_fab.deployment`: options in, a table or JSON out, the
exit status rule of ``run-on-nodes``. ``--exclude`` takes file patterns here (as in
``.mentoignore``); node sets are left out with ``--skip-nodes``.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
from collections.abc import Iterator
from typing import Any

from invoke import Context, Exit

from mento_fab import defaults
from mento_fab.cli import console
from mento_fab.cli.options import NODES_SKIP, Options, mento_task, print_json, whole
from mento_fab.errors import BadInput, DeployInterrupted

__all__ = ["deploy", "releases", "rollback"]

#: How a task's words are written when invoke finds a word it does not expect
#: (invoke has no optional positional arguments).
USAGE = {"deploy": "deploy takes the source as --source DIR (default: the current directory)"}

_TARGET_HELP = (
    "directory on the nodes (default ~/mento_fab/<beamtime id>; "
    "invoke config mento_fab.deploy_target)"
)
DEPLOY_HELP = {
    # invoke has no optional positional arguments: SOURCE is --source.
    "source": "project directory to ship (default: the current directory)",
    "target": _TARGET_HELP,
    "exclude": "gitignore-style file pattern to leave out (repeatable; adds to .mentoignore)",
    "install": "build .venv in the release from requirements.txt / pyproject.toml",
    "system_site_packages": "with --install: let the venv see the node's system packages",
    "pip_args": "extra pip install arguments, e.g. '--no-index --find-links /beamline/p11/wheels'",
    "keep": f"old releases to keep on each node (default {defaults.KEEP_RELEASES})",
    "dry_run": "show what would be sent where (and sizes); change nothing",
    "lock_timeout": "seconds to wait while another deploy or rollback holds the target "
    f"(default {defaults.LOCK_TIMEOUT:g})",
}
ROLLBACK_HELP = {
    "target": _TARGET_HELP,
    "to": "release name to switch to (default: the live one before current)",
    "lock_timeout": DEPLOY_HELP["lock_timeout"],
}
RELEASES_HELP = {"target": _TARGET_HELP}


def _target(opts: Options, target: str | None) -> str | None:
    return target or opts.setting("deploy_target")


def _lock_timeout(value: str | None) -> float:
    if value is None:
        return defaults.LOCK_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise BadInput(f"--lock-timeout takes a number of seconds, not {value!r}") from None
    if not 0 <= seconds < 1e9:
        raise BadInput(f"--lock-timeout must be 0 or more seconds, not {value!r}")
    return seconds


@contextlib.contextmanager
def _reported_interrupt(json: bool) -> Iterator[None]:
    """A signal during the switch: show where every node is, then exit as the signal says."""
    try:
        yield
    except DeployInterrupted as exc:
        # A further Ctrl-C must not cut the report short: it is what the user asked for.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            _render(exc.report, json, exit_on_failure=False)
        finally:
            signal.signal(signal.SIGINT, old)
        raise Exit(f"mento-fab: {exc}", code=128 + exc.signum) from None


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _note(result: Any) -> str:
    """The tool's words and any connection error; a failed command's last stderr line."""
    parts = [p for p in (result.error, result.message) if p]
    if not parts and not result.ok:
        lines = result.stderr.strip().splitlines()
        parts.append(lines[-1] if lines else f"exit {result.exit}")
    return "; ".join(parts)


def _render(report: Any, json: bool, exit_on_failure: bool = True) -> None:
    if json:
        print_json(report.run.as_json(**report.json_extra()))
    else:
        rows = []
        for result in report.run.results:
            info = report.details.get(result.node)
            rows.append(
                [
                    result.node,
                    str(info.state) if info else ("ok" if result.ok else "failed"),
                    _size(info.bytes if info else None),
                    str(info.reused) if info and info.reused is not None else "-",
                    f"{result.seconds:.2f} s",
                    _note(result),
                ]
            )
        shown = "" if report.outcome == "unchanged" else f" {report.release or ''}"
        title = f"{report.action}{shown} -> {report.target}: {report.outcome}"
        console.print_table(title, ["node", "state", "sent", "reused", "time", "notes"], rows)
        for nodes in report.shared:
            print(f"shared target: {', '.join(nodes)} see one directory (staged once)")
        console.print_summary(report.run)
    if report.exit_status and exit_on_failure:
        raise Exit(code=report.exit_status)


def _print_releases(label: str, found: dict[str, Any]) -> None:
    """One table per distinct listing, its nodes folded: each release, when it went live."""
    from mento_fab.nodes import fold

    groups: dict[str, list[str]] = {}
    for node, info in found.items():
        if info.error:
            print(f"{node}: {info.error}")
            continue
        key = repr((info.current, info.releases, info.history))
        groups.setdefault(key, []).append(node)
    for nodes in groups.values():
        info = found[nodes[0]]
        went_live: dict[str, list[str]] = {}
        for when, name in info.history or []:
            went_live.setdefault(name, []).append(when)
        live = set(info.live)
        rows = []
        for name in info.releases:
            mark = "*" if name == info.current else ("!" if name not in live else "")
            if info.history is None:
                times = "(no history kept)"
            else:
                times = ", ".join(w for w in went_live.get(name, []) if w != "-") or (
                    "before history was kept" if name in went_live else "never"
                )
            rows.append([mark, name, times])
        title = f"releases in {label} on {fold(nodes)}"
        console.print_table(title, ["", "release", "went live (UTC)"], rows or [["", "(none)", ""]])
    never = any(n not in set(i.live) for i in found.values() if not i.error for n in i.releases)
    legend = "! never went live on every node: removed by the next deploy, never rolled back to"
    print("* current" + (f"   {legend}" if never else ""))


@mento_task(shared=NODES_SKIP, help=DEPLOY_HELP, iterable=["exclude"])
def deploy(
    c: Context,
    opts: Options,
    source: str = ".",
    target: str | None = None,
    exclude: list[str] | None = None,
    install: bool = False,
    pip_args: str | None = None,
    system_site_packages: bool = False,
    keep: int | None = None,
    dry_run: bool = False,
    lock_timeout: str | None = None,
):
    """Ship SOURCE to every reserved node: stage everywhere, then switch `current` at once."""
    from mento_fab.deployment import SecretScan, beamtime_files, build_release
    from mento_fab.deployment import deploy as run_deploy

    workers, json = opts.fanout, opts.json
    session = opts.session()
    keep_releases = defaults.KEEP_RELEASES if keep is None else whole("--keep", keep)
    wait = _lock_timeout(lock_timeout)
    release = build_release(
        source,
        exclude or [],
        extra_files=beamtime_files(session),
        install=install,
        secrets=SecretScan.for_metadata(session.metadata),  # before any connection is opened
    )
    with opts.group(session) as grp, _reported_interrupt(json):
        progress = console.Progress(len(grp), "staging", enabled=False if json else None)
        with progress:
            report = run_deploy(
                grp,
                session,
                source,
                _target(opts, target),
                install=install,
                pip_args=shlex.split(pip_args or ""),
                system_site_packages=system_site_packages,
                keep=keep_releases,
                dry_run=dry_run,
                fanout=workers,
                lock_timeout=wait,
                on_event=lambda node, what: progress.advance() if what == "staged" else None,
                release=release,
            )
    if not json and not report.run.failed and not report.run.unreachable:
        files = len(release.files)
        # An unchanged tree is not a new release: name its content, not a new name.
        what = (
            f"content {release.content_hash[:16]}"
            if report.outcome == "unchanged"
            else f"release {release.name}"
        )
        print(f"{what}: {files} files, {_size(release.size)} from {release.source}")
    _render(report, json)


@mento_task(shared=NODES_SKIP, help=ROLLBACK_HELP)
def rollback(
    c: Context,
    opts: Options,
    target: str | None = None,
    to: str | None = None,
    lock_timeout: str | None = None,
):
    """Switch every node back to the previous live release (all nodes or none)."""
    from mento_fab.deployment import rollback as run_rollback

    workers, json = opts.fanout, opts.json
    session = opts.session()
    wait = _lock_timeout(lock_timeout)
    with opts.group(session) as grp, _reported_interrupt(json):
        report = run_rollback(
            grp, session, _target(opts, target), to=to, fanout=workers, lock_timeout=wait
        )
    _render(report, json)


@mento_task(shared=NODES_SKIP, help=RELEASES_HELP)
def releases(c: Context, opts: Options, target: str | None = None):
    """List the releases on each node, when each went live; `*` marks the current one."""
    from mento_fab.deployment import default_target
    from mento_fab.deployment import releases as list_releases

    workers, json = opts.fanout, opts.json
    session = opts.session()
    label = _target(opts, target) or default_target(session.metadata)
    with opts.group(session) as grp:
        run, found = list_releases(grp, session, label, fanout=workers)
    if json:
        print_json(run.as_json(target=label, releases={n: r.as_dict() for n, r in found.items()}))
    else:
        _print_releases(label, found)
        for result in run.results:
            if result.message:
                print(f"{result.node}: {result.message}")
        console.print_summary(run)
    if run.exit_status:
        raise Exit(code=run.exit_status)
