"""The light node-side commands: POSIX ``sh`` built-ins plus at most a few small programs.

``ps`` and every ``top`` refresh run one of these per node over the open
connection; they read ``/proc`` and the state files with ``read`` (a shell
built-in, no process), so a refresh costs the node one shell and, for ``ps``,
one ``ps(1)``. Everything variable is quoted with :func:`shlex.quote`; a worker
name is checked (:func:`.spec.check_name`) before it gets here.

What they print is parsed by :func:`.spec.parse_listing` (``ps``, ``top``) or
shown as it is (``logs``).
"""

from __future__ import annotations

import shlex

from mento_fab import defaults
from mento_fab.workers.spec import check_name

__all__ = ["follow", "listing", "logs", "python", "top_loop"]

#: The node's python3 (the supervisor's interpreter); exit 127 with a message if none.
_FIND_PYTHON = (
    "P=$(command -v python3 || command -v /usr/libexec/platform-python) || "
    "{ echo 'mento-fab: no python3 on this node (the worker supervisor needs it)' >&2; "
    "exit 127; }; "
)


def _base(base: str) -> str:
    """The state directory as a shell word: ``"$HOME"/...`` for home-relative paths."""
    if base.startswith("/"):
        return shlex.quote(base.rstrip("/"))
    return '"$HOME"/' + shlex.quote(base.removeprefix("~/").rstrip("/"))


#: Lines are collected in ``$o`` and written at once: every ``echo`` to sshd's pipe
#: would become an SSH packet of its own, and each packet costs the client CPU time.
_OUT = 'o=; _o() { o="$o$1\n"; }; '
_HEAD = (
    "read -r h < /proc/sys/kernel/hostname; read -r b < /proc/sys/kernel/random/boot_id; "
    '_o "H $h $b"; '
)


def _records(base: str, name: str | None) -> str:
    """Per instance: ``R`` pids file, ``P`` the supervisor's /proc stat, ``S`` state.json."""
    pattern = check_name(name) if name else "*"
    return (
        f'for d in {_base(base)}/"$h"/{pattern}/[0-9]*; do '
        '[ -f "$d/state.json" ] || continue; '
        'p=; read -r p 2>/dev/null < "$d/pids"; _o "R $p"; set -- $p; st=; '
        '[ -n "$1" ] && read -r st 2>/dev/null < "/proc/$1/stat"; _o "P ${st##*) }"; '
        '[ -n "$4" ] && s="$s${s:+,}$4"; '
        'read -r j < "$d/state.json"; _o "S $j"; '
        "done; "
    )


def listing(base: str = defaults.WORKERS_DIR, name: str | None = None) -> str:
    """``ps``: the records of ``name`` (or all) and the CPU/memory of their sessions."""
    return (
        _OUT
        + _HEAD
        + "s=; "
        + _records(base, name)
        + '[ -n "$s" ] && _o C; printf %s "$o"; '
        + '[ -n "$s" ] && ps -o sid=,pcpu=,rss= --sid "$s" 2>/dev/null; '
        + "exit 0"
    )


