"""Slurm in the lab: munged and slurmctld on the host, one slurmd inside each node.

Several slurmd on one machine normally need a Slurm built with
``--enable-multiple-slurmd`` (and distinct ports per slurmd); here every slurmd lives
in its own network, UTS, mount and pid namespace, so each binds port 6818 on its own
address and sees its own host name, and the stock Debian build works
(``slurmd -N cnXX`` only makes the name explicit).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from lab.cluster import LabError, _alive, _kill, _run

if TYPE_CHECKING:
    from lab.cluster import Lab

CPUS = os.cpu_count() or 1


def slurm_dir(lab: Lab) -> str:
    """Where slurm.conf, state, spool and logs live (``<workdir>/slurm``)."""
    return str(lab.workdir / "slurm")


def conf_path(lab: Lab) -> str:
    """The lab's slurm.conf, also exported as SLURM_CONF to SSH sessions on the nodes."""
    return str(lab.workdir / "slurm" / "slurm.conf")


def client_env(lab: Lab) -> dict[str, str]:
    """Environment for Slurm client commands run on the host against the lab."""
    return {**os.environ, "SLURM_CONF": conf_path(lab)}


def _hostlist(lab: Lab) -> str:
    return f"cn[01-{len(lab.nodes):02d}]" if len(lab.nodes) > 1 else lab.nodes[0]


def write_config(lab: Lab) -> None:
    """Write the munge key and slurm.conf; Slurm state is wiped so every start is fresh."""
    wd = lab.workdir
    munge = wd / "munge"
    slurm = wd / "slurm"
    for d in (munge, slurm):
        if d.exists():
            shutil.rmtree(d)
    dirs = [munge, slurm, *(slurm / d for d in ("state", "spool", "log", "run"))]
    dirs += [slurm / "spool" / n for n in lab.nodes]
    for d in dirs:
        d.mkdir(parents=True)
        os.chmod(d, 0o755)  # lab user needs o+x to reach the munge socket and slurm.conf
    key = munge / "munge.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(1024))
    ctl_host = socket.gethostname().split(".")[0]
    plugstack = slurm / "plugstack.conf"
    plugstack.write_text("")
    lines = [
        "# mento lab: generated, wiped on every start",
        "ClusterName=mentolab",
        f"SlurmctldHost={ctl_host}({lab.host_address})",
        f"SlurmctldPort={lab.slurmctld_port}",
        "SlurmdPort=6818",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge / 'munge.socket'}",
        f"StateSaveLocation={slurm / 'state'}",
        f"SlurmdSpoolDir={slurm / 'spool' / '%n'}",
        f"SlurmctldPidFile={slurm / 'slurmctld.pid'}",
        f"SlurmdPidFile={slurm / 'run' / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={slurm / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={slurm / 'log' / 'slurmd-%n.log'}",
        f"PlugStackConfig={plugstack}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "ReturnToService=2",
        "SlurmctldTimeout=10",
        "SlurmdTimeout=30",
        "MessageTimeout=5",
        "InactiveLimit=30",
        "KillWait=2",
        "MinJobAge=30",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "SlurmdParameters=config_overrides",
        "TreeWidth=64",
        "MailProg=/bin/true",
    ]
    for n in lab.nodes:
        lines.append(f"NodeName={n} NodeAddr={lab.addresses[n]} CPUs={CPUS} State=UNKNOWN")
    lines.append(
        f"PartitionName={lab.partition} Nodes={_hostlist(lab)}"
        " Default=YES MaxTime=INFINITE State=UP"
    )
    (slurm / "slurm.conf").write_text("\n".join(lines) + "\n")
    os.chmod(slurm / "slurm.conf", 0o644)


