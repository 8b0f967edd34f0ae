"""A trigger call through this user's connection agent, when one is running.

A script that triggers once per scan would pay an SSH login per process; the
agent (:mod:`mento_fab.agent`) keeps those connections open. :func:`run_via_agent`
hands one command to it as the command line's ``run-on-nodes --json --nodes NODE``
(same host-key policy, watchdog, timeout and kept connections as every other
call), with ``/dev/null`` as stdin and pipes for stdout and stderr, and reads the
node's result back from the JSON. Standard library only: a process that triggers
through the agent never imports fabric or paramiko.

The agent is never started from here. Whenever it cannot take the call (none
runs, ``MENTO_AGENT=0``, a stale or foreign socket, busy, older code) the answer
is None and the Trigger runs the command itself; a debug line says why. Once the
agent accepted the call, its outcome is final: an agent lost in the middle is an
error on the result, never a second run.

>>> agent_argv("cn01", "echo hi", 5.0, "/gpfs/current/md.json",
...            {"host_keys": "accept-new", "connect_timeout": 10.0})[1:5]
['run-on-nodes', '--json', '--nodes', 'cn01']
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mento_fab.agent import wire
from mento_fab.agent.client import connect, disabled, interrupt, run_request, submit, wait_exit
from mento_fab.errors import AgentError, AgentLost
from mento_fab.results import NodeResult

__all__ = ["AGENT_CALLS", "INTERRUPT_WAIT", "AgentRoute", "agent_argv", "connect_failed",
           "run_via_agent"]  # fmt: skip

log = logging.getLogger("mento_fab.trigger")

#: Calls per node through the agent; then a Trigger opens its own connection (a call
#: over it costs a few ms, through the agent tens of ms, a login about 0.3 s).
AGENT_CALLS = 8
#: Seconds to wait for the agent's answer to a call before running it ourselves.
ANSWER_TIMEOUT = 10.0
#: Seconds a Ctrl-C waits for the agent to end the remote command before giving up on it.
INTERRUPT_WAIT = 30.0
#: invoke reads these config files; they may set ssh_config/known_hosts for the agent's call.
_CONFIG_FILES = tuple(
    f"{base}.{ext}" for base in ("/etc/mento_fab", "~/.mento_fab")
    for ext in ("yaml", "yml", "json", "py")
)  # fmt: skip
#: What the agent's streams look like (pipes, UTF-8, as print_json writes).
_STREAMS = {
    name: {"encoding": "utf-8", "errors": errors, "line_buffering": False, "write_through": False}
    for name, errors in (("stdin", "strict"), ("stdout", "strict"), ("stderr", "backslashreplace"))
}


#: How :func:`mento_fab.connection.describe_error` words a failure to connect or log in
#: (nothing ran): the Trigger's connect back-off applies to these through the agent too.
_CONNECT_FAILURES = (
    "unreachable:", "connect timed out", "unknown host", "no SSH server answered",
    "no SSH handshake", "authentication failed", "host key",
)  # fmt: skip


def connect_failed(error: str | None) -> bool:
    """True when a node's error says the connection or login failed (nothing ran).

    >>> connect_failed("connect timed out after 2 s"), connect_failed("timed out after 5 s")
    (True, False)
    """
    return bool(error) and str(error).startswith(_CONNECT_FAILURES)


def agent_argv(
    node: str,
    line: str,
    timeout: float | None,
    metadata_file: str | os.PathLike[str],
    options: Mapping[str, Any],
) -> list[str]:
    """The command line the agent runs for one trigger call (the Trigger's SSH options)."""
    policy = options.get("host_keys")
    argv = [
        "mento-fab", "run-on-nodes", "--json", "--nodes", node,
        "--metadata", str(metadata_file),
        "--host-keys", str(getattr(policy, "value", policy)),
        "--connect-timeout", repr(float(options["connect_timeout"])),
    ]  # fmt: skip
    for name in ("ssh_config", "known_hosts"):
        if options.get(name) is not None:
            argv += [f"--{name.replace('_', '-')}", os.fspath(options[name])]
    if timeout is not None:
        argv += ["--timeout", repr(float(timeout))]
    return [*argv, f"--command={line}"]


def _unusable(metadata_file: Path | None, options: Mapping[str, Any]) -> str | None:
    """Why this call cannot go through the agent (None: it can, if one runs)."""
    if disabled():
        return "MENTO_AGENT=0"
    if metadata_file is None:
        return "the Trigger was given a metadata object, not a file"
    if options.get("ssh_config") is None or options.get("known_hosts") is None:
        # The agent's command line would fill them in from a config file; we would not.
        for name in _CONFIG_FILES:
            if os.path.exists(os.path.expanduser(name)):
                return f"{name} may set SSH options the Trigger does not use"
    return None


def _connect() -> tuple[socket.socket | None, str]:
    directory = wire.agent_dir()
    problem = wire.private_dir_problem(directory)
    if problem:
        return None, problem
    names = wire.Names(directory)
    try:
        return connect(names), ""
    except (FileNotFoundError, ConnectionRefusedError):
        return None, f"no agent runs at {names.socket}"
    except (AgentError, OSError) as exc:
        return None, str(exc)


class AgentRoute:
    """One Trigger's calls through the agent: the first :data:`AGENT_CALLS` per node.

    A script that triggers a few times (one process per scan) never logs in; one
    that keeps triggering switches to its own connection, which is faster per call.
    """

    def __init__(self, metadata_file: os.PathLike[str] | None, options: Mapping[str, Any]):
        self.metadata_file = None if metadata_file is None else Path(os.path.abspath(metadata_file))
        self.options = options
        #: Calls the agent took, per node.
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def run(self, node: str, line: str, timeout: float | None) -> NodeResult | None:
        """:func:`run_via_agent` while this node has had fewer than AGENT_CALLS; else None."""
        with self._lock:
            if self.calls.get(node, 0) >= AGENT_CALLS:
                return None
        result = run_via_agent(node, line, timeout, self.metadata_file, self.options)
        if result is not None:
            with self._lock:
                self.calls[node] = self.calls.get(node, 0) + 1
                if self.calls[node] == AGENT_CALLS:
                    log.debug("trigger: %s: own connection after %d calls", node, AGENT_CALLS)
        return result


def run_via_agent(
    node: str,
    line: str,
    timeout: float | None,
    metadata_file: Path | None,
    options: Mapping[str, Any],
) -> NodeResult | None:
    """Run ``line`` on ``node`` through the agent; None when it did not take the call.

    A KeyboardInterrupt while the agent runs it is forwarded (the agent ends the
    remote command, as Ctrl-C does on the direct path), then raised here.
    """
    reason = _unusable(metadata_file, options)
    sock = None
    if reason is None:
        sock, reason = _connect()
    if sock is None:
        log.debug("trigger: agent not used: %s", reason)
        return None
    assert metadata_file is not None
    argv = agent_argv(node, line, timeout, metadata_file, options)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    with sock:
        try:
            try:
                sock.settimeout(ANSWER_TIMEOUT)
                reply = submit(
                    sock, run_request(argv, "run-on-nodes", _STREAMS), (stdin, out_w, err_w),
                    timeout=ANSWER_TIMEOUT,
                )  # fmt: skip
                sock.settimeout(None)
            except (OSError, EOFError, AgentError) as exc:
                log.debug("trigger: agent not used: it did not take the call (%s)", exc)
                return None
            finally:  # the agent holds its own copies now
                for fd in (stdin, out_w, err_w):
                    os.close(fd)
            if reply.get("op") != "accepted":
                log.debug(
                    "trigger: agent not used: it answered %s: %s",
                    reply.get("op"),
                    reply.get("reason", ""),
                )
                return None
            log.debug("trigger: through the agent (pid %s): %s", reply.get("pid"), line)
            return _collect(sock, out_r, err_r, node, reply.get("pid"))
        finally:
            os.close(out_r)
            os.close(err_r)


def _collect(sock: socket.socket, out_r: int, err_r: int, node: str, pid: Any) -> NodeResult:
    """Read the call's stdout and stderr until it exits; its node result."""
    start = time.monotonic()
    output = {out_r: bytearray(), err_r: bytearray()}
    status: int | None = None
    error: str | None = None
    interrupted = False
    give_up = None
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        sel.register(out_r, selectors.EVENT_READ)
        sel.register(err_r, selectors.EVENT_READ)
        open_fds = {sock.fileno(), out_r, err_r}
        while open_fds:
            try:
                wait = None if give_up is None else max(0.0, give_up - time.monotonic())
                events = sel.select(wait)
                if give_up is not None and not events and time.monotonic() >= give_up:
                    break
                for key, _ in events:
                    fd = key.fd
                    if fd == sock.fileno():
                        sel.unregister(fd)
                        open_fds.discard(fd)
                        try:
                            status = wait_exit(sock, pid)
                        except AgentLost as exc:
                            error = str(exc)
                            give_up = time.monotonic() + 1.0  # what is left in the pipes
                        continue
                    chunk = os.read(fd, 65536)
                    if chunk:
                        output[fd] += chunk
                    else:
                        sel.unregister(fd)
                        open_fds.discard(fd)
            except KeyboardInterrupt:
                if interrupted:  # a second one: stop waiting (closing the socket ends it too)
                    raise
                interrupted = True
                if not interrupt(sock):
                    raise
                give_up = time.monotonic() + INTERRUPT_WAIT
    if interrupted:
        raise KeyboardInterrupt
    stderr = output[err_r].decode("utf-8", "replace")
    for text in stderr.splitlines():  # the command line's own words (a key or host-key warning)
        if text.strip():
            level = logging.WARNING if "WARNING" in text else logging.DEBUG
            log.log(level, "trigger: agent: %s", text.strip())
    if error is not None:
        return NodeResult(node=node, error=error, seconds=time.monotonic() - start)
    return _result(node, status, bytes(output[out_r]), stderr, time.monotonic() - start)


def _result(
    node: str, status: int | None, stdout: bytes, stderr: str, seconds: float
) -> NodeResult:
    """The node's result from ``run-on-nodes --json``; an error when there is none."""
    try:
        (data,) = json.loads(stdout)["nodes"]
        return NodeResult(
            node=str(data["node"]),
            exit=data.get("exit"),
            stdout=data.get("stdout") or "",
            stderr=data.get("stderr") or "",
            error=data.get("error"),
            message=data.get("message"),
            seconds=float(data.get("seconds") or seconds),
            stdout_dropped=int((data.get("dropped") or {}).get("stdout", 0)),
            stderr_dropped=int((data.get("dropped") or {}).get("stderr", 0)),
        )
    except (ValueError, KeyError, TypeError):
        lines = [t.strip() for t in stderr.splitlines() if t.strip()]
        why = lines[-1] if lines else "no result"
        return NodeResult(
            node=node, error=f"the connection agent's call failed (exit {status}): {why}",
            seconds=seconds,
        )  # fmt: skip
