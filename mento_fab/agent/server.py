"""The agent process: serves this user's ``mento-fab`` calls with connections kept open.

Started by the first call (``python -m mento_fab.agent.server``, detached, its own
session, output to a private log). It listens on a UNIX socket in the user's
private directory, accepts only the same uid (``SO_PEERCRED``) and runs each call
in a thread: the same invoke Program as the direct path, with the call's argv and
the client's stdin/stdout/stderr (:mod:`.context`), the call's environment,
working directory and umask, and kept connections (:mod:`.pool`).

The environment, working directory and umask belong to the whole process, so
calls run side by side only when theirs are the same; any other call is told
``busy`` and runs in its own process (the client does that by itself). A call
whose code differs from the agent's (an upgrade, an edited checkout) is told
``stale``: the agent stops listening, finishes its calls and exits, and the client
starts a new one. After ``MENTO_AGENT_IDLE`` seconds without a call (default
600) the agent closes its connections and exits; ``mento-fab agent --stop`` and
SIGTERM end it at once (running calls are interrupted as by Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mento_fab import defaults
from mento_fab.agent import context, wire
from mento_fab.errors import AgentError

__all__ = ["Agent", "main"]

log = logging.getLogger("mento_fab.agent")

#: Variables a shell changes on its own: calls that differ only in them still share the agent.
#: (Not COLUMNS/LINES: rich and shutil read them from the process environment for the width.)
SHELL_NOISE = frozenset({"_", "OLDPWD", "SHLVL"})
#: Calls served at once.
MAX_CALLS = 16
#: Seconds the agent waits for a client's "go" after saying "ready".
GO_TIMEOUT = 30.0
#: Seconds a stopping agent gives interrupted calls to end (a retiring one waits for its calls).
STOP_GRACE = 10.0


class _Setting:
    """The process-wide part of a call: cwd, environment, umask (one set at a time).

    Between calls the agent's own environment and umask are back in place: a call's
    environment (tokens a user exported, say) stays no longer than the call.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: Any = None
        self._users = 0
        self._environ = dict(os.environ)
        self._umask = os.umask(0o077)
        os.umask(self._umask)

    def enter(self, cwd: str, env: Mapping[str, str], umask: int) -> str | None:
        """Apply the call's setting, or say why another one is in place."""
        key = (cwd, umask, frozenset((k, v) for k, v in env.items() if k not in SHELL_NOISE))
        with self._lock:
            if self._users and key != self._key:
                return "another call with another working directory or environment is running"
            if not self._users:
                try:
                    os.chdir(cwd)
                except OSError as exc:
                    return f"cannot enter {cwd}: {exc.strerror}"
                os.environ.clear()
                os.environ.update(env)
                os.umask(umask)
                self._key = key
            self._users += 1
        return None

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            if not self._users:
                os.chdir("/")
                os.environ.clear()
                os.environ.update(self._environ)
                os.umask(self._umask)


