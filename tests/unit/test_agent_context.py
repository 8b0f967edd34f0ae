"""The agent's per-call world without the lab: waits in a call's thread, cut into slices
so that Ctrl-C gets through, never lose a wake-up.

:func:`mento_fab.agent.context.install` changes the whole process (``Condition.wait``,
``time.sleep``, ``Thread.start``), so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mento_fab

ROOT = Path(mento_fab.__file__).resolve().parents[1]

#: Rounds of WAITERS Futures completed close to slice boundaries. Before the fix the
#: first round or so lost a wake-up; the whole loop takes a few seconds.
ROUNDS = 60
WAITERS = 32

LOST_WAKE = (
    textwrap.dedent(
        """
    import random, sys, threading
    from concurrent.futures import Future
    from mento_fab.agent import context

    context.install()
    context.SLICE = 0.002  # many slice boundaries per wait: where a notify got lost
    for round in range(ROUNDS):
        futures = [Future() for _ in range(WAITERS)]
        finished = threading.Semaphore(0)

        def waiter(future):
            context._local.interruptible = True  # as in a call's main thread
            future.result()
            finished.release()

        for future in futures:
            threading.Thread(target=waiter, args=(future,), daemon=True).start()
        for i, future in enumerate(futures):
            delay = context.SLICE * random.uniform(0.5, 4)
            threading.Timer(delay, future.set_result, args=(i,)).start()
        for _ in futures:  # a lost wake-up waits forever; generous for a loaded machine
            if not finished.acquire(timeout=20):
                print(f"round {round}: a Future.result() missed its wake-up", flush=True)
                sys.exit(1)
    print("ok")
    """
    )
    .replace("ROUNDS", str(ROUNDS))
    .replace("WAITERS", str(WAITERS))
)

INTERRUPT = textwrap.dedent(
    """
    import ctypes, threading
    from mento_fab.agent import context

    context.install()
    waiting, caught = threading.Event(), threading.Event()

    def call():
        context._local.interruptible = True
        try:
            waiting.set()
            threading.Event().wait()  # untimed: only the interrupt ends it
        except KeyboardInterrupt:
            caught.set()

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    waiting.wait()
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(KeyboardInterrupt))
    print("ok" if caught.wait(30) else "not interrupted")
    """
)


def _run(script: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )


def test_a_sliced_wait_never_loses_a_wake_up() -> None:
    """A notify landing as one slice timed out left ``Future.result()`` waiting forever."""
    proc = _run(LOST_WAKE)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_an_untimed_wait_in_a_call_still_takes_ctrl_c() -> None:
    """The reason for the slices: an asynchronous KeyboardInterrupt ends an untimed wait."""
    proc = _run(INTERRUPT)
    assert proc.stdout.strip() == "ok", proc.stdout + proc.stderr
