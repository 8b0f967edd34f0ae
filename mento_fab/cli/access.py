"""``ssh``, ``tunnel``, ``put`` and ``get``: work on the reserved nodes by hand.

invoke's positional arguments are always required, so ``ssh`` takes its NODE
first and the remote command after ``--`` (``mento-fab ssh cn01 -- nvidia-smi -L``;
the words are joined with spaces, as ``ssh`` does) or as ``--command``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
from typing import Any

from invoke import Context, Exit

from mento_fab.cli.options import COMMON, SSH, Options, mento_task, print_json
from mento_fab.errors import BadInput, MentoError, NodeError, SelectionError

__all__ = ["ssh", "tunnel"]


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
