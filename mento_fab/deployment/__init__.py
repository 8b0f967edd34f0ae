"""Ship an analysis project to every reserved node, atomically: ``releases/`` + ``current``.

One concept per module:

- :mod:`.scan`: a source tree as a release (ignore rules, content hash, tar archives);
- :mod:`.digests`: file digests and the cache that spares hashing unchanged files;
- :mod:`.secrets`: refusing a source that holds the beamtime's key or a token;
- :mod:`.envfiles`: ``.mento/beamtime.env``/``.json`` and token paths as nodes see them;
- :mod:`.remote`: the shell commands sent to the nodes (tested by running them locally);
- :mod:`.phases`: one function per step (probe, stage, switch, revert, commit, prune);
- :mod:`.lock`: one deploy or rollback per target at a time, dead holders taken over;
- :mod:`.signals`: Ctrl-C, SIGTERM, SIGHUP held back while nodes switch;
- :mod:`.orchestrate`: :func:`deploy`, the all-or-none rule over those steps;
- :mod:`.history`: :func:`releases` and :func:`rollback`;
- :mod:`.report`: :class:`DeployReport` with a :class:`NodeState` per node.

Example (a session's metadata file, nodes from its reservation)::

    from mento_fab import nodes_group
    from mento_fab.deployment import deploy
    with nodes_group("/gpfs/current/beamtime-metadata-1.json") as group:
        report = deploy(group, "/gpfs/current/beamtime-metadata-1.json", "~/analysis")
    print(report.outcome, report.exit_status)
"""

from __future__ import annotations

from mento_fab.deployment.envfiles import beamtime_files, default_target, node_path
from mento_fab.deployment.history import releases, rollback
from mento_fab.deployment.orchestrate import deploy
from mento_fab.deployment.report import DeployReport, NodeDeploy, NodeReleases, NodeState
from mento_fab.deployment.scan import DEFAULT_EXCLUDES, Entry, Release, build_release
from mento_fab.deployment.secrets import SecretScan, refuse_secrets
from mento_fab.errors import UnsafeSourceError

__all__ = [
    "DEFAULT_EXCLUDES",
    "DeployReport",
    "Entry",
    "NodeDeploy",
    "NodeReleases",
    "NodeState",
    "Release",
    "SecretScan",
    "UnsafeSourceError",
    "beamtime_files",
    "build_release",
    "default_target",
    "deploy",
    "node_path",
    "refuse_secrets",
    "releases",
    "rollback",
]
