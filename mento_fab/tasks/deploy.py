"""``deploy``, ``rollback`` and ``releases``: ship the analysis code to the reserved nodes.

Thin wrappers over :mod:`mento_fab.deploy`: options in, a table or JSON out, the
exit status rule of ``run-on-nodes``. ``--exclude`` takes file patterns here (as in
``.mentoignore``); node sets are left out with ``--skip-nodes``.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from invoke import Context, Exit, task

from mento_fab.tasks import _common as common
from mento_fab.tasks import console

_NODE_HELP = {k: v for k, v in common.NODE_HELP.items() if k != "exclude"}
_TARGET_HELP = (
    "directory on the nodes (default ~/mento_fab/<beamtime id>; "
    "invoke config mento_fab.deploy_target)"
)
DEPLOY_HELP = {
    **_NODE_HELP,
    # invoke has no optional positional arguments: SOURCE is --source.
    "source": "project directory to ship (default: the current directory)",
    "target": _TARGET_HELP,
    "exclude": "gitignore-style file pattern to leave out (repeatable; adds to .mentoignore)",
    "skip_nodes": "node set to leave out",
    "install": "build .venv in the release from requirements.txt / pyproject.toml",
    "system_site_packages": "with --install: let the venv see the node's system packages",
    "pip_args": "extra pip install arguments, e.g. '--no-index --find-links /beamline/p11/wheels'",
    "keep": "old releases to keep on each node (default 5)",
    "dry_run": "show what would be sent where (and sizes); change nothing",
}
ROLLBACK_HELP = {
    **_NODE_HELP,
    "target": _TARGET_HELP,
    "skip_nodes": "node set to leave out",
    "to": "release name to switch to (default: the one before current)",
}
RELEASES_HELP = {**_NODE_HELP, "target": _TARGET_HELP, "skip_nodes": "node set to leave out"}


def _target(c: Context, target: str | None) -> str | None:
    return common.setting(c, "deploy_target", target)


def _fanout(c: Context, fanout: Any) -> int:
    """``--fanout`` checked like run-on-nodes does: one line for ``abc`` or ``0``, not a trace."""
    return int(common.number("--fanout", common.setting(c, "fanout", fanout)))


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _render(report: Any, json: bool) -> None:
    from mento_fab import report as reporting

    if json:
        common.print_json(reporting.to_json(report.run, **report.json_extra()))
    else:
        rows = []
        for result in report.run.results:
            info = report.details.get(result.node, {})
            note = result.error or (result.stderr.strip() if not result.ok else result.stdout)
            if result.ok and info.get("warning"):
                note = f"{note}; {info['warning']}"
            rows.append([
                result.node,
                info.get("state", "ok" if result.ok else "failed"),
                _size(info.get("bytes")),
                str(info.get("reused", "-")),
                f"{result.seconds:.2f} s",
                note,
            ])  # fmt: skip
        shown = "" if report.outcome == "unchanged" else f" {report.release or ''}"
        title = f"{report.action}{shown} -> {report.target}: {report.outcome}"
        console.print_table(title, ["node", "state", "sent", "reused", "time", "notes"], rows)
        for nodes in report.shared:
            print(f"shared target: {', '.join(nodes)} see one directory (staged once)")
        console.print_summary(report.run)
    if report.exit_status:
        raise Exit(code=report.exit_status)


@task(help=DEPLOY_HELP, iterable=["exclude"], auto_shortflags=False)
@common.friendly
def deploy(
    c: Context,
    source: str = ".",
    target: str | None = None,
    exclude: list[str] | None = None,
    install: bool = False,
    pip_args: str | None = None,
    system_site_packages: bool = False,
    keep: int | None = None,
    dry_run: bool = False,
    root_dir: str | None = None,
    metadata: str | None = None,
    nodes: str | None = None,
    skip_nodes: str | None = None,
    fanout: int | None = None,
    connect_timeout: float | None = None,
    host_keys: str | None = None,
    ssh_config: str | None = None,
    known_hosts: str | None = None,
    json: bool = False,
):
    """Ship SOURCE to every reserved node: stage everywhere, then switch `current` at once."""
    from mento_fab.deploy import DEFAULT_KEEP, beamtime_files, build_release, refuse_secrets
    from mento_fab.deploy import deploy as run_deploy

    workers = _fanout(c, fanout)
    md, path = common.load(c, root_dir, metadata)
    session_root = Path(path).resolve().parent
    release = build_release(
        source, exclude or [], extra_files=beamtime_files(md, session_root), install=install
    )
    refuse_secrets(release, md)  # before any connection is opened
    with common.group(
        c, md, nodes=nodes, exclude=skip_nodes, connect_timeout=connect_timeout,
        host_keys=host_keys, ssh_config=ssh_config, known_hosts=known_hosts,
    ) as grp:  # fmt: skip
        progress = console.Progress(len(grp), "staging", enabled=False if json else None)
        with progress:
            report = run_deploy(
                grp,
                md,
                source,
                _target(c, target),
                session_root=session_root,
                install=install,
                pip_args=shlex.split(pip_args or ""),
                system_site_packages=system_site_packages,
                keep=DEFAULT_KEEP if keep is None else int(keep),
                dry_run=dry_run,
                fanout=workers,
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


@task(help=ROLLBACK_HELP, auto_shortflags=False)
@common.friendly
def rollback(
    c: Context,
    target: str | None = None,
    to: str | None = None,
    root_dir: str | None = None,
    metadata: str | None = None,
    nodes: str | None = None,
    skip_nodes: str | None = None,
    fanout: int | None = None,
    connect_timeout: float | None = None,
    host_keys: str | None = None,
    ssh_config: str | None = None,
    known_hosts: str | None = None,
    json: bool = False,
):
    """Switch every node back to the previous release (all nodes or none)."""
    from mento_fab.deploy import rollback as run_rollback

    workers = _fanout(c, fanout)
    md, _ = common.load(c, root_dir, metadata)
    with common.group(
        c, md, nodes=nodes, exclude=skip_nodes, connect_timeout=connect_timeout,
        host_keys=host_keys, ssh_config=ssh_config, known_hosts=known_hosts,
    ) as grp:  # fmt: skip
        report = run_rollback(grp, md, _target(c, target), to=to, fanout=workers)
    _render(report, json)


@task(help=RELEASES_HELP, auto_shortflags=False)
@common.friendly
def releases(
    c: Context,
    target: str | None = None,
    root_dir: str | None = None,
    metadata: str | None = None,
    nodes: str | None = None,
    skip_nodes: str | None = None,
    fanout: int | None = None,
    connect_timeout: float | None = None,
    host_keys: str | None = None,
    ssh_config: str | None = None,
    known_hosts: str | None = None,
    json: bool = False,
):
    """List the releases on each node; `*` marks the current one."""
    from mento_fab import report as reporting
    from mento_fab.deploy import default_target
    from mento_fab.deploy import releases as list_releases

    workers = _fanout(c, fanout)
    md, _ = common.load(c, root_dir, metadata)
    label = _target(c, target) or default_target(md)
    with common.group(
        c, md, nodes=nodes, exclude=skip_nodes, connect_timeout=connect_timeout,
        host_keys=host_keys, ssh_config=ssh_config, known_hosts=known_hosts,
    ) as grp:  # fmt: skip
        run, found = list_releases(grp, md, label, fanout=workers)
    if json:
        common.print_json(
            reporting.to_json(
                run,
                target=label,
                releases={
                    n: {"current": r.current, "releases": r.releases} for n, r in found.items()
                },
            )
        )
    else:
        rows = []
        for node, info in found.items():
            if info.error:
                rows.append([node, "-", info.error])
                continue
            names = [f"*{r}" if r == info.current else r for r in info.releases] or ["(none)"]
            rows.append([node, info.current or "-", " ".join(names)])
        console.print_table(f"releases in {label}", ["node", "current", "releases"], rows)
        console.print_summary(run)
    if run.exit_status:
        raise Exit(code=run.exit_status)
