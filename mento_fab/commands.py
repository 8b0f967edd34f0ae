"""The ``ssh`` and ``sbatch`` command strings of the original ``mento.trigger``.

Scripts that build their own command lines (``subprocess.run(cmd, shell=True)``,
a cron job, a launcher) keep using :func:`get_ssh_command` and
:func:`get_sbatch_command` and get the original's strings, with two changes
(docs/compatibility.md): host keys are checked (``StrictHostKeyChecking=accept-new``
instead of ``no``: a new node's key is recorded, a *changed* key is refused), and
every value is shell-quoted, which changes nothing for the names a validated
metadata file holds but keeps a path with a space one word.

mento_fab itself never runs these strings: :class:`mento_fab.trigger.Trigger`
keeps one SSH connection per node instead of one ``ssh`` process per trigger.

>>> from mento_fab.beamtime import BeamtimeMetadata, OnlineInfo, SlurmInfo, SSHInfo
>>> md = BeamtimeMetadata("p11", "11019999", "/asap3/x", "current", OnlineInfo(
...     SSHInfo("bttest02", "/gpfs/current/shared/id_rsa"), SlurmInfo("ponline", "11019999"),
...     ["max-p3a001"]))
>>> get_sbatch_command(md)  # doctest: +NORMALIZE_WHITESPACE
'/usr/bin/sbatch --partition=ponline --reservation=11019999 --job-name=mento_p11_11019999
 --dependency= --time=1-0 --output=/dev/null --error=/dev/null'
"""

from __future__ import annotations

import os
import shlex

from mento_fab.beamtime import BeamtimeMetadata, OnlineInfo
from mento_fab.defaults import CONNECT_TIMEOUT, SLURM_TIME
from mento_fab.errors import NoOnlineAnalysis, SelectionError
from mento_fab.names import HOSTNAME_RE

__all__ = ["SBATCH", "SSH", "SSH_OPTIONS", "get_sbatch_command", "get_ssh_command"]

#: Absolute paths, as the original: the beamline PC's PATH is not to be trusted.
SSH = "/usr/bin/ssh"
SBATCH = "/usr/bin/sbatch"

#: The original's options, in its order; only StrictHostKeyChecking differs (``no`` there).
SSH_OPTIONS = (
    "BatchMode=yes",
    "CheckHostIP=no",
    "StrictHostKeyChecking=accept-new",
    "GSSAPIAuthentication=no",
    "GSSAPIDelegateCredentials=no",
    "PasswordAuthentication=no",
    "PubkeyAuthentication=yes",
    "PreferredAuthentications=publickey",
    "IdentitiesOnly=yes",
    f"ConnectTimeout={CONNECT_TIMEOUT:g}",
)


def _online(bt_info: BeamtimeMetadata) -> OnlineInfo:
    if bt_info.online is None:
        raise NoOnlineAnalysis(bt_info.beamtime)
    return bt_info.online


def get_ssh_command(bt_info: BeamtimeMetadata, destination: str | None = None) -> str:
    """The ``ssh`` command line that logs in to ``destination`` as the beamtime account.

    ``destination`` defaults to the first reserved node. A destination that is
    not a host name (``-oProxyCommand=…``, ``user@host``) raises
    :class:`~mento_fab.errors.SelectionError`; a beamtime without reserved nodes
    raises :class:`~mento_fab.errors.NoOnlineAnalysis`.
    """
    online = _online(bt_info)
    if not destination and not online.nodes:
        raise SelectionError(f"beamtime {bt_info.beamtime} lists no reserved node to log in to")
    host = destination if destination else str(online.nodes[0])
    if not HOSTNAME_RE.match(host):
        raise SelectionError(f"not a host name: {host!r}")
    options = "".join(f" -o {option}" for option in SSH_OPTIONS)
    key, user = shlex.quote(online.ssh.key), shlex.quote(online.ssh.user)
    return f"{SSH}{options} -i {key} -l {user} {host}"


def get_sbatch_command(
    bt_info: BeamtimeMetadata,
    job_name: str | None = None,
    job_maxtime: str | None = None,
    job_dependency: str | None = None,
    logfile_path: str | None = None,
) -> str:
    """The ``sbatch`` command line (without the script) for the beamtime's reservation.

    Defaults as the original: job name ``mento_<beamline>_<beamtime>``, no
    dependency, a time limit of one day, and output and errors to ``/dev/null``.
    """
    online = _online(bt_info)
    logfile = logfile_path if logfile_path else os.devnull
    options = {
        "partition": online.slurm.partition,
        "reservation": online.slurm.reservation,
        "job-name": job_name if job_name else f"mento_{bt_info.beamline}_{bt_info.beamtime}",
        "dependency": job_dependency if job_dependency else "",
        "time": job_maxtime if job_maxtime else SLURM_TIME,
        "output": logfile,
        "error": logfile,
    }
    return SBATCH + "".join(f" --{name}={_word(value)}" for name, value in options.items())


def _word(value: object) -> str:
    """One shell word; unchanged when it needs no quoting, and empty stays empty."""
    text = str(value)
    return shlex.quote(text) if text else ""
