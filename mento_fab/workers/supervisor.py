"""The worker supervisor: the process that runs, restarts and records one worker on a node.

Nothing is installed on the nodes: the client sends this file and
:mod:`mento_fab.workers.launcher` as one script to the node's own ``python3`` on
*stdin* (``--env`` values may be secrets: they never appear in any process's
argv). Standard library only and Python 3.6 compatible (the oldest ``python3``
a compute node may have), hence no type hints in these two files.

Per instance the state lives in ``<dir>/<host>/<name>/<index>/``, ``<dir>`` in the
home directory (which the nodes share; ``<host>``, the node's own name, keeps
them apart, and a record outlives a reboot, so ``ps`` can say ``lost``):

- ``state.json``: one line, replaced atomically on every change;
- ``pids``: the supervisor's and the worker's pid with their start times (clock
  ticks since boot) and the boot id, which tell a live process from a recycled pid;
- ``log``, ``log.1``: the worker's stdout and stderr, renamed to ``log.1`` at the
  size cap, with the supervisor's own events as ``[mento-fab <time>] ...`` lines.

States: ``running``; ``failed`` (ended with a non-zero status or a signal; a restart
is due, or ``--max-restarts`` is used up); ``restarting`` (ended with 0, ``--restart
always``); ``exited`` (ended, no restart due); ``stopped`` (by ``stop``). ``active`` is
true while the supervisor is in charge; ``ps`` reports an active record whose
supervisor is gone as ``lost``.
"""

import contextlib
import fcntl
import json
import os
import select
import shlex
import signal
import subprocess
import time

VERSION = 1
#: Seconds a run must last for the back-off and the restart count to start over.
STABLE_RUN = 60.0
ACTIVE = ("running", "restarting", "failed")


def host():
    return os.uname()[1]


def boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def start_ticks(pid):
    """The process's start time (clock ticks since boot); None when gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError, ValueError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def write_json(path, data):
    """Replace ``path`` atomically with one line of JSON (readers never see half a file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path):
    try:
        with open(path) as f:
            return json.loads(f.readline())
    except (OSError, ValueError):
        return None


PIDS = ("sup", "sup_start", "boot", "child", "child_start")


def read_pids(d):
    """``{"sup", "sup_start", "boot", "child", "child_start"}`` from ``d/pids`` (or {})."""
    try:
        with open(os.path.join(d, "pids")) as f:
            parts = f.read().split()
    except OSError:
        return {}
    return {key: parts[i] for i, key in enumerate(PIDS) if i < len(parts)}


def same_process(pid, ticks, boot):
    """Is ``pid`` still the process that started at ``ticks`` during boot ``boot``?"""
    if not pid or not ticks or boot != boot_id():
        return False
    return start_ticks(int(pid)) == ticks


def supervisor_alive(d):
    p = read_pids(d)
    return same_process(p.get("sup"), p.get("sup_start"), p.get("boot"))


def exit_code(status):
    """A wait status the way a shell shows it: the exit code, or 128 + the signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def killpg(pgid, sig):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def expand(path):
    """``~/x``, ``x`` (home-relative) or ``/x`` as an absolute path on this node."""
    return os.path.join(os.path.expanduser("~"), os.path.expanduser(path))


def work_dir(spec):
    """``--cwd``, else the deploy target's ``current`` (resolved at each start), else home."""
    if spec.get("cwd"):
        return expand(spec["cwd"])
    if spec.get("target"):
        return os.path.join(expand(spec["target"]), "current")
    return os.path.expanduser("~")


def env_file(spec):
    return os.path.join(expand(spec["target"]), "current", ".mento", "beamtime.env")


def parse_env_file(path):
    """``NAME=value`` lines (values in shell quoting), as ``deploy`` writes beamtime.env."""
    env = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[len("export ") :]
            for word in shlex.split(line):
                name, sep, value = word.partition("=")
                if sep and name.replace("_", "a").isalnum():
                    env[name] = value
    return env


