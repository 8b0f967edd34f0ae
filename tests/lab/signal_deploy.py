"""``mento-fab ARGS...`` in this process, signalling itself while nodes switch.

    python signal_deploy.py SIGNAL FIRST SECOND mento-fab-args...

sends SIGNAL to itself when the FIRST node's switch is done, and again (if
SECOND is not "-") when the SECOND node's is: what a user's Ctrl-C (or a
scheduler's SIGTERM) does in the middle of the switch phase. SECOND ``xN``
sends N signals 50 ms apart from another thread once FIRST has switched (a user
hammering Ctrl-C).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from mento_fab.deployment import phases

sig = getattr(signal, sys.argv[1])
repeat = int(sys.argv[3][1:]) if sys.argv[3].startswith("x") else 0
when = {sys.argv[2], sys.argv[3]} - {"-", sys.argv[3] if repeat else "-"}
real_switch = phases.switch


def hammer() -> None:
    for _ in range(repeat):
        os.kill(os.getpid(), sig)
        time.sleep(0.05)


def switch(reps, remote, name, fanout, event):  # type: ignore[no-untyped-def]
    def tell(node: str, what: str) -> None:
        event(node, what)
        if what == "switched" and node in when:
            if repeat:
                threading.Thread(target=hammer, daemon=True).start()
            else:
                os.kill(os.getpid(), sig)

    return real_switch(reps, remote, name, fanout, tell)


phases.switch = switch
sys.argv = ["mento-fab", *sys.argv[4:]]

from mento_fab.cli import main  # noqa: E402

main()
