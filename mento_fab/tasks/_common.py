"""What every task shares: settings precedence, metadata and group from options, errors.

Precedence (design.md): task option > environment (``MENTO_METADATA``,
``MENTO_ROOT_DIR``, ``MENTO_SSH_CONFIG``) > invoke config (``mento_fab.*``) >
default. Bad input ends the task with one line on stderr and exit status 2.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from invoke import Context, Exit

from mento_fab.metadata import BeamtimeMetadata, MetadataError, locate_metadata_file
from mento_fab.nodes import SelectionError

ENVIRONMENT = {
    "metadata": "MENTO_METADATA",
    "root_dir": "MENTO_ROOT_DIR",
    "ssh_config": "MENTO_SSH_CONFIG",
}
DEFAULTS: dict[str, Any] = {
    "root_dir": "/gpfs",
    "fanout": 32,
    "connect_timeout": 10.0,
    "host_keys": "accept-new",
}
BAD_INPUT = 2

#: Option help shared by every task.
COMMON_HELP = {
    "root_dir": "directory above the session (default /gpfs; env MENTO_ROOT_DIR)",
    "metadata": "metadata file to use; wins over --root-dir (env MENTO_METADATA)",
    "json": "print JSON for scripts instead of text",
}
NODE_HELP = {
    **COMMON_HELP,
    "nodes": "node set to use, e.g. 'cn[01-03]' (default: all reserved nodes)",
    "exclude": "node set to leave out",
    "fanout": "how many nodes at once (default 32)",
    "connect_timeout": "seconds to wait for a node to connect and log in (default 10)",
    "host_keys": "accept-new (default), strict, or off",
    "ssh_config": "ssh_config file to use (env MENTO_SSH_CONFIG)",
    "known_hosts": "known_hosts file (default: ssh_config UserKnownHostsFile, ~/.ssh/known_hosts)",
}

F = TypeVar("F", bound=Callable[..., Any])


def setting(c: Context, name: str, option: Any = None) -> Any:
    """Resolve one setting by the documented precedence."""
    if option is not None:
        return option
    env = ENVIRONMENT.get(name)
    if env and os.environ.get(env):
        return os.environ[env]
    value = _config_section(c).get(name)
    return DEFAULTS.get(name) if value is None else value


def _config_section(c: Context) -> Any:
    """The ``mento_fab:`` section of the invoke config files (empty when absent)."""
    section = c.config.get("mento_fab") or {}
    return section if hasattr(section, "get") else {}


def metadata_file(c: Context, root_dir: str | None, metadata: str | None) -> str:
    """The metadata file the options point at (the file wins over the root dir)."""
    # Options beat the environment, which beats the config file; at each level the
    # metadata file beats the root dir.
    if metadata:
        return str(metadata)
    if root_dir is not None:
        return locate_metadata_file(root_dir)
    config = _config_section(c)
    for file, directory in (
        (os.environ.get(ENVIRONMENT["metadata"]), os.environ.get(ENVIRONMENT["root_dir"])),
        (config.get("metadata"), config.get("root_dir")),
    ):
        if file:
            return str(file)
        if directory:
            return locate_metadata_file(directory)
    return locate_metadata_file(DEFAULTS["root_dir"])


def load(c: Context, root_dir: str | None, metadata: str | None) -> tuple[BeamtimeMetadata, str]:
    from mento_fab.metadata import parse_metadata_file

    path = metadata_file(c, root_dir, metadata)
    return parse_metadata_file(path), path


def group(
    c: Context,
    md: BeamtimeMetadata,
    *,
    nodes: str | None = None,
    exclude: str | None = None,
    connect_timeout: float | None = None,
    host_keys: str | None = None,
    ssh_config: str | None = None,
    known_hosts: str | None = None,
) -> Any:
    """A nodes_group from task options."""
    from mento_fab.nodes import HostKeyPolicy, nodes_group

    policy = setting(c, "host_keys", host_keys)
    try:
        policy = HostKeyPolicy(policy)
    except ValueError:
        raise ValueError(f"--host-keys must be accept-new, strict or off, not {policy!r}") from None
    if policy is HostKeyPolicy.OFF:
        print(
            "mento-fab: WARNING: host key checking is OFF: any machine answering for a node "
            "is trusted with the beamtime's key and data",
            file=sys.stderr,
        )
    return nodes_group(
        md,
        nodes=nodes,
        exclude=exclude,
        ssh_config=setting(c, "ssh_config", ssh_config),
        known_hosts=known_hosts or setting(c, "known_hosts"),
        host_keys=policy,
        connect_timeout=number("--connect-timeout", setting(c, "connect_timeout", connect_timeout)),
    )


def number(option: str, value: Any) -> float:
    """An option's value as a positive number (invoke hands options over as strings)."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{option} takes a number, not {value!r}") from None
    if not result > 0:
        raise ValueError(f"{option} must be positive, not {value!r}")
    return result


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
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


def friendly(func: F) -> F:
    """Turn bad input and group failures into one line and an exit status, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from fabric.exceptions import GroupException

        try:
            return func(*args, **kwargs)
        except BrokenPipeError:  # `mento-fab ... | head`: stop quietly, like other tools
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise Exit(code=141) from None
        except (MetadataError, SelectionError, RuntimeError, ValueError, OSError) as exc:
            # OSError: missing, unreadable or misplaced files named on the command line.
            raise Exit(f"mento-fab: {exc}", code=BAD_INPUT) from None
        except GroupException as exc:
            failed = sorted(
                f"{getattr(conn, 'original_host', conn.host)}: {type(result).__name__}: {result}"
                for conn, result in exc.result.items()
                if isinstance(result, BaseException)
            )
            raise Exit("mento-fab: " + "; ".join(failed), code=255) from None
        except KeyboardInterrupt:
            raise Exit("mento-fab: interrupted", code=130) from None

    return wrapper  # type: ignore[return-value]
