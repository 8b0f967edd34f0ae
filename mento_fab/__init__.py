"""mento_fab: from a PETRA III beamtime metadata file to work on every reserved node.

The library never prints and never needs root. The main entry points::

    from mento_fab import get_beamtime_metadata, nodes_group, run_on_nodes
    report = run_on_nodes("hostname", metadata="/gpfs/current/beamtime-metadata-1.json")
"""

from mento_fab.metadata import (
    AsapoInfo,
    BeamtimeMetadata,
    MetadataError,
    OnlineInfo,
    SlurmInfo,
    SSHInfo,
    get_active_session_root,
    get_beamtime_metadata,
    locate_metadata_file,
    parse_metadata_file,
)
from mento_fab.nodes import HostKeyPolicy, SelectionError, nodes_group, select_nodes
from mento_fab.runner import NodeResult, RunReport, run, run_on_nodes

__version__ = "0.1.0"

__all__ = [
    "AsapoInfo",
    "BeamtimeMetadata",
    "HostKeyPolicy",
    "MetadataError",
    "NodeResult",
    "OnlineInfo",
    "RunReport",
    "SSHInfo",
    "SelectionError",
    "SlurmInfo",
    "__version__",
    "get_active_session_root",
    "get_beamtime_metadata",
    "locate_metadata_file",
    "nodes_group",
    "parse_metadata_file",
    "run",
    "run_on_nodes",
    "select_nodes",
]