class Agent:
    """One user's agent for one installation of mento_fab (see the module docstring)."""

    def __init__(self, names: wire.Names, idle_limit: float) -> None:
        from mento_fab.agent.pool import Pool

        self.names = names
        self.idle_limit = idle_limit
        self.pid = os.getpid()
        self.started = time.time()
        self.fingerprint = wire.fingerprint()
        self.pool = Pool()
        self.served = 0
        self.calls: dict[int, context.Request] = {}
        self.last_active = time.monotonic()
        self._setting = _Setting()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._interrupt_calls = False
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._warmed = False

    # ------------------------------------------------------------------ life
    def listen(self) -> None:
        """Bind under a temporary name, then rename: clients never see a half-made socket."""
        temporary = self.names.dir / f".agent-{self.names.ident}.{self.pid}.sock"
        temporary.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(str(temporary))
        os.chmod(temporary, 0o600)
        listener.listen(64)
        os.rename(temporary, self.names.socket)
        self._inode = os.stat(self.names.socket).st_ino
        self._listener = listener
        self.names.pid.write_text(f"{self.pid}\n")

    def serve_forever(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                ready, _, _ = select.select([listener], [], [], 1.0)
            except (OSError, ValueError):
                break  # the listener was closed by stop()
            if ready:
                try:
                    sock, _ = listener.accept()
                except OSError:
                    continue
                threading.Thread(target=self._serve, args=(sock,), daemon=True).start()
            self._housekeeping()
        self._shutdown()

    def _housekeeping(self) -> None:
        self.pool.expire(self.idle_limit)
        with self._lock:
            idle = not self.calls and time.monotonic() - self.last_active > self.idle_limit
            warm_up = not self._warmed and self.served and not self.calls
        if warm_up:  # after the first call: it should not wait for imports it does not need
            self._warmed = True
            threading.Thread(target=_warm_up, daemon=True, name="agent-warm-up").start()
        if idle:
            log.info("idle for %g s: exiting", self.idle_limit)
            self.stop(interrupt=False)

    def stop(self, *, interrupt: bool = True) -> None:
        """Stop listening now; end running calls (interrupting them if asked), then exit."""
        self._interrupt_calls = self._interrupt_calls or interrupt
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._unlink()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()

    def _unlink(self) -> None:
        """Remove our socket and pid file (not those of an agent that replaced us).

        The socket only while our listener is open: it holds the inode, so an equal
        inode number is ours. Once closed, a new agent's socket may get that number.
        """
        inode, self._inode = self._inode, None
        with contextlib.suppress(OSError):
            if inode is not None and os.stat(self.names.socket).st_ino == inode:
                self.names.socket.unlink()
        with contextlib.suppress(OSError, ValueError):
            if int(self.names.pid.read_text()) == self.pid:
                self.names.pid.unlink()

    def _shutdown(self) -> None:
        """Wait for the running calls: retiring, as long as they run; when asked to
        interrupt them (``--stop``, SIGTERM, also later), STOP_GRACE after that."""
        deadline = None
        while True:
            with self._lock:
                calls = list(self.calls.values())
            if not calls:
                break
            if self._interrupt_calls:
                deadline = deadline or time.monotonic() + STOP_GRACE
                if time.monotonic() >= deadline:
                    break
                for call in calls:
                    if not call.interrupts:
                        call.interrupt()
            time.sleep(0.05)
        self.pool.close()
        log.info("agent %d stopped after %d calls", self.pid, self.served)

    # ----------------------------------------------------------------- calls
    def _serve(self, sock: socket.socket) -> None:
        fds: list[int] = []
        try:
            uid = wire.peer_uid(sock)
            if uid != os.getuid():
                log.warning("refused a connection from uid %d", uid)
                return
            message, fds = wire.recv(sock, max_fds=3)
            op = message["op"]
            if op == "status":
                wire.send(sock, self.status())
            elif op == "stop":
                wire.send(sock, {"op": "stopping", "pid": self.pid})
                self.stop()
            elif op == "run":
                taken, fds = fds, []
                self._call(sock, message, taken)
            else:
                wire.send(sock, {"op": "error", "reason": f"unknown operation {op!r}"})
        except (OSError, EOFError, AgentError) as exc:
            log.info("a client went away: %s", exc)
        except Exception:  # keep serving others; say what broke
            log.exception("serving a client failed")
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            # shutdown() first: the watcher thread blocked in recv() holds the socket,
            # and close() alone would neither wake it nor tell the client.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _refuse(self, sock: socket.socket, fds: list[int], op: str, reason: str) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        wire.send(sock, {"op": op, "reason": reason, "pid": self.pid})

    def _call(self, sock: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
        if message.get("protocol") != wire.PROTOCOL or message.get("fingerprint") != (
            self.fingerprint
        ):
            log.info("a call from other code: retiring")
            self._refuse(sock, fds, "stale", "the agent runs other code; it retires")
            self.stop(interrupt=False)
            return
        if len(fds) != 3:
            return self._refuse(sock, fds, "busy", "stdin, stdout and stderr did not arrive")
        with self._lock:
            full = len(self.calls) >= MAX_CALLS
        if self._stopping.is_set() or full:
            return self._refuse(sock, fds, "busy", "stopping" if not full else "too many calls")
        problem = self._setting.enter(message["cwd"], message["env"], int(message["umask"]))
        if problem:
            return self._refuse(sock, fds, "busy", problem)
        request = None
        try:
            request = context.Request(
                fds, message.get("streams", {}), argv=message["argv"], task=message.get("task")
            )
            with self._lock:
                self.calls[id(request)] = request
            if not self._go(sock):
                return  # the client gave up waiting and runs the call itself
            with self._lock:
                self.served += 1
            watcher = threading.Thread(
                target=self._watch, args=(sock, request), daemon=True, name="agent-watch"
            )
            status = self._run(request, message["argv"], watcher)
            flushed = request.close()  # 120 when stdout could not be flushed, as Python
            with contextlib.suppress(OSError):
                wire.send(sock, {"op": "exit", "status": status or flushed or 0})
        finally:
            if request is not None:
                request.finish()
                if not request.closed:
                    request.close()
            else:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            with self._lock:
                if request is not None:
                    self.calls.pop(id(request), None)
                self.last_active = time.monotonic()
            self._setting.leave()

    def _go(self, sock: socket.socket) -> bool:
        """Say "ready" and wait for the client's "go": only then does the call run.

        A client that stopped waiting (its answer timeout) closes the socket instead,
        and runs the call itself: the call must then never run here as well.
        """
        wire.send(sock, {"op": "ready", "pid": self.pid})
        sock.settimeout(GO_TIMEOUT)
        try:
            message, _ = wire.recv(sock)
        except (OSError, EOFError, AgentError) as exc:
            log.info("a client left before its call started: %s", exc)
            return False
        finally:
            sock.settimeout(None)
        return message.get("op") == "go"

    def _watch(self, sock: socket.socket, request: context.Request) -> None:
        """Ctrl-C from the client, or the client gone: interrupt the call."""
        while not request.closed:
            try:
                message, _ = wire.recv(sock)
            except (OSError, EOFError, AgentError):
                request.detach()
                request.interrupt()
                return
            if message.get("op") == "interrupt":
                request.interrupt()

    def _run(self, request: context.Request, argv: list[str], watcher: threading.Thread) -> int:
        """Run the Program for one call in this thread; its exit status.

        Ctrl-C arrives as an asynchronous KeyboardInterrupt anywhere in here, also in
        our own handlers: every step is retried until :meth:`Request.finish` has
        closed the door on further ones.
        """
        status: int | None = None
        with context.bind(request), context.interruptible(request):
            while True:
                try:
                    if status is None:
                        status = 130  # unless the Program comes back
                        watcher.start()
                        status = self._program(argv)
                    request.finish()
                    break
                except KeyboardInterrupt:
                    continue
        return status

    @staticmethod
    def _program(argv: list[str]) -> int:
        try:
            from mento_fab.cli.app import run_for_status
        except Exception:  # a broken installation: say so on the caller's stderr
            traceback.print_exc()
            return 1
        return run_for_status(argv)

    def status(self) -> dict[str, Any]:
        with self._lock:
            calls = [
                {"task": r.task, "seconds": round(time.time() - r.started, 1)}
                for r in self.calls.values()
            ]
            idle = 0.0 if calls else time.monotonic() - self.last_active
        return {
            "op": "status",
            "pid": self.pid,
            "socket": str(self.names.socket),
            "log": str(self.names.log),
            "started": self.started,
            "uptime": round(time.time() - self.started, 1),
            "idle_seconds": round(idle, 1),
            "idle_limit": self.idle_limit,
            "served": self.served,
            "calls": calls,
            "pool": self.pool.snapshot(),
        }


def _idle_limit() -> float:
    text = os.environ.get("MENTO_AGENT_IDLE", "")
    try:
        value = float(text) if text else defaults.AGENT_IDLE
    except ValueError:
        value = defaults.AGENT_IDLE
    return value if value > 0 else defaults.AGENT_IDLE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mento_fab.agent.server")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--ident", required=True)
    parser.add_argument("--ready-fd", type=int, default=None)
    args = parser.parse_args(argv)

    handler = logging.StreamHandler(sys.__stderr__)
    handler.setFormatter(logging.Formatter("%(asctime)s agent[%(process)d]: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)  # stacks to log

    context.install()
    from mento_fab.cli.startup import import_invoke

    import_invoke()
    from mento_fab.cli import options
    from mento_fab.cli.options import configure_logging

    configure_logging()  # its handler writes to sys.stderr: the current call's
    names = wire.Names(Path(args.dir), args.ident)
    problem = wire.private_dir_problem(names.dir)
    if problem:
        log.error("not starting: %s", problem)
        sys.exit(1)
    agent = Agent(names, _idle_limit())
    options.group_provider = agent.pool.group
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    agent.listen()
    log.info("agent %d on %s (idle limit %g s)", agent.pid, names.socket, agent.idle_limit)
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"1")
        os.close(args.ready_fd)
    try:
        agent.serve_forever()
    finally:
        agent._unlink()
        logging.shutdown()
    os._exit(0)  # worker threads of interrupted calls must not hold the exit


def _warm_up() -> None:
    """Import what later calls need while the first one runs (imports are per process)."""
    for module in ("mento_fab.runner", "mento_fab.check", "mento_fab.slurm", "mento_fab.deployment",
                   "rich.console", "rich.progress", "rich.table"):  # fmt: skip
        with contextlib.suppress(Exception):
            __import__(module)


if __name__ == "__main__":
    main()
