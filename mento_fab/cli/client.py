"""The thin client: every ``mento-fab`` call starts here, with the standard library only.

It decides whether the connection agent applies (:func:`route`), hands the call
to this user's agent (starting one on the first call), forwards Ctrl-C, and exits
with the agent's exit status. Whenever the agent cannot take the call (none can
be started, a stale or foreign socket, a busy or outdated agent) the command
runs in this process instead; ``MENTO_LOG_LEVEL=debug`` says why. Only an agent
lost in the middle of a command is an error: one line, exit status 255.

The first call starts the agent and runs through it, so that the connections it
opens are kept for the next call::

    $ mento-fab run-on-nodes true      # starts the agent, runs through it
    $ mento-fab run-on-nodes hostname  # warm: no imports, no logins
    $ MENTO_AGENT=0 mento-fab run-on-nodes hostname   # in this process
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from mento_fab import defaults
from mento_fab.agent import wire
from mento_fab.agent.client import (
    connect,
    disabled,
    interrupt,
    run_request,
    stream_facts,
    submit,
    wait_exit,
)
from mento_fab.errors import AgentError, AgentLost

__all__ = [
    "AGENT_TASKS", "DIRECT_TASKS", "FLAGS", "alive", "connect", "main", "query", "route", "stop"
]  # fmt: skip

#: Tasks that run through the agent: they only talk to nodes and print.
#: ``deploy`` and ``rollback`` are not among them: they hold back Ctrl-C while nodes switch
#: (``deployment.signals``), which needs the process's own main thread.
AGENT_TASKS = frozenset(
    {"info", "check", "run-on-nodes", "releases", "submit", "jobs", "cancel", "reservation"}
)  # fmt: skip
#: Options of AGENT_TASKS that take no value (a test checks this against the tasks): the
#: word after any other option is its value, so ``--via ssh`` does not name the task ``ssh``.
FLAGS = frozenset({"--all", "--json", "--stream", "--wait"})
#: Tasks that always run in their own process (interactive, or about the agent).
DIRECT_TASKS = frozenset({"agent", "ssh", "tunnel", "top"})
#: invoke core options that may come before a task on the agent path ("--config FILE").
_CORE_WITH_VALUE = ("-f", "--config")
#: Seconds to wait for another client's agent start, or for our own.
START_TIMEOUT = 20.0
#: Ctrl-C presses after which the client stops waiting for the agent.
GIVE_UP_PRESSES = 3
#: The environment the agent is started with (also LC_* and PYTHON*); calls bring theirs.
AGENT_ENVIRONMENT = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH",
     "VIRTUAL_ENV", "XDG_RUNTIME_DIR", "MENTO_AGENT_DIR", "MENTO_AGENT_IDLE", "MENTO_LOG_LEVEL"}
)  # fmt: skip


def _debug(message: str) -> None:
    if os.environ.get("MENTO_LOG_LEVEL", "").upper() == "DEBUG":
        print(f"mento-fab: agent: {message}", file=sys.stderr, flush=True)


def route(args: Sequence[str], environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``(reason, task)``: why the call runs in this process (None: through the agent)."""
    if disabled(environ):
        return "MENTO_AGENT=0", None
    if environ.get("INVOKE_DEBUG"):
        return "INVOKE_DEBUG is set", None
    i = 0
    while i < len(args) and args[i].startswith("-"):
        token = args[i]
        if token == "--no-agent":
            return "--no-agent", None
        if token in _CORE_WITH_VALUE:
            i += 2
            continue
        if not token.startswith("--config="):
            return f"option {token.split('=')[0]} runs in this process", None
        i += 1
    if i >= len(args):
        return "no task", None
    task = args[i]
    if task not in AGENT_TASKS:
        return f"task {task!r} runs in this process", task
    rest = iter(args[i + 1 :])
    for token in rest:
        if token == "--":  # the rest belongs to the task
            break
        if token in ("-h", "--help") or token.startswith("--help="):
            return "help runs in this process", task
        if token == "--no-agent":
            return "--no-agent", task
        if token.startswith("--") and "=" not in token and token not in FLAGS:
            next(rest, None)  # the option's value ("--via ssh"), never a task name
        elif token in DIRECT_TASKS:
            return f"task {token!r} runs in this process", task
    return None, task


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``mento-fab`` (``argv`` defaults to ``sys.argv``) and exit."""
    argv = list(sys.argv if argv is None else argv)
    if argv[1:] in (["--version"], ["-V"]):
        from mento_fab import __version__

        print(f"mento-fab {__version__}")
        sys.exit(0)
    reason, task = route(argv[1:], os.environ)
    if reason is None:
        status = _through_agent(argv, task)
        if status is not None:
            sys.exit(status)
    else:
        _debug(f"not used: {reason}")
    from mento_fab.cli.startup import import_invoke

    import_invoke()
    from mento_fab.cli.app import run_direct

    run_direct(argv)
    sys.exit(0)  # pragma: no cover - invoke exits itself


# ------------------------------------------------------------------ connecting
def _connect_or_start(names: wire.Names) -> socket.socket | None:
    try:
        return connect(names)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        _debug(f"no agent at {names.socket} ({exc.strerror}): starting one")
    except (AgentError, OSError) as exc:
        _debug(f"not used: {exc}")
        return None
    return _start(names)


def _start(names: wire.Names) -> socket.socket | None:
    """Start this user's agent (once, under a lock) and connect to it."""
    lock = os.open(names.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    _debug("not used: another call is still starting the agent")
                    return None
                time.sleep(0.01)
        try:  # another call may have started it while we waited
            return connect(names)
        except ConnectionRefusedError:
            _debug(f"stale socket {names.socket} (nobody listens): replacing it")
            with contextlib.suppress(OSError):
                names.socket.unlink()
        except FileNotFoundError:
            pass
        except (AgentError, OSError) as exc:
            _debug(f"not used: {exc}")
            return None
        if not _spawn(names):
            return None
        try:
            return connect(names)
        except (AgentError, OSError) as exc:
            _debug(f"not used: the new agent does not answer ({exc})")
            return None
    finally:
        os.close(lock)


def _agent_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What the agent starts with: the interpreter's and its own settings only.

    Every call brings its whole environment; the process lives for many calls and
    should not carry the first caller's (tokens a user exported, say) in its own.
    """
    return {
        name: value
        for name, value in environ.items()
        if name in AGENT_ENVIRONMENT or name.startswith(("LC_", "PYTHON"))
    }


def _spawn(names: wire.Names) -> bool:
    """Start the agent detached (own session, no terminal) and wait until it listens."""
    import subprocess

    env = _agent_environment(os.environ)
    # The agent runs from "/": it must find this very package without our cwd.
    root = str(Path(wire.__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    log = os.open(names.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    with contextlib.suppress(OSError):
        if os.fstat(log).st_size > 1024 * 1024:
            os.ftruncate(log, 0)
    ready_r, ready_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mento_fab.agent.server", "--dir", str(names.dir),
             "--ident", names.ident, "--ready-fd", str(ready_w)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=[ready_w],
            cwd="/", env=env, start_new_session=True,
        )  # fmt: skip
    except OSError as exc:
        _debug(f"not used: cannot start the agent: {exc}")
        os.close(ready_r)
        return False
    finally:
        os.close(ready_w)
        os.close(log)
    try:
        ready, _, _ = select.select([ready_r], [], [], START_TIMEOUT)
        answer = os.read(ready_r, 1) if ready else b""
    finally:
        os.close(ready_r)
    if answer != b"1":
        _debug(f"not used: the agent did not start (see {names.log})")
        if proc.poll() is None and not ready:
            proc.terminate()
        return False
    _debug(f"started agent pid {proc.pid} at {names.socket}")
    return True


# ------------------------------------------------------------------- a request
def _request(argv: Sequence[str], task: str | None) -> dict[str, Any] | None:
    facts = stream_facts((sys.stdin, sys.stdout, sys.stderr))
    if facts is None:
        _debug("not used: stdin, stdout or stderr is closed")
        return None
    try:
        return run_request(argv, task, facts)
    except AgentError as exc:
        _debug(f"not used: {exc}")
        return None


def _through_agent(argv: Sequence[str], task: str | None) -> int | None:
    """The exit status from the agent, or None to run the command in this process."""
    directory = wire.agent_dir()
    problem = wire.private_dir_problem(directory, create=True)
    if problem:
        _debug(f"not used: {problem}")
        return None
    request = _request(argv, task)
    if request is None:
        return None
    names = wire.Names(directory)
    for _attempt in range(2):
        sock = _connect_or_start(names)
        if sock is None:
            return None
        with sock:
            try:
                reply = submit(sock, request, (0, 1, 2))
            except (OSError, EOFError, AgentError) as exc:
                _debug(f"not used: the agent did not take the call ({exc})")
                return None
            if reply["op"] == "accepted":
                return _follow(sock, reply)
            _debug(f"not used: the agent answered {reply['op']}: {reply.get('reason', '')}")
            if reply["op"] != "stale":
                return None
            # An agent of older code retires on this answer; start a fresh one once.
            _wait_gone(names, reply.get("pid"))
    return None


def _wait_gone(names: wire.Names, pid: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while names.socket.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _follow(sock: socket.socket, accepted: Mapping[str, Any]) -> int:
    """Forward Ctrl-C while the agent runs the command; its exit status, or 255 if lost.

    Every Ctrl-C interrupts the command in the agent, as it would in this process;
    the third one stops waiting for an agent that does not react (exit 130). Started
    with SIGINT ignored (``cmd &`` in a script), it stays ignored, as Python keeps it.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return _wait(sock, accepted)
    presses = 0

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal presses
        presses += 1
        if presses >= GIVE_UP_PRESSES:
            raise KeyboardInterrupt
        interrupt(sock)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return _wait(sock, accepted)
    except KeyboardInterrupt:
        print(
            f"mento-fab: interrupted; gave up waiting for the connection agent "
            f"(pid {accepted.get('pid')})",
            file=sys.stderr,
            flush=True,
        )
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait(sock: socket.socket, accepted: Mapping[str, Any]) -> int:
    """The call's exit status, or 255 (and one line) when the agent was lost."""
    try:
        return wait_exit(sock, accepted.get("pid"))
    except AgentLost as exc:
        print(f"mento-fab: {exc} (MENTO_AGENT=0 runs without the agent)", file=sys.stderr,
              flush=True)  # fmt: skip
        return defaults.UNREACHABLE_EXIT


# ------------------------------------------------------------ state and stop
def query(names: wire.Names, message: Mapping[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Ask one agent (``{"op": "status"}`` or ``{"op": "stop"}``) and return its answer."""
    with connect(names, timeout=timeout) as sock:
        sock.settimeout(timeout)
        wire.send(sock, message)
        reply, _ = wire.recv(sock)
    return reply


def stop(names: wire.Names, timeout: float = 15.0) -> bool:
    """Stop one agent and wait until it is gone; False when none was running."""
    try:
        reply = query(names, {"op": "stop"})
    except (FileNotFoundError, ConnectionRefusedError):
        with contextlib.suppress(OSError):
            if os.lstat(names.socket).st_uid == os.getuid():
                names.socket.unlink()
        return False
    pid = int(reply.get("pid", 0))
    deadline = time.monotonic() + timeout
    while pid and alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False
