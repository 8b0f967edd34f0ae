"""The node side of ``start``, ``stop`` and a ``--via slurm`` task (see :mod:`.supervisor`).

Shipped after :mod:`.supervisor`'s source as one script (the import line below is
dropped from the payload), ending in ``sys.exit(main(<spec JSON>))``. Each
operation prints one line of JSON for the client and exits 0, or 3 (``start``:
the worker already runs here; ``stop``: no such worker here), or 4 (an error,
in ``"error"``).

``start`` detaches each supervisor with a double fork and ``setsid``: no terminal,
no inherited fd (the SSH channel's pipes are closed, so the session ends at once),
``/`` as cwd and re-parented to init, so it survives the client's exit, a lost
connection and an sshd restart.
"""

import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import sys
import time

from mento_fab.workers.supervisor import (  # payload: drop
    Supervisor,
    boot_id,
    env_file,
    expand,
    group_alive,
    host,
    killpg,
    read_json,
    read_pids,
    start_ticks,
    supervisor_alive,
    work_dir,
    write_json,
)

#: Seconds the launcher waits for a new supervisor to report its first start.
LAUNCH_TIMEOUT = 15.0
#: Extra seconds ``stop`` waits for a supervisor beyond the grace period.
STOP_SLACK = 5.0


def base_dir(spec):
    return os.path.join(expand(spec.get("dir") or ".mento_fab/workers"), host())


def instance_dirs(spec, name=None):
    """``[(name, index, dir)]`` of the recorded instances of ``name`` (or of every worker)."""
    base = base_dir(spec)
    names = [name] if name else (sorted(os.listdir(base)) if os.path.isdir(base) else [])
    found = []
    for n in names:
        nd = os.path.join(base, n)
        if not os.path.isdir(nd):
            continue
        for entry in os.listdir(nd):
            if entry.isdigit() and os.path.exists(os.path.join(nd, entry, "state.json")):
                found.append((n, int(entry), os.path.join(nd, entry)))
    return sorted(found)


def lock(path):
    """An exclusive lock on ``path`` among this node's launchers (best effort on NFS)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno == errno.ENOLCK:
                return fd
            if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def close_fds(keep):
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def set_name():
    """``mento-worker`` in ``ps``/``top`` (the argv is only ``python3 -c <bootstrap>``)."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as f:
        f.write("mento-worker")


def daemon(spec, index, d, report):
    """The launcher's grandchild: detach fully, then supervise; the first start's pid
    (or why it failed) goes back through the ``report`` pipe."""
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    close_fds({report})
    set_name()
    reported = []

    def on_start(pid, problem):
        message = {"index": index, "supervisor": os.getpid()}
        message.update({"pid": pid} if pid else {"error": problem})
        os.write(report, (json.dumps(message) + "\n").encode())
        os.close(report)
        reported.append(True)

    try:
        Supervisor(spec, index, d).run(on_start)
    except Exception as exc:
        if not reported:
            on_start(None, f"supervisor failed: {exc}")


def fresh_dir(d):
    """An instance directory for a new start: the old state goes, the old log stays."""
    if not os.path.isdir(d):
        os.makedirs(d, mode=0o700)
    for old in ("state.json", "pids", "stop"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(d, old))


def remove_dir(d):
    for entry in os.listdir(d):
        os.unlink(os.path.join(d, entry))
    os.rmdir(d)


def read_report(r, index):
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    data = b""
    while b"\n" not in data and time.monotonic() < deadline:
        if select.select([r], [], [], max(deadline - time.monotonic(), 0))[0]:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
    try:
        return json.loads(data.decode().splitlines()[0])
    except (ValueError, IndexError):
        return {"index": index, "error": "the supervisor did not report its start"}


def spawn_daemon(spec, index, d):
    """Double fork: the supervisor's parent exits at once, so init adopts it."""
    r, w = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                daemon(spec, index, d, w)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    try:
        return read_report(r, index)
    finally:
        os.close(r)


