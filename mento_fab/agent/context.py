"""One call's world inside the agent: its streams, the threads working for it, its Ctrl-C.

The tasks print to ``sys.stdout``/``sys.stderr`` from the request's thread and
from threads it starts or hands work to (the runner's worker pool, rich's refresh
thread, a progress timer). :func:`install` replaces the process's streams with
proxies that write to the stream of the :class:`Request` the current thread works
for, and makes ``Thread.start`` and ``ThreadPoolExecutor.submit`` carry that
binding along. Terminal queries on fds 0-2 (``os.get_terminal_size``, as rich and
shutil make them) are answered for the request's own descriptors.

Ctrl-C on the client becomes a ``KeyboardInterrupt`` raised in the request's
thread (``PyThreadState_SetAsyncExc``), where the direct path's signal handler
would raise it: the same ``except``/``finally`` blocks run. Blocking waits in that
thread (``Condition.wait``, so ``Event``/``Future``/``Queue`` waits; ``time.sleep``;
``select.select``) are cut into short slices so the exception is not held up.

Only the agent process calls :func:`install` (it changes the whole process)::

    install()
    with bind(request), interruptible(request):
        print("to the client's stdout")
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import io
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

__all__ = ["Request", "StreamProxy", "bind", "current", "install", "interruptible"]

#: Longest uninterrupted wait in a request's thread (seconds).
SLICE = 0.05

_local = threading.local()
_SET_ASYNC = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


class _Drained(BaseException):
    """Sent to a finished request's own thread to take the place of a pending interrupt.

    Clearing a pending exception with ``PyThreadState_SetAsyncExc(id, NULL)`` would leave
    the interpreter's "async exception pending" flag set for good (CPython 3.11 lowers
    it only when a thread takes one), and every thread would then run the slow path of
    the eval loop. Raising this one, and catching it at once, lowers it.
    """


def _step() -> None:
    """A call: where a pending asynchronous exception is raised."""


def _text_stream(fd: int, mode: str, facts: Mapping[str, Any]) -> TextIO:
    """The stream Python would have made for this fd in the client (same encoding, buffering)."""
    buffer = open(fd, mode + "b", buffering=-1, closefd=True)  # noqa: SIM115 - Request owns it
    return io.TextIOWrapper(
        buffer,  # type: ignore[arg-type]
        encoding=facts.get("encoding") or "utf-8",
        errors=facts.get("errors") or "strict",
        line_buffering=bool(facts.get("line_buffering")),
        write_through=bool(facts.get("write_through")),
    )


class Request:
    """A call being served: the client's streams and the thread that runs it."""

    def __init__(
        self,
        fds: Sequence[int],
        streams: Mapping[str, Mapping[str, Any]],
        *,
        argv: Sequence[str] = (),
        task: str | None = None,
    ) -> None:
        self.fds = dict(enumerate(fds))
        self.stdin = _text_stream(fds[0], "r", streams.get("stdin", {}))
        self.stdout = _text_stream(fds[1], "w", streams.get("stdout", {}))
        self.stderr = _text_stream(fds[2], "w", streams.get("stderr", {}))
        self.argv = list(argv)
        self.task = task
        self.started = time.time()
        self.thread: int | None = None
        self.interrupts = 0
        #: Called once the command is over (the pool takes its connections back).
        self.on_close: list[Callable[[Request], None]] = []
        self._done = False
        self._closed = False
        self._lock = threading.Lock()
        self._fd_lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

    def interrupt(self) -> bool:
        """Raise KeyboardInterrupt in the request's thread (Ctrl-C on the client)."""
        with self._lock:
            if self._done or self.thread is None:
                return False
            self.interrupts += 1
            _SET_ASYNC(self.thread, KeyboardInterrupt)
            return True

    def detach(self) -> None:
        """The client is gone: point its descriptors at /dev/null.

        Whoever reads the client's pipes (``mento-fab ... | tee``) sees EOF now, not
        when the command has ended; what the command still writes is dropped.
        ``dup2`` keeps the descriptor numbers valid for threads writing meanwhile.
        """
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            with self._fd_lock:  # once closed, the numbers may belong to another call
                if self._closed:
                    return
                for fd in self.fds.values():
                    with contextlib.suppress(OSError):
                        os.dup2(null, fd, inheritable=False)
        finally:
            os.close(null)

    def finish(self) -> None:
        """No more interrupts from here on; one already pending is dropped.

        Runs in the request's thread. An interrupt that lands while this runs is
        caught and the step repeated: after ``_done`` is set none can follow.
        """
        while True:
            try:
                with self._lock:
                    self._done = True
                    drain = self.interrupts > 0 and self.thread == threading.get_ident()
                if drain:  # replace a pending interrupt by _Drained and take it here
                    try:
                        _SET_ASYNC(self.thread, _Drained)
                        for _ in range(3):
                            _step()
                    except _Drained:
                        pass
                return
            except (KeyboardInterrupt, _Drained):
                continue

    def close(self) -> int | None:
        """Flush and close the client's streams, then run ``on_close``.

        Returns 120 when stdout could not be flushed (as Python exits then).
        """
        status = None
        for stream in (self.stdout, self.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                if stream is self.stdout:
                    status = 120
        with self._fd_lock:
            self._closed = True
            for stream in (self.stdin, self.stdout, self.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.close()
        for callback in self.on_close:
            callback(self)
        return status


def current() -> Request | None:
    """The request the calling thread works for (None outside any, or once it closed)."""
    stack = getattr(_local, "stack", None)
    if stack and not stack[-1].closed:
        return stack[-1]
    return None


@contextlib.contextmanager
def bind(request: Request) -> Iterator[Request]:
    """Let the calling thread work for ``request`` (nestable)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(request)
    try:
        yield request
    finally:
        stack.pop()


@contextlib.contextmanager
def interruptible(request: Request) -> Iterator[None]:
    """Mark the calling thread as the request's main thread: Ctrl-C lands here."""
    request.thread = threading.get_ident()
    _local.interruptible = True
    try:
        yield
    finally:
        _local.interruptible = False


class StreamProxy:
    """``sys.stdout``/``sys.stderr``/``sys.stdin`` of the agent: the current request's stream."""

    def __init__(self, name: str, default: TextIO) -> None:
        self._name = name
        self._default = default

    def _target(self) -> TextIO:
        request = current()
        return getattr(request, self._name) if request is not None else self._default

    def write(self, text: str) -> int:
        target = self._target()
        try:
            return target.write(text)
        except ValueError:  # the request closed its streams meanwhile (a straggling thread)
            if target is self._default:
                raise
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(ValueError):
            self._target().flush()

    def fileno(self) -> int:
        return self._target().fileno()

    def isatty(self) -> bool:
        try:
            return self._target().isatty()
        except ValueError:
            return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)


def _fd_of(fd: int) -> int:
    request = current()
    if request is not None and fd in request.fds:
        return request.fds[fd]
    return fd


def _interrupting() -> bool:
    return bool(getattr(_local, "interruptible", False))


_installed = False


def install() -> None:
    """Turn this process into one that can serve several requests (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    sys.stdout = StreamProxy("stdout", sys.__stdout__)  # type: ignore[assignment]
    sys.stderr = StreamProxy("stderr", sys.__stderr__)  # type: ignore[assignment]
    sys.stdin = StreamProxy("stdin", sys.__stdin__)  # type: ignore[assignment]
    _carry_binding()
    _slice_waits()
    _map_terminal_queries()


def _carry_binding() -> None:
    """Threads started, and pool work submitted, by a request's thread work for it too."""
    start = threading.Thread.start
    submit = ThreadPoolExecutor.submit

    def bound_start(self: threading.Thread) -> None:
        request = current()
        if request is not None:
            run = self.run

            def run_for_request() -> None:
                with bind(request):
                    run()

            self.run = run_for_request  # type: ignore[method-assign]
        start(self)

    def bound_submit(self: ThreadPoolExecutor, fn: Callable[..., Any], /, *args: Any, **kw: Any):
        request = current()
        if request is not None:
            work = fn

            def fn(*a: Any, **k: Any) -> Any:
                with bind(request):
                    return work(*a, **k)

        return submit(self, fn, *args, **kw)

    threading.Thread.start = bound_start  # type: ignore[method-assign]
    ThreadPoolExecutor.submit = bound_submit  # type: ignore[method-assign]


def _slice_waits() -> None:
    """Long waits in a request's main thread return every SLICE so Ctrl-C gets through."""
    wait = threading.Condition.wait
    sleep = time.sleep
    select_ = select.select

    def sliced_wait(self: threading.Condition, timeout: float | None = None) -> bool:
        if not _interrupting() or (timeout is not None and timeout <= SLICE):
            return wait(self, timeout)
        # Condition.wait itself, with its one waiter lock taken in slices: a notify that
        # lands between two slices releases that lock and is seen by the next slice
        # (a new Condition.wait per slice would drop it with the timed-out waiter).
        if not self._is_owned():  # type: ignore[attr-defined]
            raise RuntimeError("cannot wait on un-acquired lock")
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = _thread.allocate_lock()
        waiter.acquire()
        self._waiters.append(waiter)  # type: ignore[attr-defined]
        saved = self._release_save()  # type: ignore[attr-defined]
        notified = False
        try:  # a KeyboardInterrupt lands between slices, at the latest after one SLICE
            while not notified:
                step = SLICE if deadline is None else min(SLICE, deadline - time.monotonic())
                if step <= 0:
                    break
                notified = waiter.acquire(True, step)
            return notified
        finally:
            self._acquire_restore(saved)  # type: ignore[attr-defined]
            if not notified:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)  # type: ignore[attr-defined]

    def sliced_sleep(seconds: float) -> None:
        if not _interrupting() or seconds <= SLICE:
            return sleep(seconds)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            sleep(min(left, SLICE))
        return None

    def sliced_select(r: Any, w: Any, x: Any, timeout: float | None = None) -> Any:
        if not _interrupting() or (timeout is not None and timeout <= SLICE):
            return select_(r, w, x, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = SLICE if deadline is None else max(0.0, min(SLICE, deadline - time.monotonic()))
            ready = select_(r, w, x, step)
            if any(ready) or step < SLICE:
                return ready

    threading.Condition.wait = sliced_wait  # type: ignore[method-assign]
    time.sleep = sliced_sleep
    select.select = sliced_select


def _map_terminal_queries() -> None:
    """fds 0-2 of the agent are /dev/null and its log: ask the request's descriptors."""
    get_terminal_size = os.get_terminal_size
    isatty = os.isatty

    def request_terminal_size(fd: int = 1) -> os.terminal_size:
        return get_terminal_size(_fd_of(fd))

    def request_isatty(fd: int) -> bool:
        return isatty(_fd_of(fd))

    os.get_terminal_size = request_terminal_size
    os.isatty = request_isatty
