"""``ssh``, ``tunnel``, ``put`` and ``get``: work on the reserved nodes by hand.

invoke's positional arguments are always required, so ``ssh`` takes its NODE
first and the remote command after ``--`` (``mento-fab ssh cn01 -- nvidia-smi -L``;
the words are joined with spaces, as ``ssh`` does) or as ``--command``.
``put``/``get`` show a byte progress bar on a terminal and one line per node.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from invoke import Context, Exit

from mento_fab.cli import console
from mento_fab.cli.options import COMMON, NODES, SSH, Options, mento_task, print_json
from mento_fab.errors import BadInput, MentoError, NodeError, SelectionError

__all__ = ["get", "put", "ssh", "tunnel"]


def _policy(opts: Options) -> str:
    from mento_fab.hostkeys import HostKeyPolicy

    value = opts.setting("host_keys")
    try:
        policy = HostKeyPolicy(value)
    except ValueError:
        raise BadInput(f"--host-keys must be accept-new, strict or off, not {value!r}") from None
    if policy is HostKeyPolicy.OFF:
        print(
            "mento-fab: WARNING: host key checking is OFF: any machine answering for a "
            "node is trusted with the beamtime's key and data",
            file=sys.stderr,
        )
    return policy


@mento_task(
    shared=(*COMMON, *SSH),
    help={
        "node": "the reserved node to log in to",
        "command": "run this command instead of a login shell (or put it after --)",
        "tty": "give the command a terminal (ssh -t), e.g. for top or an editor",
        "dry_run": "print the ssh command line instead of running it",
    },
)
def ssh(
    c: Context,
    opts: Options,
    node: str,
    command: str | None = None,
    tty: bool = False,
    dry_run: bool = False,
):
    """Log in to NODE with OpenSSH as the beamtime account; `ssh NODE -- CMD` runs CMD there."""
    from mento_fab.openssh import ssh_argv

    rest = c.config.get("mento_fab_remainder") or None
    if command and rest:
        raise BadInput("give the command either with --command or after --, not both")
    argv = ssh_argv(
        opts.session(),
        node,
        command or rest,
        ssh_config=opts.setting("ssh_config"),
        known_hosts=opts.values.get("known_hosts") or opts.setting("known_hosts"),
        host_keys=_policy(opts),
        connect_timeout=opts.connect_timeout,
        tty=True if tty else None,
    )
    if dry_run:
        if opts.json:
            print_json({"argv": argv})
        else:
            print(shlex.join(argv))
        return
    program = shutil.which(argv[0])
    if program is None:
        raise MentoError("the OpenSSH client (ssh) is not installed")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(program, argv)  # the exit status is ssh's: the remote command's, or 255
    except OSError as exc:
        raise Exit(f"mento-fab: cannot run {program}: {exc.strerror}", code=1) from None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@mento_task(
    shared=(*COMMON, *SSH),
    help={
        "node": "the reserved node to forward to",
        "remote_port": "the port on the node (e.g. 8888 for Jupyter)",
        "local_port": "local port on 127.0.0.1 (default: a free one, printed)",
        "remote_host": "host to reach, as seen from the node (default localhost)",
    },
)
def tunnel(
    c: Context,
    opts: Options,
    node: str,
    remote_port: str,
    local_port: str | None = None,
    remote_host: str | None = None,
):
    """Forward a local port (127.0.0.1 only) to REMOTE_PORT on NODE, print its URL; Ctrl-C ends."""
    from mento_fab.tunnel import Tunnel, check_port

    remote = check_port(remote_port, "REMOTE_PORT")
    local = check_port(local_port or 0, "--local-port", allow_zero=True)
    session = opts.session()
    group = opts.group(session, nodes=node)
    if len(group) != 1:
        raise SelectionError(f"a tunnel goes to one node, not {len(group)} ({node})")
    forward = Tunnel(
        group[0], remote, remote_host=remote_host or "localhost", local_port=local,
        own_connection=True,
    )  # fmt: skip
    forward.start()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        target = f"{forward.remote_host}:{forward.remote_port} on {forward.node}"
        if opts.json:
            print_json({
                "url": forward.url, "local_port": forward.local_port, "node": forward.node,
                "remote_host": forward.remote_host, "remote_port": forward.remote_port,
            })  # fmt: skip
        else:
            print(forward.url)
        sys.stdout.flush()
        print(f"mento-fab: forwarding {forward.url} to {target}; Ctrl-C to stop", file=sys.stderr)
        while not forward.wait(1.0):
            pass
    except KeyboardInterrupt:
        forward.close()
        print("mento-fab: tunnel closed", file=sys.stderr)
        return
    finally:
        forward.close()
        signal.signal(signal.SIGTERM, previous)
    if forward.error:
        raise NodeError(f"tunnel ended: {forward.error}")


class _Bar:
    """A byte progress bar that appears once the transfer knows its total."""

    def __init__(self, description: str, enabled: bool) -> None:
        self.description = description
        self.enabled = enabled
        self.bar: console.Progress | None = None

    def total(self, total: int) -> None:
        if self.enabled and total:
            self.bar = console.Progress(total, self.description, nbytes=True).__enter__()

    def add(self, node: str, amount: int) -> None:
        if self.bar is not None:
            self.bar.add(amount)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _interruptible(work: Callable[[], Any], group: Any) -> Any:
    """Run ``work`` in a thread; on Ctrl-C close every connection so the node threads end
    at once (their half-received files are removed) instead of finishing their transfers."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(work())
        except BaseException as exc:  # handed to the caller
            box.append(exc)

    worker = threading.Thread(target=run, name="mento-transfer", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        for conn in group:
            conn.close()
        worker.join(10)
        raise
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def _transfer(opts: Options, description: str, call: Any) -> None:
    """Run a transfer with a progress bar; one line per node, the summary, the exit rule."""
    session = opts.session()
    bar = _Bar(description, enabled=not opts.json and console.is_tty())
    try:
        with opts.group(session) as grp:
            report = _interruptible(lambda: call(grp, session, bar), grp)
    finally:
        bar.close()
    if opts.json:
        print_json(report.as_json())
    else:
        rows = []
        for r in report.results:
            state = "ok" if r.ok else ("unreachable" if r.error else f"exit {r.exit}")
            rows.append([r.node, state, f"{r.seconds:.1f} s", r.error or r.message or ""])
        console.print_table(report.command, ["node", "result", "time", "notes"], rows)
        for r in report.results:
            if not r.ok and r.stderr.strip():
                for line in r.stderr.strip().splitlines()[-3:]:
                    print(f"{r.node}: {line}", file=sys.stderr)
        console.print_summary(report)
    if report.exit_status:
        raise Exit(code=report.exit_status)


@mento_task(
    shared=NODES,
    help={
        "local": "the file or directory to copy",
        "remote": "where on each node, as for scp: an existing directory receives LOCAL, "
        "anything else is the new name; a trailing / creates the directory",
    },
)
def put(c: Context, opts: Options, local: str, remote: str):
    """Copy LOCAL to REMOTE on every selected node (a directory the nodes share: once)."""
    from mento_fab.transfer import put as put_files

    def call(grp: Any, session: Any, bar: _Bar) -> Any:
        return put_files(grp, local, remote, metadata=session, fanout=opts.fanout,
                         on_total=bar.total, on_bytes=bar.add)  # fmt: skip

    _transfer(opts, "sending", call)


@mento_task(
    shared=NODES,
    help={
        "remote": "file, directory or pattern on the nodes, e.g. '~/scans/run*/out.h5' "
        "(quote it); names below its last directory without a wildcard are kept",
        "local_dir": "local directory: each node's files land in LOCAL_DIR/<node>/",
        "overwrite": "replace local files that exist already",
    },
)
def get(c: Context, opts: Options, remote: str, local_dir: str, overwrite: bool = False):
    """Copy REMOTE from every selected node into LOCAL_DIR/<node>/ (like clush --rcopy)."""
    from mento_fab.transfer import get as get_files

    def call(grp: Any, session: Any, bar: _Bar) -> Any:
        return get_files(grp, remote, local_dir, overwrite=overwrite, metadata=session,
                         fanout=opts.fanout, on_total=bar.total, on_bytes=bar.add)  # fmt: skip

    _transfer(opts, "receiving", call)