def launch(spec):
    """``start``: ``per_node`` detached supervisors of ``name`` on this node."""
    name = spec["name"]
    count = int(spec.get("per_node") or 1)
    out = {"host": host(), "boot": boot_id()}
    if not os.path.isdir(work_dir(spec)):
        out["error"] = f"working directory {work_dir(spec)} does not exist"
    elif spec.get("target") and not os.path.isfile(env_file(spec)):
        out["error"] = f"{env_file(spec)} not found (deploy to the target first)"
    if "error" in out:
        print(json.dumps(out))
        return 4
    nd = os.path.join(base_dir(spec), name)
    if not os.path.isdir(nd):
        os.makedirs(nd, mode=0o700)
    held = lock(os.path.join(nd, ".lock"))
    try:
        existing = instance_dirs(spec, name)
        running = [(n, i, d) for n, i, d in existing if supervisor_alive(d)]
        if running and not spec.get("replace"):
            out["running"] = [i for _, i, _ in running]
            print(json.dumps(out))
            return 3
        grace = float(spec.get("grace") or 10)
        out["replaced"] = [row["index"] for row in stop_instances(running, grace)]
        for _, i, d in existing:
            if i >= count:
                remove_dir(d)
        started = []
        for index in range(count):
            d = os.path.join(nd, str(index))
            fresh_dir(d)
            started.append(spawn_daemon(spec, index, d))
    finally:
        os.close(held)
    out["started"] = started
    print(json.dumps(out))
    return 0 if all("pid" in s for s in started) else 4


def ours(pids):
    """May the recorded worker's process group be signalled? (same boot, no recycled pid)"""
    child, ticks = pids.get("child"), pids.get("child_start")
    if not child or pids.get("boot") != boot_id():
        return False
    now = start_ticks(int(child))
    if now is not None:
        return now == ticks
    # The leader is gone; a group still using its id can only be what it left behind.
    return group_alive(int(child))


def mark_stopped(d, message):
    path = os.path.join(d, "state.json")
    state = read_json(path) or {}
    state.update(state="stopped", active=False, message=message, updated=time.time())
    write_json(path, state)


def stop_instances(instances, grace):
    """Stop the instances together: SIGTERM, SIGKILL after ``grace``. Returns final rows."""
    rows, waiting = [], []
    for name, index, d in instances:
        state = read_json(os.path.join(d, "state.json")) or {}
        pids = read_pids(d)
        row = {"name": name, "index": index, "was": state.get("state")}
        rows.append((row, d))
        if supervisor_alive(d):
            with open(os.path.join(d, "stop"), "w") as f:
                f.write(f"{grace:g}\n")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pids["sup"]), signal.SIGTERM)
            waiting.append((d, pids, True))
        elif state.get("state") == "pending":  # the client cancels the Slurm job
            mark_stopped(d, "stopped before its Slurm job started")
        elif state.get("active"):  # lost: no supervisor, but its worker may still run
            row["was"] = "lost"
            if ours(pids):
                killpg(int(pids["child"]), signal.SIGTERM)
            waiting.append((d, pids, False))
    deadline = time.monotonic() + grace
    while waiting and time.monotonic() < deadline + STOP_SLACK:
        still = []
        for d, pids, supervised in waiting:
            if supervised and supervisor_alive(d):
                still.append((d, pids, supervised))
            elif not supervised and ours(pids):
                if time.monotonic() >= deadline:
                    killpg(int(pids["child"]), signal.SIGKILL)
                still.append((d, pids, supervised))
            elif not supervised:
                mark_stopped(d, "stopped (was lost)")
        waiting = still
        if waiting:
            time.sleep(0.05)
    for d, pids, _ in waiting:  # would not stop: end the supervisor and the group here
        if ours(pids):
            killpg(int(pids["child"]), signal.SIGKILL)
        if supervisor_alive(d):
            os.kill(int(pids["sup"]), signal.SIGKILL)
        mark_stopped(d, f"killed: did not stop within {grace + STOP_SLACK:g}s")
    out = []
    for row, d in rows:
        state = read_json(os.path.join(d, "state.json")) or {}
        for key in ("state", "exit", "job", "kind", "message"):
            row[key] = state.get(key)
        out.append(row)
    return out


