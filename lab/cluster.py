"""A real cluster on one machine, for tests, the demo and benchmarks.

Each node is a network namespace on a private bridge, with its own host name (UTS
namespace), its own node-local tmpfs at ``/srv/local`` (mount namespace; ``/home``
stays the host's, like a cluster home), its own pid namespace (``ps``/``pkill`` on a
node see that node only) and its own ``sshd``.  A tiny init (pid 1 of the node) owns
the namespaces and reaps orphans, so ``sshd`` (and ``slurmd``) can be stopped and
restarted without losing the node's state, and killing it kills everything on the
node.  The library never imports this package.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_WORKDIR = Path("/tmp/mento-lab")
MAX_NODES = 64
BEAMLINE = "p11"
BEAMTIME_ID = "11019999"
PARTITION = "lab"
RESERVATION = BEAMTIME_ID
ASAPO_ENDPOINT = "asapo-services.lab.invalid:8400"
LOCAL_DIR = "/srv/local"
MARKER = ".mentolab"
PR_SET_CHILD_SUBREAPER = 36
# pid 1 of a node: reaps every orphan of the node (sessions' leftovers, daemonized
# slurmstepd), so nothing turns into a zombie; killing it kills the whole node.
_INIT = "$SIG{TERM} = sub { exit 0 }; $SIG{CHLD} = sub {}; while (1) { sleep 1 if wait() == -1 }"

_DAEMONS = {
    "sshd",
    "sleep",
    "sh",
    "nsenter",
    "unshare",
    "munged",
    "slurmctld",
    "slurmd",
    "slurmstepd",
}
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")
_SUBNET_RE = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})$")


class LabError(RuntimeError):
    """The lab could not be brought up, driven or torn down."""


def _run(
    argv: list[str],
    *,
    input: str | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a host command; failures carry the command's stderr so errors are actionable."""
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, check=False, env=env)
    if check and proc.returncode != 0:
        raise LabError(
            f"{' '.join(argv[:4])} ... failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


def _keygen(path: Path, comment: str) -> None:
    """A new passphrase-less ed25519 key pair at ``path`` (client key or host key)."""
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _alive(pid: int) -> bool:
    """True while pid exists and is not a zombie (zombies hold no namespaces or ports)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _kill(pids: Iterable[int], *, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is still there; returns once all are gone (or timeout)."""
    pids = [p for p in pids if p > 1 and p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (timeout / 2)
        while time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if not pids:
                return
            time.sleep(0.02)
    if pids:
        log.warning("processes survived SIGKILL: %s", pids)


def _reap() -> None:
    """Collect every exited child, also orphans adopted as child subreaper.

    Only called from ``down``: reaping any child could steal the exit status of a
    subprocess another thread is waiting for.
    """
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _become_subreaper() -> None:
    """Adopt orphans of the lab (daemonized slurmstepd, nohup'd jobs) instead of init.

    Init does not always reap (e.g. in some VMs); as subreaper we collect them in ``down``.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        log.debug("could not become child subreaper")


def _ssh_banner(address: str, port: int = 22, timeout: float = 0.5) -> bool:
    """True when an SSH server answers with its banner (a listening socket is not enough)."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


class Lab:
    """A lab cluster of ``nodes`` nodes (cn01...) reachable over SSH as ``user``.

    ``prefix`` and ``subnet`` name the namespaces, bridge and addresses, so a second
    small lab (e.g. for a teardown test) can run next to the main one.
    """

    def __init__(
        self,
        workdir: Path | str = DEFAULT_WORKDIR,
        nodes: int = 4,
        *,
        slurm: bool = False,
        user: str = "mentolab",
        prefix: str = "mentolab",
        subnet: str = "198.18.0",
        slurmctld_port: int = 6817,
    ) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be between 1 and {MAX_NODES}, got {nodes}")
        if not _NAME_RE.match(user) or user == "root":
            raise ValueError(f"invalid lab user {user!r}")
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"invalid prefix {prefix!r} (lower-case alphanumeric, at most 10)")
        if not _SUBNET_RE.match(subnet) or any(int(x) > 255 for x in subnet.split(".")):
            raise ValueError(f"invalid subnet {subnet!r} (three octets, e.g. 198.18.0)")
        self.workdir = Path(workdir).absolute()
        self.slurm = slurm
        self.user = user
        self.prefix = prefix
        self.subnet = subnet
        self.slurmctld_port = slurmctld_port
        self.nodes: list[str] = [f"cn{i:02d}" for i in range(1, nodes + 1)]
        self.addresses: dict[str, str] = {
            n: f"{subnet}.{10 + i}" for i, n in enumerate(self.nodes, 1)
        }
        self.host_address = f"{subnet}.1"
        self.bridge = f"{prefix}0"
        self.key = self.workdir / "id_ed25519"
        self.ssh_config = self.workdir / "ssh_config"
        self.known_hosts = self.workdir / "known_hosts"
        self.hosts_file = self.workdir / "hosts"
        self.root_dir = self.workdir / "gpfs"
        self.metadata_file = self.root_dir / "current" / f"beamtime-metadata-{BEAMTIME_ID}.json"
        self.state_file = self.workdir / "lab.json"
        self.partition = PARTITION
        self.reservation = RESERVATION
        self.holders: dict[str, int] = {}  # node -> host pid of the node's init
        self._unshare: dict[str, int] = {}  # node -> the unshare process that started init
        self.sshd: dict[str, int] = {}
        self.slurm_pids: dict[str, int] = {}
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    # ----------------------------------------------------------------- naming
    def netns(self, node: str) -> str:
        """The network namespace name of a node (``mentolab-cn01``)."""
        return f"{self.prefix}-{node}"

    def node_dir(self, node: str) -> Path:
        """Where a node's host key, sshd config and logs live."""
        return self.workdir / "nodes" / node

    @property
    def home(self) -> Path:
        """The lab user's (shared) home directory."""
        return Path(pwd.getpwnam(self.user).pw_dir)

    @property
    def authorized_keys(self) -> Path:
        """This lab's own authorized_keys file, so labs with other prefixes can run alongside."""
        return self.home / ".ssh" / f"authorized_keys.{self.prefix}"

    def env(self) -> dict[str, str]:
        """Environment variables that point the mento tool at this lab."""
        return {"MENTO_METADATA": str(self.metadata_file), "MENTO_SSH_CONFIG": str(self.ssh_config)}

    def __repr__(self) -> str:
        return f"Lab(workdir={str(self.workdir)!r}, nodes={len(self.nodes)}, slurm={self.slurm})"

    # ---------------------------------------------------------------- life cycle
    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self) -> Lab:
        """Bring every node up and wait until each answers SSH (and Slurm, if asked).

        A failure half-way tears everything down again before re-raising.
        """
        if os.geteuid() != 0:
            raise LabError(
                "the lab needs root (network namespaces, bridge, sshd); the library does not"
            )
        t0 = time.monotonic()
        _become_subreaper()
        self._cleanup_leftovers()
        try:
            self._prepare_workdir()
            self._ensure_user()
            self._write_keys_and_configs()
            self._create_network()
            self._start_holders()
            self._save_state()
            self._spawn_sshd(self.nodes)
            self._save_state()
            self._wait_ssh(self.nodes)
            self.make_session(self.workdir)
            if self.slurm:
                self.start_slurm()
            self._save_state()
        except BaseException:
            log.exception("lab bring-up failed; tearing down")
            self.down()
            raise
        log.info("lab up: %d nodes in %.2fs", len(self.nodes), time.monotonic() - t0)
        return self

    def down(self) -> None:
        """Remove every process, namespace, link and mount of this lab; idempotent.

        Also cleans leftovers of a crashed earlier run with the same prefix/workdir.
        """
        if self.state_file.exists() and not self.holders:
            try:
                self._load_state(json.loads(self.state_file.read_text()))
            except (OSError, ValueError, KeyError):
                log.warning("unreadable state file %s; cleaning by name", self.state_file)
        root_pids = [p for k, p in self.slurm_pids.items() if not k.startswith("slurmd:")]
        for pidfile in ("munge/munged.pid", "slurm/slurmctld.pid"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                root_pids.append(int((self.workdir / pidfile).read_text().split()[0]))
        _kill([p for p in root_pids if self._is_ours(p)])
        namespaces = self._lab_namespaces()
        node_pids: list[int] = []
        for ns in namespaces:
            out = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            node_pids += [int(p) for p in out if p.isdigit()]
        _kill([*node_pids, *self.holders.values(), *self._unshare.values(), *self.sshd.values()])
        _kill(self._workdir_processes())
        if namespaces:
            _run(
                ["ip", "-force", "-batch", "-"],
                input="".join(f"netns del {ns}\n" for ns in namespaces),
                check=False,
            )
        links = _run(["ip", "-o", "link", "show"], check=False).stdout
        stale = re.findall(rf"^\d+: ({re.escape(self.prefix)}(?:0|v\d+))[@:]", links, re.M)
        for link in stale:
            _run(["ip", "link", "del", link], check=False)
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        _reap()
        self._procs.clear()
        self.holders.clear()
        self._unshare.clear()
        self.sshd.clear()
        self.slurm_pids.clear()
        self.state_file.unlink(missing_ok=True)
        with contextlib.suppress(KeyError, OSError):
            self.authorized_keys.unlink(missing_ok=True)
        left = self.leftovers()
        if left:
            raise LabError(f"lab teardown left things behind: {left}")
        log.info("lab down")

    def leftovers(self) -> list[str]:
        """Namespaces, links and processes of this lab that still exist (empty after ``down``)."""
        left = [f"netns {ns}" for ns in self._lab_namespaces()]
        links = _run(["ip", "-o", "link", "show"], check=False).stdout
        left += [
            f"link {m}"
            for m in re.findall(rf"^\d+: ({re.escape(self.prefix)}(?:0|v\d+))[@:]", links, re.M)
        ]
        left += [f"process {p}" for p in self._workdir_processes()]
        return left

    @classmethod
    def from_state(cls, workdir: Path | str = DEFAULT_WORKDIR) -> Lab:
        """Reattach to a lab brought up by another process (``inv lab.up`` / ``lab.down``)."""
        state_file = Path(workdir).absolute() / "lab.json"
        try:
            state = json.loads(state_file.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab state in {workdir} (is the lab up?)") from None
        lab = cls(
            state["workdir"],
            len(state["nodes"]),
            slurm=state["slurm"],
            user=state["user"],
            prefix=state["prefix"],
            subnet=state["subnet"],
            slurmctld_port=state.get("slurmctld_port", 6817),
        )
        lab._load_state(state)
        return lab

    def is_up(self) -> bool:
        """True when every node's namespace holder and sshd are running."""
        return (
            bool(self.holders)
            and all(_alive(self.holders.get(n, 0)) for n in self.nodes)
            and all(_alive(self.sshd.get(n, 0)) for n in self.nodes)
        )

    def status(self) -> dict[str, dict[str, Any]]:
        """Per node: address, whether its sshd answers, and its pids."""
        return {
            n: {
                "address": self.addresses[n],
                "ssh": _ssh_banner(self.addresses[n]),
                "holder": self.holders.get(n),
                "sshd": self.sshd.get(n),
            }
            for n in self.nodes
        }

    # ------------------------------------------------------------ node control
    def node_exec(self, node: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run argv as root inside a node's namespaces (for test assertions)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 30)
        kw.setdefault("check", False)
        return subprocess.run(self._nsenter(node) + list(argv), **kw)

    def node_pids(self, node: str) -> dict[int, str]:
        """Processes running on a node (host pid -> command line), without the lab's daemons.

        Host pids, so a test can signal them from the host; inside the node (its own
        pid namespace) the same processes have other, node-local pids.
        """
        own = {
            self.holders.get(node),
            self._unshare.get(node),
            self.sshd.get(node),
            self.slurm_pids.get(f"slurmd:{node}"),
        }
        out = _run(["ip", "netns", "pids", self.netns(node)], check=False).stdout.split()
        result: dict[int, str] = {}
        for p in out:
            pid = int(p)
            if pid in own or not _alive(pid):
                continue
            try:
                cmd = (
                    Path(f"/proc/{pid}/cmdline")
                    .read_bytes()
                    .replace(b"\0", b" ")
                    .decode(errors="replace")
                )
            except OSError:
                continue
            result[pid] = cmd.strip()
        return result

    def stop_sshd(self, node: str) -> None:
        """Stop a node's sshd (open sessions survive, like a real ``systemctl stop ssh``)."""
        pid = self.sshd.pop(node, None)
        if pid:
            _kill([pid])
        self._save_state()

    def start_sshd(self, node: str) -> None:
        """Start a node's sshd and wait until it answers."""
        if node in self.sshd and _alive(self.sshd[node]):
            return
        self._spawn_sshd([node])
        self._save_state()
        self._wait_ssh([node])

    def restart_sshd(self, node: str) -> None:
        """Stop and start a node's sshd."""
        self.stop_sshd(node)
        self.start_sshd(node)

    def rotate_host_key(self, node: str, *, trust: bool = False) -> None:
        """Give a node a new host key and restart its sshd.

        ``known_hosts`` keeps the old key unless ``trust``, so clients must refuse the node.
        """
        key = self.node_dir(node) / "ssh_host_ed25519_key"
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        _keygen(key, f"{node}-host")
        if trust:
            self._write_known_hosts()
        self.restart_sshd(node)

    def host_key(self, node: str) -> str:
        """The node's current public host key (``ssh-ed25519 AAAA...``)."""
        pub = (self.node_dir(node) / "ssh_host_ed25519_key.pub").read_text().split()
        return f"{pub[0]} {pub[1]}"

    def ssh(
        self, node: str, command: str, *, timeout: float = 30, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on a node with the real OpenSSH client, as the lab user."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("check", False)
        return subprocess.run(
            ["ssh", "-F", str(self.ssh_config), node, command], timeout=timeout, **kw
        )

    # -------------------------------------------------------------- sessions
    def make_session(
        self, dest: Path | str, nodes: list[str] | None = None, **overrides: Any
    ) -> Path:
        """Write a session tree ``dest/gpfs/current/beamtime-metadata-<id>.json`` + ``shared/``.

        ``nodes`` (default: all) become ``onlineAnalysis.reservedNodes``.  ``overrides``
        replace top-level keys; a dict value is merged into a dict key (e.g.
        ``onlineAnalysis={"userAccount": "x"}``) and ``None`` removes the key.
        Returns the metadata file path; ``dest/gpfs`` is the tool's ``--root-dir``.
        """
        nodes = list(self.nodes if nodes is None else nodes)
        unknown = sorted(set(nodes) - set(self.nodes))
        if unknown:
            raise ValueError(f"not lab nodes: {unknown}")
        meta_dir = Path(dest).absolute() / "gpfs" / "current"
        shared = meta_dir / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        (Path(dest).absolute() / "gpfs" / "local").mkdir(exist_ok=True)
        for name, content in (
            ("id_rsa", self.key.read_bytes()),
            ("asapo-token.txt", secrets.token_urlsafe(32).encode()),
            ("asapo-token-clbt.txt", secrets.token_urlsafe(32).encode()),
        ):
            path = shared / name
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
        shutil.copyfile(self.key.with_suffix(".pub"), shared / "id_rsa.pub")
        os.chmod(shared / "id_rsa.pub", 0o644)

        now = datetime.datetime.now().replace(microsecond=0)
        fmt = "%Y-%m-%d %H:%M:%S"
        doc: dict[str, Any] = {
            "applicant": {
                "email": "a@lab.invalid",
                "institute": "Lab",
                "lastname": "Doe",
                "userId": "100001",
                "username": "jdoe",
            },
            "asapo": {
                "beamtimeClbtTokenPath": "shared/asapo-token-clbt.txt",
                "beamtimeTokenPath": "shared/asapo-token.txt",
                "endpoint": ASAPO_ENDPOINT,
            },
            "beamline": BEAMLINE,
            "beamlineAlias": BEAMLINE.upper(),
            "beamlineSetup": "mento lab",
            "beamtimeId": BEAMTIME_ID,
            "contact": "None",
            "eventEnd": (now + datetime.timedelta(days=3)).strftime(fmt),
            "eventStart": now.strftime(fmt),
            "facility": "PETRA III",
            "generated": now.strftime(fmt),
            "leader": {
                "email": "l@lab.invalid",
                "institute": "Lab",
                "lastname": "Roe",
                "userId": "100002",
                "username": "rroe",
            },
            "onlineAnalysis": {
                "reservedNodes": nodes,
                "slurmPartition": self.partition,
                "slurmReservation": self.reservation,
                "sshPrivateKeyPath": "shared/id_rsa",
                "sshPublicKeyPath": "shared/id_rsa.pub",
                "userAccount": self.user,
            },
            "pi": {
                "email": "p@lab.invalid",
                "institute": "Lab",
                "lastname": "Poe",
                "userId": "100003",
                "username": "ppoe",
            },
            "proposalId": "20260001",
            "proposalType": "I",
            "retentionPeriod": "default",
            "title": "mento lab session",
            "unixId": "None",
            "users": {"doorDb": ["jdoe", "rroe"], "special": [], "unknown": []},
        }
        for key, value in overrides.items():
            if value is None:
                doc.pop(key, None)
            elif isinstance(value, dict) and isinstance(doc.get(key), dict):
                doc[key] = {**doc[key], **value}
            else:
                doc[key] = value
        doc.setdefault(
            "corePath",
            f"/asap3/petra3/gpfs/{doc.get('beamline', BEAMLINE)}/2026/data/{doc.get('beamtimeId')}",
        )
        doc = dict(sorted(doc.items()))
        for old in meta_dir.glob("*metadata*.json"):
            old.unlink()
        path = meta_dir / f"beamtime-metadata-{doc.get('beamtimeId', BEAMTIME_ID)}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path

    # ------------------------------------------------------------------ Slurm
    def start_slurm(self) -> None:
        """Start munged, slurmctld and one slurmd per node; wait until all nodes are idle."""
        from lab import slurm

        slurm.start(self)
        self.slurm = True
        self._save_state()

    def stop_slurm(self) -> None:
        """Stop every Slurm daemon of the lab (the nodes stay up)."""
        from lab import slurm

        slurm.stop(self)
        self.slurm = False
        self._save_state()

    # -------------------------------------------------------------- internals
    def _nsenter(self, node: str) -> list[str]:
        holder = self.holders.get(node)
        if not holder or not _alive(holder):
            raise LabError(f"node {node} is not up")
        return ["nsenter", "-t", str(holder), "--net", "--uts", "--mount", "--pid", "--"]

    def _host_pid(self, node: str, ns_pid: int) -> int | None:
        """The host pid of a daemon of the node, from its node-local pid (pid files)."""
        init = self.holders[node]
        try:
            children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
        except OSError:
            return None
        for child in children:
            try:
                status = Path(f"/proc/{child}/status").read_text()
            except OSError:
                continue
            nspids = next(
                (ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")), []
            )
            if nspids and nspids[-1] == str(ns_pid):
                return int(child)
        return None

    def _daemon_pids(self, pidfiles: dict[str, Path], timeout: float = 20) -> dict[str, int]:
        """Wait for each node's daemon to write its pid file; return their host pids."""
        found: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        while len(found) < len(pidfiles):
            for node, pidfile in pidfiles.items():
                if node in found:
                    continue
                with contextlib.suppress(OSError, ValueError, IndexError):
                    pid = self._host_pid(node, int(pidfile.read_text().split()[0]))
                    if pid and _alive(pid):
                        found[node] = pid
            if len(found) < len(pidfiles):
                if time.monotonic() > deadline:
                    missing = sorted(set(pidfiles) - set(found))
                    raise LabError(f"daemon did not start on {missing}; see {pidfiles[missing[0]]}")
                time.sleep(0.01)
        return found

    def _start_daemons(self, argvs: dict[str, list[str]], logs: dict[str, Path]) -> None:
        """Run daemonizing commands inside nodes, in parallel; they become children of the
        node's init, so the nsenter we start exits at once."""
        procs = {}
        for node, argv in argvs.items():
            with open(logs[node], "ab") as out:
                procs[node] = subprocess.Popen(
                    self._nsenter(node) + argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        for node, proc in procs.items():
            try:
                rc = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = -1
            if rc != 0:
                raise LabError(
                    f"{argvs[node][0]} failed on {node}: {logs[node].read_text()[-500:]}"
                )

    def _spawn(self, argv: list[str], logfile: Path) -> int:
        """Start a long-running daemon detached from our session, logging to logfile."""
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs[proc.pid] = proc
        return proc.pid

    def _is_ours(self, pid: int) -> bool:
        """A lab daemon (by program name) whose command line names our workdir."""
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return comm in _DAEMONS and str(self.workdir).encode() + b"/" in cmd

    def _workdir_processes(self) -> list[int]:
        """Live processes whose command line names our workdir: crash leftovers to clean."""
        me = {os.getpid(), os.getppid()}
        pids = []
        for entry in os.listdir("/proc"):
            if (
                entry.isdigit()
                and int(entry) not in me
                and self._is_ours(int(entry))
                and _alive(int(entry))
            ):
                pids.append(int(entry))
        return pids

    def _lab_namespaces(self) -> list[str]:
        out = _run(["ip", "netns", "list"], check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(f"{self.prefix}-")]

    def _cleanup_leftovers(self) -> None:
        if self.state_file.exists() or self.leftovers():
            log.info("cleaning leftovers of an earlier lab run")
            self.down()

    def _prepare_workdir(self) -> None:
        wd = self.workdir
        if wd.exists() and any(wd.iterdir()) and not (wd / MARKER).exists():
            raise LabError(
                f"{wd} exists, is not empty and is not a lab work dir; refusing to wipe it"
            )
        if wd.exists():
            shutil.rmtree(wd)
        for d in (wd, wd / "nodes"):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        (wd / MARKER).write_text("mento lab work dir; wiped by the next lab up\n")
        Path(LOCAL_DIR).mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)

    def _ensure_user(self) -> None:
        try:
            pw = pwd.getpwnam(self.user)
        except KeyError:
            home = f"/home/{self.user}"
            _run(
                [
                    "useradd",
                    "--create-home",
                    "--home-dir",
                    home,
                    "--shell",
                    "/bin/bash",
                    "--user-group",
                    self.user,
                ]
            )
            pw = pwd.getpwnam(self.user)
        # '*': no password, but not "locked", which sshd refuses with UsePAM no.
        _run(["usermod", "-p", "*", self.user])
        home = Path(pw.pw_dir)
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        os.chmod(home, 0o755)
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(ssh_dir, pw.pw_uid, pw.pw_gid)
        os.chmod(ssh_dir, 0o700)

    def _write_keys_and_configs(self) -> None:
        pw = pwd.getpwnam(self.user)
        _keygen(self.key, f"{self.user}@mento-lab")

        def host_key(node: str) -> None:
            d = self.node_dir(node)
            d.mkdir(parents=True, exist_ok=True)
            _keygen(d / "ssh_host_ed25519_key", f"{node}-host")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(host_key, self.nodes))

        auth = self.authorized_keys
        auth.write_text(self.key.with_suffix(".pub").read_text())
        os.chown(auth, pw.pw_uid, pw.pw_gid)
        os.chmod(auth, 0o600)

        hostname = socket.gethostname().split(".")[0]
        lines = ["127.0.0.1 localhost", f"{self.host_address} {hostname} labhost"]
        lines += [f"{self.addresses[n]} {n}" for n in self.nodes]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        os.chmod(self.hosts_file, 0o644)

        aliases = " ".join(self.nodes + [self.addresses[n] for n in self.nodes])
        cfg = [f"# mento lab ssh_config: ssh -F {self.ssh_config} cn01 hostname", ""]
        for n in self.nodes:
            cfg += [f"Host {n}", f"    HostName {self.addresses[n]}", ""]
        cfg += [
            f"Host {aliases}",
            f"    User {self.user}",
            f"    IdentityFile {self.key}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {self.known_hosts}",
            "    StrictHostKeyChecking accept-new",
            "    BatchMode yes",
            "    ConnectTimeout 10",
            "    LogLevel ERROR",
            "",
        ]
        self.ssh_config.write_text("\n".join(cfg))
        self._write_known_hosts()
        for n in self.nodes:
            self._write_sshd_config(n)

    def _write_known_hosts(self) -> None:
        lines = [f"{n},{self.addresses[n]} {self.host_key(n)}" for n in self.nodes]
        self.known_hosts.write_text("\n".join(lines) + "\n")

    def _write_sshd_config(self, node: str) -> None:
        d = self.node_dir(node)
        cfg = [
            f"ListenAddress {self.addresses[node]}:22",
            f"HostKey {d / 'ssh_host_ed25519_key'}",
            f"PidFile {d / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            f"AllowUsers {self.user}",
            "PermitRootLogin no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "UseDNS no",
            "StrictModes yes",
            "MaxStartups 200:30:300",
            "MaxSessions 100",
            "LoginGraceTime 30",
            "X11Forwarding no",
            "PrintMotd no",
            "PrintLastLog no",
            "AcceptEnv LANG LC_*",
            f"SetEnv SLURM_CONF={self.workdir / 'slurm' / 'slurm.conf'}",
            "Subsystem sftp internal-sftp",
        ]
        (d / "sshd_config").write_text("\n".join(cfg) + "\n")

    def _create_network(self) -> None:
        cmds = [
            f"link add {self.bridge} type bridge",
            f"addr add {self.host_address}/24 dev {self.bridge}",
            f"link set {self.bridge} up",
        ]
        for i, n in enumerate(self.nodes, 1):
            ns = self.netns(n)
            cmds += [
                f"netns add {ns}",
                f"link add {self.prefix}v{i:02d} type veth peer name eth0 netns {ns}",
                f"link set {self.prefix}v{i:02d} master {self.bridge} up",
            ]
        _run(["ip", "-batch", "-"], input="\n".join(cmds) + "\n")

    def _start_holders(self) -> None:
        """Start one namespace holder per node, all at once, then wait until each is ready."""
        for n in self.nodes:
            d = self.node_dir(n)
            ready = d / "ready"
            script = "; ".join(
                [
                    "set -e",
                    f"hostname {n}",
                    f"mount -t tmpfs -o size=512m,mode=1777 {self.prefix}-local {LOCAL_DIR}",
                    f"mount --bind {self.hosts_file} /etc/hosts",
                    "ip link set lo up",
                    f"ip addr add {self.addresses[n]}/24 dev eth0",
                    "ip link set eth0 up",
                    f": > {ready}",
                    f"exec perl -e {shlex.quote(_INIT)}",
                ]
            )
            argv = [
                "nsenter",
                f"--net=/run/netns/{self.netns(n)}",
                "unshare",
                "--uts",
                "--mount",
                "--pid",
                "--fork",
                "--mount-proc",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ]
            self._unshare[n] = self._spawn(argv, d / "holder.log")
        deadline = time.monotonic() + 20
        pending = list(self.nodes)
        while pending:
            pending = [n for n in pending if not (self.node_dir(n) / "ready").exists()]
            dead = [n for n in pending if not _alive(self._unshare[n])]
            if dead:
                msg = (self.node_dir(dead[0]) / "holder.log").read_text().strip()
                raise LabError(f"node {dead[0]} failed to start: {msg}")
            if pending and time.monotonic() > deadline:
                raise LabError(f"nodes not ready after 20s: {pending}")
            time.sleep(0.01)
        for n in self.nodes:
            u = self._unshare[n]
            children = Path(f"/proc/{u}/task/{u}/children").read_text().split()
            if len(children) != 1:
                raise LabError(f"node {n}: cannot find its init process")
            self.holders[n] = int(children[0])

    def _spawn_sshd(self, nodes: list[str]) -> None:
        argvs, logs, pidfiles = {}, {}, {}
        for n in nodes:
            d = self.node_dir(n)
            pidfiles[n] = d / "sshd.pid"
            pidfiles[n].unlink(missing_ok=True)
            logs[n] = d / "sshd.out"
            argvs[n] = ["/usr/sbin/sshd", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")]
        self._start_daemons(argvs, logs)
        self.sshd.update(self._daemon_pids(pidfiles))

    def _wait_ssh(self, nodes: list[str], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        pending = list(nodes)
        while pending:
            for n in list(pending):
                if not _alive(self.sshd.get(n, 0)):
                    log_text = (self.node_dir(n) / "sshd.log").read_text(errors="replace")[-2000:]
                    raise LabError(f"sshd on {n} exited: {log_text.strip()}")
                if _ssh_banner(self.addresses[n], timeout=0.2):
                    pending.remove(n)
            if pending and time.monotonic() > deadline:
                raise LabError(f"sshd not answering after {timeout}s on: {pending}")
            if pending:
                time.sleep(0.02)

    def _save_state(self) -> None:
        if not self.workdir.exists():
            return
        state = {
            "workdir": str(self.workdir),
            "nodes": self.nodes,
            "addresses": self.addresses,
            "user": self.user,
            "prefix": self.prefix,
            "subnet": self.subnet,
            "slurm": self.slurm,
            "slurmctld_port": self.slurmctld_port,
            "holders": self.holders,
            "unshare": self._unshare,
            "sshd": self.sshd,
            "slurm_pids": self.slurm_pids,
            "metadata_file": str(self.metadata_file),
            "ssh_config": str(self.ssh_config),
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    def _load_state(self, state: dict[str, Any]) -> None:
        self.holders = {k: int(v) for k, v in state.get("holders", {}).items()}
        self._unshare = {k: int(v) for k, v in state.get("unshare", {}).items()}
        self.sshd = {k: int(v) for k, v in state.get("sshd", {}).items()}
        self.slurm_pids = {k: int(v) for k, v in state.get("slurm_pids", {}).items()}
