"""What a safe name looks like: the rules every name from a metadata file must meet.

Kept apart from ``schemas`` (which imports marshmallow) so that cheap paths,
such as loading a cached result, can re-check names without that import.
"""

from __future__ import annotations

import re

__all__ = [
    "BEAMLINE_RE",
    "CONTROL_RE",
    "HOSTNAME_RE",
    "IDENTIFIER_RE",
    "USERNAME_RE",
    "printable",
]

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: RFC 1123 host name: nothing a shell, ssh (``-oX``, ``user@``) or a node set would interpret.
HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\Z")
#: Portable POSIX user name (no leading dash, at most 32 characters).
USERNAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")
#: Ids, partitions, reservations: safe in paths, job names and command lines.
IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}\Z")
#: Beamline names: PETRA III has ``P02.1``, ``P21.2``; a dot may not lead or repeat (no ``..``).
BEAMLINE_RE = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
#: Control characters (NUL, newlines, ESC, the C1 set with CSI) have no place in a path,
#: a name or a message: on a terminal they forge lines, move the cursor or clear the screen.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``), for a terminal.

    >>> printable("ok\\x1b[2J")
    'ok\\\\x1b[2J'
    """
    return CONTROL_RE.sub(lambda m: repr(m.group())[1:-1], text)
