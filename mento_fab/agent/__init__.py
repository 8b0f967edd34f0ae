"""The per-user connection agent: every ``mento-fab`` call after the first is warm.

A call of ``mento-fab`` is a thin client (:mod:`mento_fab.cli.client`, standard library only)
that hands its argv, environment, working directory and its stdin/stdout/stderr
file descriptors to a background process of the same user (:mod:`.server`) over a
UNIX socket in a private directory (:mod:`.wire`). The agent runs the same invoke
Program in a thread, with that request's streams (:mod:`.context`), and keeps the
SSH connections to the beamtime's nodes open between calls (:mod:`.pool`).

The library uses only :mod:`.client` (standard library, never starts an agent): a
:class:`~mento_fab.trigger.Trigger` sends its calls through a running agent.
``MENTO_AGENT=0`` or ``mento-fab --no-agent`` runs a command in its own process as before.
"""
