"""Host keys: the known_hosts files and the policy for unknown and changed keys.

OpenSSH's rules, applied in one place for every connection (nodes and ProxyJump
hops): a key found under the node's alias or address is accepted; a host that has
any known key but presents none of them has a *changed* key, whatever the key
type, and is always refused with a message saying what to check; a host with no
known key is recorded (``accept-new``), refused (``strict``) or trusted with a
loud warning (``off``). fabric's default would silently auto-add every key, and
paramiko's own check compares keys of the same type only.

The transport (:func:`mento_fab.connection.transport_factory`) asks the server for
the key types already known for the host first, so a host that still has its
recorded key proves it with that one.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path

import paramiko
from paramiko.hostkeys import HostKeyEntry

from mento_fab.errors import HostKeyRefused

__all__ = ["SYSTEM_KNOWN_HOSTS", "HostKeyPolicy", "KnownHosts", "PolicyForNode"]

log = logging.getLogger("mento_fab.hostkeys")


class HostKeyPolicy(StrEnum):
    """What to do with host keys, in the words of OpenSSH's StrictHostKeyChecking."""

    ACCEPT_NEW = "accept-new"  # record unknown keys, refuse changed ones
    STRICT = "strict"  # refuse unknown and changed keys
    OFF = "off"  # accept anything (warns loudly)


#: Where clusters publish their nodes' keys (OpenSSH's GlobalKnownHostsFile default).
SYSTEM_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")


class KnownHosts:
    """The user's known_hosts file plus the system-wide ones, parsed once per group.

    New keys are appended to the user's file under a lock, like OpenSSH does:
    paramiko's ``save_host_keys`` rewrites the whole file from one client's
    memory, and with 32 clients in threads that loses lines. The system files
    (where admins publish node keys) are only read.
    """

    def __init__(
        self, path: str | os.PathLike[str], system_files: Iterable[str] = SYSTEM_KNOWN_HOSTS
    ) -> None:
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        # Entries of the user's file, then the system's: every line counts, even several
        # keys of one type for one host (paramiko.HostKeys keeps one per type).
        self._entries: list[HostKeyEntry] = _read(self.path)
        for file in system_files:
            self._entries += _read(Path(file))

    def lookup(self, names: Iterable[str]) -> dict[str, list[paramiko.PKey]]:
        """Every known key of each key type recorded for any of ``names``."""
        names = list(names)
        found: dict[str, list[paramiko.PKey]] = {}
        with self._lock:
            for entry in self._entries:
                if any(_matches(pattern, name) for pattern in entry.hostnames for name in names):
                    found.setdefault(entry.key.get_name(), []).append(entry.key)
        return found

    def add(self, names: list[str], key: paramiko.PKey) -> None:
        line = f"{','.join(names)} {key.get_name()} {key.get_base64()}\n"
        with self._lock:
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                with open(self.path, "a", encoding="ascii") as handle:
                    handle.write(line)
            except OSError as exc:
                raise HostKeyRefused(
                    f"cannot record the host key of {names[0]} in {self.path}: "
                    f"{exc.strerror or exc}"
                ) from None
            self._entries.append(HostKeyEntry(list(names), key))


def _read(file: Path) -> list[HostKeyEntry]:
    """The entries of one known_hosts file, skipping bad lines as OpenSSH does.

    paramiko's ``HostKeys.load`` lets ``InvalidHostKey`` (bad base64) escape and stops
    there, so one mangled line made every command fail and hid the lines after it
    (a changed key listed later would have looked unknown, and been recorded).
    """
    if not file.is_file():
        return []
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        log.warning("%s: could not read known hosts: %s", file, exc.strerror or exc)
        return []
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):  # @cert-authority, @revoked: not supported, as in paramiko
            log.debug("%s:%d: skipping a %s line", file, lineno, line.split()[0])
            continue
        try:
            entry = HostKeyEntry.from_line(line, lineno)
        # A key blob is untrusted input: base64 (InvalidHostKey), then the key's own
        # parser (SSHException, ValueError, struct errors...): any failure skips the line.
        except Exception as exc:
            log.warning(
                "%s:%d: skipping a bad known_hosts line (%s)", file, lineno, type(exc).__name__
            )
            continue
        if entry is None:
            if len(line.split()) < 3:
                log.warning("%s:%d: skipping a bad known_hosts line (too few fields)", file, lineno)
            else:  # a key type paramiko cannot use (e.g. sk-ssh-ed25519): OpenSSH's business
                log.debug("%s:%d: skipping a key type paramiko cannot use", file, lineno)
            continue
        entries.append(entry)
    return entries


def _matches(pattern: str, name: str) -> bool:
    """Whether a known_hosts host field names ``name`` (plainly or hashed, ``|1|salt|hash``)."""
    if pattern.startswith("|1|"):
        return hmac.compare_digest(paramiko.HostKeys.hash_host(name, pattern), pattern)
    return pattern == name


def _fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


class PolicyForNode(paramiko.MissingHostKeyPolicy):
    """Checks a node's host key against known_hosts under its alias and its address.

    No keys are loaded into the paramiko client, so paramiko always asks here and
    the decision (including "changed") is made in one place.
    """

    def __init__(self, policy: HostKeyPolicy, known: KnownHosts, alias: str) -> None:
        self.policy = policy
        self.known = known
        self.alias = alias

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        names = list(dict.fromkeys([self.alias, hostname]))
        if self.policy is HostKeyPolicy.OFF:
            log.warning(
                "host key checking is OFF: %s presented %s and was trusted blindly",
                self.alias,
                _fingerprint(key),
            )
            return
        known = self.known.lookup(names)
        if known:
            # As OpenSSH: a host with any known key must present one of them. paramiko
            # compares per key type only, which accepted a new key of another type.
            if any(key in keys for keys in known.values()):
                return
            fingerprints = (_fingerprint(k) for keys in known.values() for k in keys)
            recorded = ", ".join(dict.fromkeys(fingerprints))
            raise HostKeyRefused(
                f"host key of {self.alias} CHANGED: it presents {_fingerprint(key)}, "
                f"known_hosts has {recorded}. If the node was reinstalled, "
                f"check with the cluster admins and remove the old key "
                f"(ssh-keygen -R {self.alias} -f {self.known.path}); otherwise someone may be "
                "intercepting the connection."
            )
        if self.policy is HostKeyPolicy.STRICT:
            raise HostKeyRefused(
                f"unknown host key of {self.alias} ({_fingerprint(key)}) and host keys are "
                f"strict: add it to {self.known.path} or use the accept-new policy"
            )
        log.info(
            "recording new host key of %s (%s) in %s",
            self.alias,
            _fingerprint(key),
            self.known.path,
        )
        self.known.add(names, key)
