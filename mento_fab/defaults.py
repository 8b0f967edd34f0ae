"""Every default that a caller, the command line and the docs share, in one place.

The command line reads its defaults from here (``--fanout``, ``--connect-timeout``,
``--host-keys``, ``--keep``, ``--max-output``…), so ``--help``, the README and the
library can never disagree. Module-private tuning constants stay next to the code
they tune.
"""

from __future__ import annotations

#: Where the beamline PC mounts the session directories (``/gpfs/current``).
ROOT_DIR = "/gpfs"
#: Nodes worked on at once by one client.
FANOUT = 32
#: Seconds for a node to connect, show its SSH banner, log in and open a session.
CONNECT_TIMEOUT = 10.0
#: Host-key policy, in OpenSSH's words (``StrictHostKeyChecking``).
HOST_KEYS = "accept-new"
#: Seconds between SSH keepalives on an open connection.
KEEPALIVE_INTERVAL = 15.0
#: Seconds of unacknowledged data after which a connection counts as dead.
DEAD_PEER_TIMEOUT = 60.0
#: Extra seconds past ``timeout`` for the remote ``timeout`` to report back (then SIGKILL).
KILL_GRACE = 3.0
#: Bytes of stdout and of stderr kept per node; the rest is counted and dropped.
MAX_OUTPUT = 16 * 1024 * 1024
#: Largest node set accepted from the command line or a caller (before expanding it).
MAX_NODES = 10_000
#: Largest metadata file read (bytes); the facility's files are a few kB.
MAX_METADATA_BYTES = 4 * 1024 * 1024
#: Releases kept per deploy target (live ones; never-live ones do not count).
KEEP_RELEASES = 5
#: Seconds a deploy waits for another deploy's lock on the same target.
LOCK_TIMEOUT = 300.0
#: The exit status of a node whose command never ran or never ended (as ssh).
UNREACHABLE_EXIT = 255
#: Exit status for bad input (a broken metadata file, a bad option, a foreign node).
BAD_INPUT_EXIT = 2
#: sbatch's ``--time`` when the caller gives none (the original toolkit's one day).
SLURM_TIME = "1-0"
#: Seconds srun waits for its allocation before giving up (``srun --immediate``).
SRUN_IMMEDIATE = 10
#: Where workers keep their state and logs, relative to the home directory; one
#: subdirectory per node (``<dir>/<hostname>/``), since the nodes share the home.
WORKERS_DIR = ".mento_fab/workers"
#: Seconds between SIGTERM and SIGKILL when a worker is stopped (``--grace``).
WORKER_GRACE = 10.0
#: Bytes of a worker's log file before it becomes ``log.1`` (one old file is kept).
WORKER_LOG_CAP = 10 * 1024 * 1024
#: ``--restart`` when none is given (as systemd's ``Restart=no``).
WORKER_RESTART = "no"
#: ``--max-restarts``: restarts in a row (of runs shorter than a minute) before giving up.
WORKER_MAX_RESTARTS = 10
#: Seconds before the first restart; doubled for each restart in a row, up to the maximum.
WORKER_RESTART_DELAY = 1.0
WORKER_RESTART_DELAY_MAX = 60.0
#: Lines of each worker's log that ``logs`` shows per node (``--lines``).
WORKER_LOG_LINES = 20
#: Seconds between two refreshes of ``top``.
TOP_INTERVAL = 2.0

#: Seconds without a call after which the connection agent exits (``MENTO_AGENT_IDLE``).
AGENT_IDLE = 600.0
#: Seconds a client waits for the agent to say it is ready for a call; then it runs the
#: call itself (nothing ran in the agent: it starts only on the client's "go").
AGENT_ANSWER_TIMEOUT = 10.0
