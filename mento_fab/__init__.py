"""mento_fab: from a PETRA III beamtime metadata file to work on every reserved node.

The library never prints and never needs root. Names are imported on first use,
so ``import mento_fab`` stays cheap::

    from mento_fab import nodes_group, run, run_on_nodes, Session
    report = run_on_nodes("hostname", metadata="/gpfs/current/beamtime-metadata-1.json")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(
        ("AsapoInfo", "BeamtimeMetadata", "OnlineInfo", "SlurmInfo", "SSHInfo",
         "get_active_session_root", "get_beamtime_metadata", "locate_metadata_file",
         "parse_metadata_file"),
        "metadata",
    ),
    **dict.fromkeys(
        ("MentoError", "BadInput", "MetadataError", "NoOnlineAnalysis", "SelectionError",
         "NodeError", "HostKeyRefused", "SlurmError", "DeployError", "TriggerError",
         "MissingFile", "SeveralMetadataFiles", "UnmappablePath"),
        "errors",
    ),
    **dict.fromkeys(("NodeResult", "RunReport"), "results"),
    "Session": "session",
    "HostKeyPolicy": "hostkeys",
    **dict.fromkeys(("nodes_group", "select_nodes"), "nodes"),
    **dict.fromkeys(("run", "run_on_nodes"), "runner"),
    **dict.fromkeys(("deploy", "rollback"), "deployment"),
    "Slurm": "slurm",
    **dict.fromkeys(("Trigger", "TriggerMethod"), "trigger"),
    # The rest of the original ``mento`` package's top-level names.
    **dict.fromkeys(("get_ssh_command", "get_sbatch_command"), "commands"),
}  # fmt: skip

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mento_fab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mento_fab.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
