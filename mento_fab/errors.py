"""Every exception mento_fab raises on purpose, under one root: :class:`MentoError`.

The tree says who has to act, which is what the command line turns into an exit
status (``mento_fab.cli.exits``, the one table):

- :class:`BadInput` (also a ``ValueError``): the caller gave something unusable:
  a broken metadata file, a node set outside the reservation, a bad option value.
  Exit status 2.
- :class:`NodeError` (also a ``RuntimeError``): one node failed (unreachable, lost,
  refused its host key). Inside a run this is data in a ``NodeResult``; raised on
  its own it exits 255, as ssh does.
- :class:`SlurmError`, :class:`DeployError`, :class:`TriggerError` (``RuntimeError``):
  an operation that could not be completed for a reason outside the caller's input.

Like marshmallow's ``ValidationError``, an error may carry data: ``.messages``
(a dict of key paths to messages) where there is more than one line to say.
Messages never quote a key or a token: they name files and keys instead.

>>> try:
...     raise SelectionError("not reserved for this beamtime: cn99")
... except BadInput as exc:
...     print(type(exc).__name__, isinstance(exc, ValueError), exc)
SelectionError True not reserved for this beamtime: cn99
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AgentError",
    "AgentLost",
    "BadInput",
    "BadPath",
    "BadPort",
    "BadTrigger",
    "DeployError",
    "DeployInterrupted",
    "DeployLocked",
    "EndedEarly",
    "HostKeyRefused",
    "JobTimeout",
    "LocalExists",
    "MentoError",
    "MetadataError",
    "MissingFile",
    "NoOnlineAnalysis",
    "NoSubmitNode",
    "NodeError",
    "PortInUse",
    "RemoteNotFound",
    "ReservationError",
    "SelectionError",
    "SeveralMetadataFiles",
    "SlurmError",
    "SlurmUnavailable",
    "StepFailed",
    "TriggerError",
    "TriggerTimeout",
    "TriggerUnavailable",
    "UnknownJob",
    "UnknownWorker",
    "UnmappablePath",
    "Unreadable",
    "UnsafeArchive",
    "UnsafeSourceError",
    "WorkerError",
    "WorkerNameError",
    "WorkerRunning",
]


class MentoError(Exception):
    """The root of every error mento_fab raises on purpose."""

    def __init__(self, message: str = "", messages: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        #: Structured details (key path -> message(s)), like marshmallow's ``.messages``.
        self.messages: dict[str, Any] = messages or {}


class BadInput(MentoError, ValueError):
    """Something the caller supplied cannot be used as it is (exit status 2)."""


class MetadataError(BadInput):
    """Anything wrong *inside* a metadata file.

    The message names the file and the JSON key path (``onlineAnalysis.reservedNodes``);
    :attr:`messages` holds the full marshmallow error dict for programs.
    """

    def __init__(self, path: object, problem: str, messages: dict[str, Any] | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}", messages)

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as ``cls(*self.args)``, which this __init__ cannot take:
        # multiprocessing in beamline scripts failed with a TypeError.
        return (type(self), (self.path, self.problem, self.messages), self.__dict__)


class MissingFile(BadInput, FileNotFoundError):
    """A local file the caller named (key, ssh_config, script, source) does not exist."""


class Unreadable(BadInput, PermissionError):
    """A local file or directory the caller named that this user may not read.

    A ``PermissionError`` too, as the original ``mento`` let it escape.
    """


class SeveralMetadataFiles(BadInput, RuntimeError):
    """A session directory holds more than one metadata file (IT writes one): never a guess.

    A ``RuntimeError`` too, as the original ``mento.metadata`` raised.
    """


class UnmappablePath(BadInput, FileNotFoundError):
    """A path that cannot be mapped to the cluster: the directory to split at is not in it.

    A ``FileNotFoundError`` too, as the original ``mento.utils`` raised.
    """


class NoOnlineAnalysis(BadInput):
    """The beamtime has no ``onlineAnalysis`` block: no nodes, account or reservation."""

    def __init__(self, beamtime: str, what: str = "compute nodes") -> None:
        self.beamtime = beamtime
        self.what = what
        super().__init__(
            f"beamtime {beamtime} has no onlineAnalysis block: no {what} were reserved"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from ``self.args`` (the whole message) the message came back doubled.
        return (type(self), (self.beamtime, self.what), self.__dict__)


class SelectionError(BadInput):
    """A node selection that cannot be honoured (bad syntax, too large, outside the reservation)."""


class UnsafeSourceError(BadInput):
    """A deploy source that must not be shipped (it holds the key or a token, or escapes)."""


class BadPath(BadInput):
    """A path given to put/get that cannot be used as it is (e.g. ``..`` escaping LOCAL_DIR)."""


class RemoteNotFound(BadPath):
    """A remote path or pattern that names nothing on any selected node."""


class LocalExists(BadPath, FileExistsError):
    """A local file a transfer would replace, without ``overwrite``; nothing was written."""


class BadPort(BadInput):
    """A TCP port out of range for a tunnel."""


class PortInUse(BadPort):
    """The local port a tunnel should listen on is taken."""


class NodeError(MentoError, RuntimeError):
    """One node failed; the message is a short, user-facing reason (no traceback needed)."""


class HostKeyRefused(NodeError):
    """A host key the policy does not accept; the message says what to check."""


class SlurmError(MentoError, RuntimeError):
    """Slurm refused or failed an operation; the message quotes Slurm's reason."""


