"""The command line a node's shell runs for us: environment, run id, time limit, watchdog.

Without a pty, sshd sends no hang-up when the client goes away, so a plain
``ssh node cmd`` leaves ``cmd`` running after a Ctrl-C or a lost connection. The
line built here ends the command, and everything it started, when that happens:

- every process the command starts carries ``MENTO_RUN_ID`` in its environment
  (the run's id, the same on every node of one run);
- a watchdog, a forked subshell (no new program), holds the channel's stdin, which
  the client keeps open and on which it only writes a newline every
  :data:`HEARTBEAT` seconds. The watchdog reads EOF when the client closes the
  channel (Ctrl-C, a time-out, giving up), when the connection ends (client
  killed, connection reset) or when the sshd session process dies; under bash it
  also gives up on a client it has not heard from for :data:`CLIENT_SILENCE`
  seconds (a crashed machine, a cut link: nothing reaches the node then). If the
  command still runs then, it sends SIGTERM to the command's process group and to
  every process of the account that carries the run id, and SIGKILL after a grace
  period.
  When the command ends by itself, sshd closes stdin too; the watchdog finds the
  command gone and leaves quietly, so ``nohup prog &`` still outlives a command
  that ended normally, as it does with ssh;
- with a time limit, ``timeout(1)`` kills the command's process group; processes
  that left it (``setsid``) are then found by the run id.

The command itself reads ``/dev/null``. The line needs a POSIX shell as the
account's login shell (``bash`` on the nodes), GNU ``grep`` and ``/proc``.

>>> line = remote_command("echo $MENTO_RUN_ID", run_id="3f2a")
>>> "MENTO_RUN_ID=3f2a" in line and line.endswith("; echo $MENTO_RUN_ID")
True
"""

from __future__ import annotations

import math
import re
import secrets
import shlex
from collections.abc import Mapping

from mento_fab import defaults
from mento_fab.errors import BadInput

__all__ = ["RUN_ID_VARIABLE", "check_env", "new_run_id", "remote_command"]

#: The environment variable that marks every process of one run.
RUN_ID_VARIABLE = "MENTO_RUN_ID"
#: Seconds between SIGTERM and SIGKILL, on a time-out and when the client went away.
KILL_AFTER = defaults.KILL_GRACE / 2
#: Seconds between the newlines a client writes to a running command's watchdog.
HEARTBEAT = defaults.KEEPALIVE_INTERVAL
#: Seconds without a word from the client after which the watchdog ends the command
#: (bash only: other shells' ``read`` has no time limit, they wait for EOF).
CLIENT_SILENCE = 2 * defaults.DEAD_PEER_TIMEOUT

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# _mk SIGNAL [PGID]: signal every process of this account that carries the run id
# (readable /proc/PID/environ: only our own; _n=1 when there was one), then the
# process group. The shell and its forks were not exec'd after the id was set, so
# they do not carry it; the helpers run with the id unset.
_KILL = (
    '_mk() { _n=0; for _p in $(grep -lzxF "' + RUN_ID_VARIABLE + '=$_mi" /proc/[0-9]*/environ '
    "2>/dev/null); do _p=${_p#/proc/}; kill -$1 ${_p%/environ} 2>/dev/null && _n=1; done; "
    '[ -n "$2" ] && kill -$1 -- -$2 2>/dev/null; }'
)
# _mw [PID]: wait (at most the grace period) while PID or a process with the run id
# lives, then SIGKILL what is left, the process group of PID last.
_WAIT_KILL = (
    "_mw() { _w=0; while [ $_w -lt {ticks} ] && { { [ -n \"$1\" ] && kill -0 $1 2>/dev/null; "
    "} || { _mk 0; [ $_n = 1 ]; }; }; do sleep 0.1; _w=$((_w+1)); done; _mk KILL $1; }"
)
# The watchdog: fd 3 is the channel's stdin (an asynchronous list gets /dev/null as
# its stdin otherwise). It ignores SIGTERM itself; the group's SIGKILL ends it last.
_WATCHDOG = (
    "{ unset " + RUN_ID_VARIABLE + "; trap '' TERM HUP; _t=; "
    '[ -n "$BASH_VERSION" ] && _t="-t {silence}"; while read -r $_t _; do :; done; '
    "kill -0 $_mp 2>/dev/null || exit 0; _mk TERM $_mp; _mw $_mp; } <&3 >/dev/null 2>&1 &"
)
# After timeout(1) gave up on the command: whatever left its process group.
_STRAYS = (
    "unset " + RUN_ID_VARIABLE + "; case $_s in 124|137) _mk TERM; "
    "[ $_n = 1 ] && { _mw; } >/dev/null 2>&1 & ;; esac; exit $_s"
)


def new_run_id() -> str:
    """A fresh run id: 12 hex digits, safe in a shell word and a grep pattern."""
    return secrets.token_hex(6)


def check_env(env: Mapping[str, str] | None) -> None:
    """Raise :class:`BadInput` for a variable name a shell cannot take."""
    for name in env or ():
        if not _ENV_NAME.match(name):
            raise BadInput(f"not a valid environment variable name: {name!r}")
        if name == RUN_ID_VARIABLE:
            raise BadInput(f"{RUN_ID_VARIABLE} is set by mento_fab itself")


def remote_command(
    command: str,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    *,
    run_id: str | None = None,
) -> str:
    """The line sent to the node for ``command``; everything variable is quoted.

    The client must keep the channel's stdin open (never send EOF) while the
    command runs, and write a newline to it every :data:`HEARTBEAT` seconds: EOF,
    or :data:`CLIENT_SILENCE` seconds without a word, tells the watchdog to end it.
    """
    check_env(env)
    run_id = run_id or new_run_id()
    if not _RUN_ID.match(run_id):
        raise BadInput(f"not a valid run id: {run_id!r}")
    grace = f"{KILL_AFTER:g}"
    ticks = str(max(1, math.ceil(KILL_AFTER / 0.1)))
    exports = "".join(f" {k}={shlex.quote(str(v))}" for k, v in (env or {}).items())
    head = (
        f"{RUN_ID_VARIABLE}={run_id}; _mi=${RUN_ID_VARIABLE}; _mp=$$; "
        f"export {RUN_ID_VARIABLE}{exports}; exec 3<&0; {_KILL}; "
        + _WAIT_KILL.replace("{ticks}", ticks)
        + "; "
        + _WATCHDOG.replace("{silence}", f"{CLIENT_SILENCE:g}")
        + " exec </dev/null 3<&-"
    )
    if timeout is None:
        # The command goes last and unquoted, exactly as the user wrote it, so the
        # shell can still exec a last simple command instead of forking for it.
        return f"{head}; {command}"
    # timeout(1) puts the command in its own process group and kills the whole
    # group, so children die too; -k escalates to SIGKILL for the stubborn.
    limited = (
        f'timeout -k {grace} {timeout:g} "${{SHELL:-/bin/sh}}" -c {shlex.quote(command)}; _s=$?'
    )
    return f"{head}; {limited}; {_STRAYS}"
