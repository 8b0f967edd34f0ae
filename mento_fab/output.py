"""A command's output on the client: kept up to a limit, or cut into lines as it arrives.

Output is bounded by design: :class:`Capture` keeps the first ``limit`` bytes of a
stream and only counts the rest, and :class:`LineSplitter` hands complete lines to
a callback and keeps nothing once they are handed on; a line longer than ``piece``
is handed on in pieces. Both cost time linear in the bytes fed, however long a line.

>>> kept = Capture(limit=5)
>>> kept.feed(b"hello "); kept.feed(b"world")
>>> kept.text(), kept.dropped
('hello', 6)
>>> lines = []
>>> split = LineSplitter(lines.append, piece=4)
>>> split.feed(b"ab\\ncdefgh"); split.feed(b"ij\\nk"); split.close()
>>> lines
['ab', 'cdefgh', 'ij', 'k']
"""

from __future__ import annotations

import codecs
from collections.abc import Callable

from mento_fab import defaults

__all__ = ["PIECE", "Capture", "LineSplitter"]

#: Bytes of an unfinished line held before it is handed on as a piece.
PIECE = 64 * 1024


def _char_start(data: bytes | bytearray, end: int) -> int:
    """``end``, moved back so that ``data[:end]`` does not end inside a UTF-8 character."""
    start = end
    while start > 0 and end - start < 3 and (data[start] & 0xC0) == 0x80:
        start -= 1
    return start if (data[start] & 0xC0) != 0x80 else end


class Capture:
    """The first ``limit`` bytes of one stream; the rest is counted in :attr:`dropped`."""

    def __init__(self, limit: int = defaults.MAX_OUTPUT) -> None:
        if limit < 0:
            raise ValueError("the output limit cannot be negative")
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if self.dropped or len(chunk) > room:
            cut = _char_start(chunk, room) if 0 < room < len(chunk) else max(room, 0)
            self.data += chunk[:cut]
            self.dropped += len(chunk) - cut
            self.limit = len(self.data)  # full: never resume after a cut
        else:
            self.data += chunk

    def text(self) -> str:
        """What was kept, decoded (invalid UTF-8 replaced), and the buffer released."""
        text = self.data.decode("utf-8", "replace")
        self.data = bytearray()
        return text


class LineSplitter:
    """Calls ``emit`` with each line (without its newline) as soon as it is complete.

    A line that grows past ``piece`` bytes is emitted in pieces, so memory stays
    bounded and a single huge line costs linear time. UTF-8 characters are never
    split between pieces.
    """

    def __init__(self, emit: Callable[[str], None], piece: int = PIECE) -> None:
        self.emit = emit
        self.piece = piece
        self._parts: list[bytes] = []
        self._size = 0
        self._open = False  # a line has begun and not ended
        self._split = False  # ... and pieces of it were emitted already
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, chunk: bytes) -> None:
        *lines, rest = chunk.split(b"\n")
        if lines:
            first = 0
            if self._open:  # the held line ends here
                self._parts.append(lines[0])
                self._end_line()
                first = 1
            emit = self.emit
            for line in lines[first:]:
                emit(line.decode("utf-8", "replace"))
        if rest:
            self._open = True
            self._parts.append(rest)
            self._size += len(rest)
            if self._size >= self.piece:
                text = self._decoder.decode(self._take(), False)
                if text:
                    self._split = True
                    self.emit(text)

    def close(self) -> None:
        """Emit an unfinished last line."""
        if self._open:
            self._end_line()

    def _take(self) -> bytes:
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        return data

    def _end_line(self) -> None:
        text = self._decoder.decode(self._take(), True)
        self._decoder.reset()
        if text or not self._split:
            self.emit(text)
        self._open = self._split = False
