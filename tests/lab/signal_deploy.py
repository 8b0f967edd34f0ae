"""``mento-fab ARGS...`` in this process, signalling itself while nodes switch.

    python signal_deploy.py SIGNAL FIRST SECOND mento-fab-args...

sends SIGNAL to itself when the FIRST node's switch is done, and again (if
SECOND is not "-") when the SECOND node's is: what a user's Ctrl-C (or a
scheduler's SIGTERM) does in the middle of the switch phase.
"""

from __future__ import annotations

import os
import signal
import sys

from mento_fab.deployment import phases

sig = getattr(signal, sys.argv[1])
when = {sys.argv[2], sys.argv[3]} - {"-"}
real_switch = phases.switch


def switch(reps, remote, name, fanout, event):  # type: ignore[no-untyped-def]
    def tell(node: str, what: str) -> None:
        event(node, what)
        if what == "switched" and node in when:
            os.kill(os.getpid(), sig)

    return real_switch(reps, remote, name, fanout, tell)


phases.switch = switch
sys.argv = ["mento-fab", *sys.argv[4:]]

from mento_fab.cli import main  # noqa: E402

main()
