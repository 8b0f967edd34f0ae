"""Options every task shares, declared once, and how a task turns them into a session.

Precedence: task option > environment (``MENTO_METADATA``,
``MENTO_ROOT_DIR``, ``MENTO_SSH_CONFIG``) > invoke config (``mento_fab.*``) >
the library's default (:mod:`mento_fab.defaults`).

invoke builds a task's options from its signature, so :func:`mento_task` gives the
task a signature holding its own parameters plus the shared ones, and hands the
shared ones to the body as one :class:`Options` object::

    @mento_task(shared=NODES, help={"command": "the shell command"})
    def run_on_nodes(c, opts: Options, command: str, stream: bool = False): ...
"""

from __future__ import annotations

import functools
import inspect
import json as jsonlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from invoke import Argument, Context, Task, task

from mento_fab import defaults
from mento_fab.cli.exits import friendly
from mento_fab.errors import BadInput
from mento_fab.session import Session

__all__ = [
    "COMMON",
    "NODES",
    "SLURM",
    "SSH",
    "Options",
    "configure_logging",
    "is_tty",
    "mento_task",
    "number",
    "print_json",
    "whole",
]

#: Environment variables for settings that are not about the metadata file.
ENVIRONMENT = {"ssh_config": "MENTO_SSH_CONFIG"}
_DEFAULTS: dict[str, Any] = {
    "fanout": defaults.FANOUT,
    "connect_timeout": defaults.CONNECT_TIMEOUT,
    "host_keys": defaults.HOST_KEYS,
}

#: name -> help, in the order they appear in ``--help``.
_HELP: dict[str, str] = {
    "root_dir": f"directory above the session (default {defaults.ROOT_DIR}; env MENTO_ROOT_DIR)",
    "metadata": "metadata file to use; wins over --root-dir (env MENTO_METADATA)",
    "json": "print JSON for scripts instead of text",
    "nodes": "node set to use, e.g. 'cn[01-03]' (default: all reserved nodes)",
    "exclude": "node set to leave out",
    "skip_nodes": "node set to leave out",
    "fanout": f"how many nodes at once (default {defaults.FANOUT})",
    "connect_timeout": "seconds to wait for a node to connect and log in "
    f"(default {defaults.CONNECT_TIMEOUT:g})",
    "host_keys": f"{defaults.HOST_KEYS} (default), strict, or off",
    "ssh_config": "ssh_config file to use (env MENTO_SSH_CONFIG)",
    "submit_node": "node to run Slurm commands on (default: the first reachable reserved node)",
    "known_hosts": "known_hosts file (default: ssh_config UserKnownHostsFile, ~/.ssh/known_hosts)",
}
#: The shared option sets a task can ask for.
COMMON = ("root_dir", "metadata", "json")
SSH = ("connect_timeout", "host_keys", "ssh_config", "known_hosts")
NODES = (*COMMON, "nodes", "exclude", "fanout", *SSH)
#: Deploy's own ``--exclude`` takes file patterns: its node exclusion is ``--skip-nodes``.
NODES_SKIP = (*COMMON, "nodes", "skip_nodes", "fanout", *SSH)
#: The Slurm tasks work through one submit node.
SLURM = (*COMMON, "submit_node", *SSH)
_FLAGS = {"json"}

#: Builds a task's group from ``nodes_group``'s arguments (None: ``nodes_group``).
#: The connection agent installs one that hands out connections kept open between
#: calls (:meth:`mento_fab.agent.pool.Pool.group`).
group_provider: Callable[..., Any] | None = None


@dataclass
class Options:
    """The shared options of one task call, resolved by the documented precedence."""

    c: Context
    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def setting(self, name: str) -> Any:
        """Option > environment > invoke config > library default."""
        option = self.values.get(name)
        if option is not None:
            return option
        env = ENVIRONMENT.get(name)
        if env and os.environ.get(env):
            return os.environ[env]
        value = _config_section(self.c).get(name)
        return _DEFAULTS.get(name) if value is None else value

    @property
    def fanout(self) -> int:
        value = number("--fanout", self.setting("fanout"))
        if value != int(value):
            raise BadInput(f"--fanout takes a whole number, not {self.setting('fanout')!r}")
        return int(value)

    @property
    def connect_timeout(self) -> float:
        return number("--connect-timeout", self.setting("connect_timeout"))

    @property
    def excluded(self) -> str | None:
        return self.values.get("exclude") or self.values.get("skip_nodes")

    def session(self) -> Session:
        """The metadata the options point at, parsed; a missing file is bad input."""
        config = _config_section(self.c)
        metadata = self.values.get("metadata")
        if metadata is not None and not str(metadata).strip():
            raise BadInput("--metadata needs a file name")
        # Everything Session.load raises on purpose is BadInput (missing or several files).
        return Session.load(
            metadata,
            self.values.get("root_dir"),
            config={"metadata": config.get("metadata"), "root_dir": config.get("root_dir")},
        )

    def group(self, session: Session, *, nodes: str | None = None) -> Any:
        """A nodes_group from the options (``nodes`` overrides ``--nodes``)."""
        from mento_fab.hostkeys import HostKeyPolicy
        from mento_fab.nodes import nodes_group

        policy = self.setting("host_keys")
        try:
            policy = HostKeyPolicy(policy)
        except ValueError:
            raise BadInput(
                f"--host-keys must be accept-new, strict or off, not {policy!r}"
            ) from None
        if policy is HostKeyPolicy.OFF:
            print(
                "mento-fab: WARNING: host key checking is OFF: any machine answering for a "
                "node is trusted with the beamtime's key and data",
                file=sys.stderr,
            )
        return (group_provider or nodes_group)(
            session,
            nodes=nodes if nodes is not None else self.values.get("nodes"),
            exclude=self.excluded,
            ssh_config=self.setting("ssh_config"),
            known_hosts=self.values.get("known_hosts") or self.setting("known_hosts"),
            host_keys=policy,
            connect_timeout=self.connect_timeout,
        )


