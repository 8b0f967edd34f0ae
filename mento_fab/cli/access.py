"""``ssh``, ``tunnel``, ``put`` and ``get``: work on the reserved nodes by hand.

invoke's positional arguments are always required, so ``ssh`` takes its NODE
first and the remote command after ``--`` (``mento-fab ssh cn01 -- nvidia-smi -L``;
the words are joined with spaces, as ``ssh`` does) or as ``--command``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

from invoke import Context, Exit

from mento_fab.cli.options import COMMON, SSH, Options, mento_task, print_json
from mento_fab.errors import BadInput, MentoError

__all__ = ["ssh"]


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