class LogFile:
    """The worker's output file, renamed to ``log.1`` once it reaches ``cap`` bytes."""

    def __init__(self, path, cap):
        self.path, self.cap = path, max(int(cap), 1024)
        self.f = None
        self.size = 0
        self.open()

    def open(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.f = os.fdopen(fd, "ab", buffering=0)
        self.size = os.fstat(fd).st_size

    def rotate(self):
        self.f.close()
        os.replace(self.path, self.path + ".1")
        self.open()

    def write(self, data):
        while self.size + len(data) > self.cap:
            # Whole lines stay in one file; only a line longer than the cap is split.
            cut = data.rfind(b"\n", 0, self.cap - self.size) + 1
            if not cut and not self.size:
                cut = self.cap
            self.f.write(data[:cut])
            data = data[cut:]
            self.rotate()
        if data:
            self.f.write(data)
            self.size += len(data)

    def event(self, text):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.write(f"[mento-fab {stamp}] {text}\n".encode("utf-8", "replace"))


class Supervisor:
    """Starts, watches, restarts and stops one worker instance; owns its state files."""

    def __init__(self, spec, index, d):
        self.spec, self.index, self.d = spec, index, d
        self.grace = float(spec.get("grace") or 10)
        self.stopping = False
        self.state = {
            "v": VERSION,
            "name": spec["name"],
            "index": index,
            "node": host(),
            "kind": spec.get("kind", "ssh"),
            "job": spec.get("job"),
            "command": spec["command"],
            "cwd": spec.get("cwd"),
            "target": spec.get("target"),
            "restart": spec.get("restart", "no"),
            "max_restarts": spec.get("max_restarts"),
            "supervisor": os.getpid(),
            "boot": boot_id(),
            "started": time.time(),
            "since": None,
            "ended": None,
            "restarts": 0,
            "exit": None,
            "pid": None,
            "message": None,
        }
        self.log = LogFile(os.path.join(d, "log"), spec.get("log_cap") or 10 * 1024 * 1024)
        self.wake_r, wake_w = os.pipe()
        for fd in (self.wake_r, wake_w):
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        signal.set_wakeup_fd(wake_w)  # every signal wakes select(): no polling for them
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def _on_term(self, *_):
        self.stopping = True

    def record(self, state, **changes):
        self.state.update(changes)
        self.state["state"] = state
        self.state["active"] = state in ACTIVE
        self.state["updated"] = time.time()
        write_json(os.path.join(self.d, "state.json"), self.state)

    def finish(self, state, message):
        """A final state: ``active`` false, so ``ps`` never calls it lost."""
        self.record(state, message=message)
        self.state["active"] = False
        write_json(os.path.join(self.d, "state.json"), self.state)

    def wait(self, fds, timeout):
        """select() that also wakes on any signal; returns the readable fds of ``fds``."""
        try:
            ready = select.select([self.wake_r, *fds], [], [], max(timeout, 0))[0]
        except InterruptedError:
            return []
        if self.wake_r in ready:
            with contextlib.suppress(OSError):
                while os.read(self.wake_r, 512):
                    pass
        return [fd for fd in ready if fd != self.wake_r]

    def stop_grace(self):
        """The grace period ``stop`` asked for (written next to the state before SIGTERM)."""
        try:
            with open(os.path.join(self.d, "stop")) as f:
                return float(f.read().strip() or self.grace)
        except (OSError, ValueError):
            return self.grace

    def environment(self):
        env = dict(os.environ)
        env.pop("MENTO_WORKER_PAYLOAD", None)
        if self.spec.get("target"):
            env.update(parse_env_file(env_file(self.spec)))
        env.update(self.spec.get("env") or {})
        env["MENTO_WORKER_NAME"] = self.spec["name"]
        env["MENTO_WORKER_INDEX"] = str(self.index)
        env["MENTO_WORKER_NODE"] = host()
        env["MENTO_WORKER_RESTARTS"] = str(self.state["restarts"])
        return env

    def spawn(self):
        """Start the command in a new session (its own process group).

        Returns ``((proc, read end of its output pipe), None)`` or ``(None, why not)``.
        """
        r, w = os.pipe()
        shell = os.environ.get("SHELL") or "/bin/sh"
        try:
            proc = subprocess.Popen(
                [shell, "-c", self.spec["command"]],
                cwd=work_dir(self.spec),
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=w,
                stderr=w,
                start_new_session=True,
                close_fds=True,
            )
        except (OSError, ValueError) as exc:
            os.close(r)
            os.close(w)
            reason = getattr(exc, "strerror", None) or str(exc)
            where = getattr(exc, "filename", None)
            return None, "cannot start: " + reason + (f": {where}" if where else "")
        os.close(w)
        fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_NONBLOCK)
        pids = [self.state["supervisor"], start_ticks(os.getpid()), self.state["boot"],
                proc.pid, start_ticks(proc.pid) or 0]  # fmt: skip
        tmp = os.path.join(self.d, "pids.tmp")
        with open(tmp, "w") as f:
            f.write(" ".join(str(p) for p in pids) + "\n")
        os.replace(tmp, os.path.join(self.d, "pids"))
        return (proc, r), None

    def pump(self, proc, r):
        """Copy output to the log until the worker and its process group are gone.

        Returns the worker's exit code. On stop: SIGTERM to the group, SIGKILL after
        the grace period. When the worker ends by itself, what is left of its group
        is ended the same way (as systemd does), so nothing of an old run lingers.
        """
        status = term_at = None
        grace = self.grace
        killed = eof = False
        while True:
            now = time.monotonic()
            if term_at is None and (self.stopping or status is not None):
                if self.stopping:
                    grace = self.stop_grace()
                    self.log.event("stopping: SIGTERM to the process group")
                killpg(proc.pid, signal.SIGTERM)
                term_at = now
            if term_at is not None and not killed and now - term_at >= grace:
                if group_alive(proc.pid):
                    self.log.event(f"still running after {grace:g}s: SIGKILL")
                killpg(proc.pid, signal.SIGKILL)
                killed = True
            if status is None:
                try:
                    pid, st = os.waitpid(proc.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, st = proc.pid, 0
                if pid:
                    status = proc.returncode = exit_code(st)
                    continue  # deal with the rest of its group at once
            if status is not None and (eof or not group_alive(proc.pid)):
                self.drain(r)
                break
            timeout = 1.0 if term_at is None else max(0.05, min(1.0, term_at + grace - now))
            for fd in self.wait([] if eof else [r], timeout):
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if data:
                    self.log.write(data)
                else:
                    eof = True
        os.close(r)
        return status

    def drain(self, r):
        with contextlib.suppress(OSError):
            data = os.read(r, 65536)
            while data:
                self.log.write(data)
                data = os.read(r, 65536)

    def backoff(self, streak):
        first = float(self.spec.get("delay") or 1.0)
        cap = float(self.spec.get("delay_max") or 60.0)
        return min(cap, first * (2 ** max(streak - 1, 0)))

    def run(self, on_start=None):
        """The supervision loop: returns when the worker ends for good or is stopped.

        ``on_start(pid, problem)`` is called once, after the first start attempt.
        """
        policy = self.spec.get("restart", "no")
        limit = self.spec.get("max_restarts")
        streak = 0
        while True:
            started, problem = self.spawn()
            if on_start is not None:
                on_start(started[0].pid if started else None, problem)
                on_start = None
            if started is None:
                self.log.event(problem)
                status, ran = 127, 0.0
                self.state.update(exit=status, ended=time.time(), pid=None)
            else:
                proc, r = started
                since = time.time()
                again = self.state["restarts"]
                self.record("running", pid=proc.pid, since=since, message=None)
                self.log.event(f"started pid {proc.pid}" + (f" (restart {again})" if again else ""))
                status = self.pump(proc, r)
                ran = time.time() - since
                self.state.update(exit=status, ended=time.time())
                self.log.event(f"exited with status {status} after {ran:.1f}s")
            if self.stopping:
                return self.stopped()
            if ran >= STABLE_RUN:
                streak = 0
            wanted = policy == "always" or (policy == "on-failure" and status != 0)
            if not wanted:
                return self.finish("exited", problem)
            if limit is not None and streak >= int(limit):
                why = f"gave up after {streak} restarts in a row"
                self.log.event(why)
                return self.finish("failed" if status else "exited", why)
            streak += 1
            delay = self.backoff(streak)
            self.record("failed" if status else "restarting", message=f"restarting in {delay:g}s")
            self.log.event(f"restarting in {delay:g}s")
            deadline = time.monotonic() + delay
            while not self.stopping and time.monotonic() < deadline:
                self.wait([], deadline - time.monotonic())
            if self.stopping:
                return self.stopped()
            self.state["restarts"] += 1

    def stopped(self):
        self.log.event("stopped")
        self.finish("stopped", "stopped")
