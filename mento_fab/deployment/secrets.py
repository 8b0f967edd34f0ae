"""What a deploy must never ship: the beamtime's private key and ASAPO tokens.

Run from the session directory, ``shared/id_rsa`` would be in the tree; a token
pasted into ``config.yaml`` or a key saved with CRLF line endings is the same
secret in other bytes. A source is refused when a file *is* a secret file (same
real path), has a secret file's exact content, or *contains* a token value or the
key's base64 body anywhere, whitespace and line endings ignored, written out or
escaped (``\\n``, ``\\r\\n``, ``\\\\n`` as a key inside a JSON or YAML string has
them). Messages name the file and which secret it holds, never the secret.

Secrets are read here only to compare them in memory: nothing derived from their
contents is written anywhere. The digest cache remembers, per file, that it was
checked clean against a set of secret files identified by path and ``stat`` only.

>>> scan = SecretScan({}, [(b"TOKENVALUE123", "an ASAPO token (t.txt)")])
>>> scan.find(b"url: x\\nkey: TOKEN\\r\\nVALUE123 # pasted\\n")
'an ASAPO token (t.txt)'
>>> scan.find(rb'{"token": "TOKEN\\r\\nVALUE\\\\n123"}')
'an ASAPO token (t.txt)'
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mento_fab.errors import UnsafeSourceError
from mento_fab.metadata import BeamtimeMetadata

if TYPE_CHECKING:
    from mento_fab.deployment.digests import DigestCache
    from mento_fab.deployment.scan import Entry, Release

__all__ = ["MIN_SECRET", "SecretScan", "refuse_secrets", "secret_files"]

#: Shorter token values are not searched for inside files: they would match by chance.
MIN_SECRET = 8
_WHITESPACE = b" \t\r\n\v\f"
#: Line breaks and tabs written as escapes, however often escaped (``\\n``, ``\\\\r``),
#: and an escaped slash (JSON may write base64's ``/`` as ``\\/``): neither a key's
#: base64 body nor a token holds a backslash, so dropping these never hides one.
_ESCAPES = re.compile(rb"\\+[nrtvf]|\\+(?=/)")
_PEM_LINE = re.compile(rb"^-----(BEGIN|END) [A-Z0-9 ]+-----$")
_READ = 1 << 20


def secret_files(md: BeamtimeMetadata) -> dict[str, str]:
    """The beamtime's secret files (real path -> what it is), from the metadata."""
    named: list[tuple[str, str]] = []
    if md.online is not None:
        named.append((md.online.ssh.key, "the SSH private key"))
    if md.asapo is not None:
        named += [(md.asapo.token_ro, "an ASAPO token"), (md.asapo.token_rw, "an ASAPO token")]
    return {os.path.realpath(path): what for path, what in named if path}


def _flatten(data: bytes) -> bytes:
    """``data`` without whitespace and escaped line breaks: what secrets are sought in."""
    return _ESCAPES.sub(b"", data).translate(None, _WHITESPACE)


def _key_body(data: bytes) -> bytes:
    """The base64 body of a PEM-style key (headers and frame lines left out)."""
    lines = [line.strip() for line in data.splitlines()]
    if not any(_PEM_LINE.match(line) for line in lines):
        return _flatten(data)
    body = [ln for ln in lines if ln and not _PEM_LINE.match(ln) and b":" not in ln]
    return _flatten(b"".join(body))