def start(lab: Lab, timeout: float = 60) -> None:
    """Start munged, slurmctld and the slurmds; create the reservation; wait for idle nodes."""
    stop(lab)
    write_config(lab)
    wd = lab.workdir
    munge = wd / "munge"
    lab.slurm_pids["munged"] = lab._spawn(
        [
            "munged",
            "--foreground",
            "--force",
            f"--socket={munge / 'munge.socket'}",
            f"--key-file={munge / 'munge.key'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={munge / 'munged.log'}",
            f"--seed-file={munge / 'munged.seed'}",
            "--num-threads=4",
        ],
        munge / "munged.out",
    )
    _wait(lambda: (munge / "munge.socket").exists(), 10, "munged socket", lab, "munged")
    lab.slurm_pids["slurmctld"] = lab._spawn(
        ["slurmctld", "-D", "-c", "-i", "-f", conf_path(lab)],
        wd / "slurm" / "log" / "slurmctld.out",
    )
    _wait(lambda: _ping(lab), 20, "slurmctld", lab, "slurmctld")
    # Daemonized, each slurmd becomes a child of its node's init (own pid namespace).
    run = wd / "slurm" / "run"
    log_dir = wd / "slurm" / "log"
    lab._start_daemons(
        {n: ["slurmd", "-N", n, "-f", conf_path(lab)] for n in lab.nodes},
        {n: log_dir / f"slurmd-{n}.out" for n in lab.nodes},
    )
    pids = lab._daemon_pids({n: run / f"slurmd-{n}.pid" for n in lab.nodes})
    lab.slurm_pids.update({f"slurmd:{n}": pid for n, pid in pids.items()})
    _wait(lambda: _all_idle(lab), timeout, "all nodes idle in sinfo", lab, None)
    _run(
        [
            "scontrol",
            "create",
            "reservation",
            f"ReservationName={lab.reservation}",
            f"Users={lab.user}",
            f"Nodes={_hostlist(lab)}",
            f"PartitionName={lab.partition}",
            "StartTime=now",
            "Duration=UNLIMITED",
            "Flags=IGNORE_JOBS",
        ],
        env=client_env(lab),
    )


def stop(lab: Lab) -> None:
    """Stop the slurmds, slurmctld and munged of the lab (nodes stay up)."""
    slurmd = [p for k, p in lab.slurm_pids.items() if k.startswith("slurmd:")]
    _kill(slurmd)
    _kill([lab.slurm_pids[k] for k in ("slurmctld", "munged") if k in lab.slurm_pids])
    for pid in list(lab.slurm_pids.values()):
        proc = lab._procs.pop(pid, None)
        if proc:
            proc.wait(timeout=5)
    lab.slurm_pids.clear()


def _ping(lab: Lab) -> bool:
    proc = subprocess.run(
        ["scontrol", "ping"], env=client_env(lab), capture_output=True, text=True, check=False
    )
    return "UP" in proc.stdout


def _all_idle(lab: Lab) -> bool:
    proc = subprocess.run(
        ["sinfo", "-h", "-N", "-p", lab.partition, "-o", "%N %t"],
        env=client_env(lab),
        capture_output=True,
        text=True,
        check=False,
    )
    states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
    return all(states.get(n) == "idle" for n in lab.nodes)


def _wait(
    cond: Callable[[], bool], timeout: float, what: str, lab: Lab, daemon: str | None
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if daemon and not _alive(lab.slurm_pids[daemon]):
            raise LabError(f"{daemon} exited; see the logs in {lab.workdir}")
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout}s waiting for {what}; logs in {lab.workdir}")
        time.sleep(0.1)


def stop_controller(lab: Lab) -> None:
    """Stop slurmctld alone (munged and the slurmds stay): Slurm's clients cannot reach it."""
    pid = lab.slurm_pids.pop("slurmctld", None)
    if pid is not None:
        _kill([pid])
        proc = lab._procs.pop(pid, None)
        if proc:
            proc.wait(timeout=5)
    lab._save_state()


def start_controller(lab: Lab, timeout: float = 60) -> None:
    """Start slurmctld again from its saved state (the reservation and jobs survive),
    and wait until every node is back (not unknown, down or not responding)."""
    wd = lab.workdir
    lab.slurm_pids["slurmctld"] = lab._spawn(
        ["slurmctld", "-D", "-i", "-f", conf_path(lab)],
        wd / "slurm" / "log" / "slurmctld.out",
    )
    lab._save_state()
    _wait(lambda: _ping(lab), 20, "slurmctld", lab, "slurmctld")
    _wait(lambda: _all_responding(lab), timeout, "nodes back after a restart", lab, None)


def _all_responding(lab: Lab) -> bool:
    proc = subprocess.run(
        ["sinfo", "-h", "-N", "-p", lab.partition, "-o", "%N %t"],
        env=client_env(lab),
        capture_output=True,
        text=True,
        check=False,
    )
    states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
    bad = ("unk", "down", "drain", "fail", "*")
    return all(n in states and not any(b in states[n] for b in bad) for n in lab.nodes)
