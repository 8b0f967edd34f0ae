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