def top_loop(base: str = defaults.WORKERS_DIR, target: str | None = None, *, end: str) -> str:
    """A sampling loop for ``top``: one ``sh`` per node, kept open between refreshes.

    Each line the client writes (``SLEEP DISK``) asks for one sample, answered by its
    lines and then ``end`` alone on a line, in one write: load, CPU counters (read
    twice, ``SLEEP`` seconds apart, when ``SLEEP`` is not 0), memory, free space of
    ``target`` (when ``DISK`` is 1), GPUs, workers. Built-ins only, but ``df`` and
    ``nvidia-smi``. EOF on stdin (the client closed, or its connection went) ends it.
    """
    disk = _base(target) if target else '"$HOME"'
    body = (
        "_z=$1; _d=$2; o=; "
        + _HEAD
        + 'read -r l < /proc/loadavg; _o "L $l"; n=0; '
        + "{ read -r c; while read -r k r; do case $k in cpu[0-9]*) n=$((n+1));; *) break;; "
        + 'esac; done; } < /proc/stat; _o "U $n $c"; '
        + 'if [ "$_z" != 0 ]; then sleep "$_z"; read -r c < /proc/stat; _o "V $c"; fi; '
        + 'while read -r k v u; do case $k in MemTotal:|MemAvailable:) _o "M $k $v";; '
        + "esac; done < /proc/meminfo; "
        + f'if [ "$_d" = 1 ]; then t={disk}; [ -d "$t" ] || t="$HOME"; '
        # df -P prints a header of 7 words, then filesystem, size, used, available (kB)
        + 'set -- $(df -Pk "$t" 2>/dev/null); [ $# -ge 11 ] && _o "D $9 ${10} ${11} $t"; fi; '
        + "if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi "
        + "--query-gpu=index,utilization.gpu,memory.used,memory.total "
        + "--format=csv,noheader,nounits 2>/dev/null | "
        + 'while read -r g; do echo "G $g"; done; fi; '
        + "s=; "
        + _records(base, None)
        + f"_o {shlex.quote(end)}; "
        + 'printf %s "$o"'
    )
    return f"{_OUT}_t() {{ {body}; }}; while read -r q; do _t $q; done"


def _name_dir(base: str, name: str) -> str:
    """``cd`` into the worker's directory on this node, or exit 3 (no such worker here)."""
    return (
        "read -r h < /proc/sys/kernel/hostname; "
        f'cd {_base(base)}/"$h"/{shlex.quote(check_name(name))} 2>/dev/null || exit 3; '
        "ls -d [0-9]*/log >/dev/null 2>&1 || exit 3; "
    )


def logs(
    name: str, lines: int = defaults.WORKER_LOG_LINES, base: str = defaults.WORKERS_DIR
) -> str:
    """The last ``lines`` lines of each instance's log (reaching into ``log.1``).

    With several instances on the node, each block starts with ``==> name[i] <==``.
    """
    n = int(lines)
    return (
        _name_dir(base, name)
        + "set -- $(ls -d [0-9]*/log | sort -n); "
        + 'for f do i=${f%/log}; [ $# -gt 1 ] && echo "==> '
        + shlex.quote(name)
        + '[$i] <=="; '
        + f'{{ [ -f "$i/log.1" ] && [ "$(wc -l < "$f")" -lt {n} ] && tail -n {n} "$i/log.1"; '
        + f'tail -n {n} "$f"; }} | tail -n {n}; done'
    )


def follow(
    name: str, lines: int = defaults.WORKER_LOG_LINES, base: str = defaults.WORKERS_DIR
) -> str:
    """``logs --follow``: ``tail -F`` every instance's log until the client goes away.

    The client never closes its side of stdin while following; when it does (Ctrl-C,
    a lost connection), ``read`` returns and ``kill 0`` ends the shell's whole
    process group, so no ``tail`` is left on the node (``--pid`` is the fallback if
    the shell itself is killed). Several instances: lines start with ``[i] ``.
    """
    n = int(lines)
    return (
        _name_dir(base, name)
        + "set -- $(ls -d [0-9]*/log | sort -n); "
        + f'if [ $# -eq 1 ]; then tail -n {n} -F --pid=$$ "$1" 2>/dev/null & '
        + "else for f do i=${f%/log}; "
        + f'{{ tail -n {n} -F --pid=$$ "$f" 2>/dev/null | '
        + 'while IFS= read -r x; do printf "[%s] %s\\n" "$i" "$x"; done; } & done; fi; '
        + "read -r x; kill 0"
    )


def python(bootstrap: str) -> str:
    """Run ``bootstrap`` with the node's python3 (which reads the rest from stdin)."""
    return _FIND_PYTHON + 'exec "$P" -c ' + shlex.quote(bootstrap)