class SlurmUnavailable(SlurmError):
    """The Slurm controller (or every submit node) could not be reached."""


class NoSubmitNode(SlurmUnavailable):
    """No reserved node could be reached to run Slurm commands on."""


class JobTimeout(SlurmError, TimeoutError):
    """A job was waited for longer than the caller allowed (it may still be running)."""


class UnknownJob(SlurmError):
    """A job id Slurm does not know (never submitted, or ended and forgotten)."""


class ReservationError(SlurmError, BadInput):
    """The beamtime's reservation is missing, inactive or differs from the metadata."""


class DeployError(MentoError, RuntimeError):
    """A deploy, rollback or release listing that could not be carried out."""


class DeployLocked(DeployError):
    """Another deploy holds the target's lock; the message names the holder."""


class DeployInterrupted(DeployError, KeyboardInterrupt):
    """A signal stopped a deploy or rollback once no node was left half-way.

    Also a ``KeyboardInterrupt``, so code that stops on Ctrl-C still does.
    ``report`` (a ``DeployReport``) says which release each node is on.
    """

    def __init__(self, message: str, report: Any, signum: int) -> None:
        super().__init__(message)
        self.report = report
        self.signum = signum

    def __reduce__(self) -> tuple[Any, ...]:
        # As MetadataError: rebuilt from its own arguments, not from ``self.args``.
        return (type(self), (str(self), self.report, self.signum), self.__dict__)


class TriggerError(MentoError, RuntimeError):
    """A trigger could not be sent (the handle carries the per-call error)."""


class TriggerUnavailable(TriggerError, NotImplementedError):
    """A trigger method that is not available here (``SLURM_REST_API``)."""


class TriggerTimeout(TriggerError, TimeoutError):
    """A trigger's handle was waited for longer than the caller allowed."""


class BadTrigger(BadInput, RuntimeError):
    """A trigger the original ``mento.trigger`` refuses with ``RuntimeError``: no command,
    a script that is not executable, an unknown method, no reserved nodes (exit status 2)."""


class WorkerNameError(BadInput):
    """A worker name that is not ``[A-Za-z0-9_.-]+`` (or starts with a dot)."""


class WorkerRunning(BadInput):
    """``start`` of a worker that already runs on some node (``--replace`` replaces it)."""


class UnknownWorker(BadInput):
    """``logs``/``stop``/``ps`` of a worker that no selected node knows."""


class WorkerError(MentoError, RuntimeError):
    """A worker operation that could not be carried out (e.g. its Slurm job failed to start)."""


class StepFailed(NodeError):
    """A deploy step's command failed on a node; carries the step's ``Failure``."""

    def __init__(self, failure: Any) -> None:
        super().__init__(failure.reason)
        self.failure = failure

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.failure,), self.__dict__)


class EndedEarly(NodeError):
    """The remote side stopped reading before the stream ended."""


class UnsafeArchive(MentoError, RuntimeError):
    """A stream from a node holds a member that must not be written (outside, special)."""


class AgentError(MentoError, RuntimeError):
    """The connection agent could not be reached or answered out of turn.

    The thin client turns it into running the command in its own process; only a
    loss in the middle of a command is reported (exit status 255).
    """


class AgentLost(AgentError, NodeError):
    """The connection agent went away in the middle of a call (exit status 255, as a
    lost node): the call ended with it, nothing can say how far it got."""