class SecretScan:
    """The secrets of one beamtime, ready to be looked for in a source tree.

    ``files`` maps real paths of secret files to what they are; ``needles`` are
    ``(value without whitespace, what it is)`` pairs looked for inside files.
    """

    def __init__(
        self,
        files: dict[str, str],
        needles: Iterable[tuple[bytes, str]] = (),
        digests: dict[str, str] | None = None,
        identity: str = "",
        sizes: set[int] | None = None,
    ) -> None:
        self.files = files
        self.needles = [(n, what) for n, what in needles if len(n) >= MIN_SECRET]
        #: sha256 of each readable secret file -> what it is (kept in memory only).
        self.digests = digests or {}
        #: Sizes of the secret files; None when one could not be read (check every path).
        self.sizes: set[int] | None = sizes if sizes is not None or files else set()
        #: Which secret files this scan is about, by path and stat (never by content).
        self.identity = identity or hashlib.sha256(repr(sorted(files)).encode()).hexdigest()
        self._overlap = max((len(n) for n, _ in self.needles), default=1) - 1

    @classmethod
    def for_metadata(cls, md: BeamtimeMetadata) -> SecretScan:
        files = secret_files(md)
        needles: list[tuple[bytes, str]] = []
        digests: dict[str, str] = {}
        sizes: set[int] | None = set()
        ident = []
        for path, what in sorted(files.items()):
            label = f"{what} ({path})"
            try:
                with open(path, "rb") as handle:
                    st = os.fstat(handle.fileno())
                    data = handle.read()
            except OSError:
                ident.append(f"{path}:unreadable")  # the path comparison still applies
                sizes = None
                continue
            if sizes is not None:
                sizes.add(len(data))
            ident.append(f"{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}")
            if data:  # an empty secret file would match every empty file
                digests.setdefault(hashlib.sha256(data).hexdigest(), label)
            body = _key_body(data) if "key" in what else _flatten(data)
            needles.append((body, label))
        identity = hashlib.sha256("\n".join(ident).encode()).hexdigest()
        return cls(files, needles, digests, identity, sizes)

    def find(self, data: bytes) -> str | None:
        """What secret ``data`` contains (whitespace and escaped line breaks ignored), or None."""
        flat = _flatten(data)
        return next((what for needle, what in self.needles if needle in flat), None)

    def find_in_file(self, path: str) -> str | None:
        """:meth:`find` over a file of any size, read in pieces (a needle may span two)."""
        if not self.needles:
            return None
        tail = carry = b""
        with open(path, "rb") as handle:
            while chunk := handle.read(_READ):
                # Backslashes ending a chunk may start an escape the next chunk ends.
                raw = carry + chunk
                cut = len(raw.rstrip(b"\\"))
                raw, carry = raw[:cut], raw[cut:][-64:]
                flat = tail + _flatten(raw)
                found = next((what for needle, what in self.needles if needle in flat), None)
                if found:
                    return found
                tail = flat[-self._overlap :] if self._overlap else b""
        return None

    def refusal(self, entry: Entry, *, read: bool = True) -> str | None:
        """Why ``entry`` must not be shipped (a message naming the file), or None.

        ``read=False`` skips reading the file (the cache saw it clean already).
        """
        if entry.source is None:
            return None
        # Only a file of a secret's size can be the secret itself: resolving the
        # real path of every file of a large tree costs more than hashing it.
        if self.sizes is None or entry.size in self.sizes:
            real = os.path.realpath(entry.source)
            if real in self.files:
                return (
                    f"{entry.source}: refusing to ship {self.files[real]}; exclude it or "
                    "deploy from a directory without it"
                )
        if entry.digest in self.digests:
            return (
                f"{entry.source}: same content as {self.digests[entry.digest]}; refusing to ship it"
            )
        if not read:
            return None
        try:
            found = self.find_in_file(entry.source)
        except OSError:
            return None  # unreadable now: building the archive will say so
        return f"{entry.source}: contains {found}; refusing to ship it" if found else None

    def check(self, entries: Iterable[Entry], cache: DigestCache | None = None) -> None:
        """Raise :class:`UnsafeSourceError` for the first entry holding a secret.

        Files the digest ``cache`` saw unchanged and clean under this scan's
        identity are not read again.
        """
        for entry in entries:
            if entry.source is None or entry.kind != "f":
                continue
            read = cache is None or not cache.clean(entry.path, self.identity)
            reason = self.refusal(entry, read=read)
            if reason:
                raise UnsafeSourceError(reason)
            if cache is not None:
                cache.mark_clean(entry.path, self.identity)


def refuse_secrets(release: Release, md: BeamtimeMetadata) -> None:
    """Raise :class:`UnsafeSourceError` if ``release`` would ship a secret of ``md``.

    For releases built without a scan (:func:`~mento_fab.deployment.scan.build_release`
    with ``secrets=None``); every file is read.
    """
    scan = SecretScan.for_metadata(md)
    if release.checked == scan.identity:
        return
    scan.check(release.files)
    release.checked = scan.identity