def _config_section(c: Context) -> Any:
    """The ``mento_fab:`` section of the invoke config files (empty when absent)."""
    section = c.config.get("mento_fab") or {}
    return section if hasattr(section, "get") else {}


_ARGUMENTS_LOCK = threading.Lock()


class _Task(Task):
    """An invoke Task whose option help survives building its arguments.

    invoke pops each help entry as it builds the task's arguments, so a second parse
    (the agent's next call, a second Program) would show the options without help.
    """

    def get_arguments(self, ignore_unknown_help: bool | None = None) -> list[Argument]:
        # One task object serves every call in the connection agent: two parses at once
        # would pop each other's entries (and invoke then refuses the leftovers).
        with _ARGUMENTS_LOCK:
            kept = dict(self.help)
            try:
                return super().get_arguments(ignore_unknown_help)
            finally:
                self.help = kept


def mento_task(
    *,
    shared: Iterable[str] = COMMON,
    help: Mapping[str, str] | None = None,
    **task_options: Any,
) -> Callable[[Callable[..., Any]], Any]:
    """An invoke task whose body takes ``(c, opts: Options, *own parameters)``.

    The task's signature is ``(c, *own parameters, *shared options)``, so invoke shows
    every option in ``--help``; errors become one line and the exit table's status.
    """
    shared = tuple(shared)

    def decorate(body: Callable[..., Any]) -> Any:
        own = list(inspect.signature(body).parameters.values())
        ctx, own = own[0], own[2:]  # (c, opts, ...)
        extra = [
            inspect.Parameter(
                name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=False if name in _FLAGS else None,
                annotation=bool if name in _FLAGS else str | None,
            )
            for name in shared
        ]
        signature = inspect.Signature([ctx, *own, *extra])

        @functools.wraps(body)
        def wrapper(c: Context, *args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(c, *args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            values.pop(ctx.name)
            opts = Options(c, {name: values.pop(name) for name in shared})
            return body(c, opts, **values)

        wrapper.__signature__ = signature  # type: ignore[attr-defined]
        del wrapper.__wrapped__  # invoke must see the new signature, not the body's
        merged = {name: _HELP[name] for name in shared}
        merged.update(help or {})
        task_options.setdefault("auto_shortflags", False)
        task_options.setdefault("klass", _Task)
        return task(friendly(wrapper), help=merged, **task_options)

    return decorate


def number(option: str, value: Any) -> float:
    """An option's value as a positive, finite number (invoke hands options over as strings)."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise BadInput(f"{option} takes a number, not {value!r}") from None
    if not 0 < result < 1e9:
        raise BadInput(f"{option} must be a positive number below 1e9, not {value!r}")
    return result


def whole(option: str, value: Any) -> int:
    """An option's value as a whole number >= 0."""
    try:
        result = int(str(value))
    except ValueError:
        raise BadInput(f"{option} takes a whole number, not {value!r}") from None
    if result < 0:
        raise BadInput(f"{option} must not be negative, not {value!r}")
    return result


def print_json(data: Any) -> None:
    jsonlib.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def is_tty(stream: Any = None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def configure_logging() -> None:
    """Library warnings as ``mento-fab: ...`` lines; paramiko's tracebacks stay out of sight.

    Called by the entry points (``mento-fab``, the root ``tasks.py``), never on
    import of the library, which leaves logging to its host program.

    Per-node failures are already in the report, one line each; paramiko would log
    the same failure again with a traceback through logging's last-resort handler.
    """
    logger = logging.getLogger("mento_fab")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("mento-fab: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("MENTO_LOG_LEVEL", "WARNING").upper())
        logger.propagate = False
    paramiko_logger = logging.getLogger("paramiko")
    if not paramiko_logger.handlers:
        paramiko_logger.addHandler(logging.NullHandler())
        paramiko_logger.propagate = False