def stop(spec):
    """``stop``: every instance of ``name`` (or of every worker) on this node."""
    name = spec.get("name")
    instances = instance_dirs(spec, name)
    out = {"host": host()}
    if name and not instances:
        out["unknown"] = name
        print(json.dumps(out))
        return 3
    out["stopped"] = stop_instances(instances, float(spec.get("grace") or 10))
    print(json.dumps(out))
    return 0


def record(d, spec, index, state, **fields):
    """A record written by the launcher (before a supervisor takes the instance over)."""
    data = {"v": 1, "name": spec["name"], "index": index, "node": host(), "kind": "slurm",
            "job": spec.get("job"), "command": spec["command"], "cwd": spec.get("cwd"),
            "target": spec.get("target"), "restart": spec.get("restart"), "state": state,
            "boot": boot_id(), "started": None, "since": None, "restarts": 0, "exit": None,
            "pid": None, "updated": time.time()}  # fmt: skip
    data.update(fields)
    write_json(os.path.join(d, "state.json"), data)


def pending(spec):
    """``start --via slurm``, right after sbatch: a ``pending`` record per instance, so
    ``ps`` and ``stop`` know the worker before Slurm starts its tasks."""
    name, count = spec["name"], int(spec.get("per_node") or 1)
    nd = os.path.join(base_dir(spec), name)
    if not os.path.isdir(nd):
        os.makedirs(nd, mode=0o700)
    held = lock(os.path.join(nd, ".lock"))
    try:
        for _, i, d in instance_dirs(spec, name):
            if i >= count and not supervisor_alive(d):
                remove_dir(d)
        for index in range(count):
            d = os.path.join(nd, str(index))
            if (read_json(os.path.join(d, "state.json")) or {}).get("job") == spec["job"]:
                continue  # the task was quicker
            fresh_dir(d)
            open(os.path.join(d, "log"), "ab").close()
            record(d, spec, index, "pending", active=False, message=f"slurm job {spec['job']}")
    finally:
        os.close(held)
    print(json.dumps({"host": host()}))
    return 0


def slurm_task(spec):
    """One task of a ``--via slurm`` worker: supervise in the foreground (Slurm is the parent)."""
    index = int(os.environ.get("SLURM_LOCALID", "0"))
    spec = dict(spec, job=os.environ.get("SLURM_JOB_ID"), kind="slurm")
    nd = os.path.join(base_dir(spec), spec["name"])
    d = os.path.join(nd, str(index))
    if not os.path.isdir(d):
        os.makedirs(d, mode=0o700)
    held = lock(os.path.join(nd, ".lock"))
    try:  # the pending record becomes this supervisor's, under the launchers' lock
        fresh_dir(d)
        with open(os.path.join(d, "pids"), "w") as f:
            f.write(f"{os.getpid()} {start_ticks(os.getpid())} {boot_id()}\n")
        record(d, spec, index, "running", active=True, supervisor=os.getpid(),
               started=time.time(), message="starting")  # fmt: skip
    finally:
        os.close(held)
    set_name()
    Supervisor(spec, index, d).run()
    return 0


def main(text):
    spec = json.loads(text)
    ops = {"start": launch, "stop": stop, "slurm": slurm_task, "pending": pending}
    try:
        return ops[spec["op"]](spec)
    except Exception as exc:  # one line for the client, never a traceback
        print(json.dumps({"host": host(), "error": f"{type(exc).__name__}: {exc}"}))
        return 4
