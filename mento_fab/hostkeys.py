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

import logging
import os
import threading
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path

import paramiko

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
        self._tables = [paramiko.HostKeys(), paramiko.HostKeys()]  # user's, system's
        for table, files in ((self._tables[0], [self.path]), (self._tables[1], system_files)):
            for file in map(Path, files):
                if not file.is_file():
                    continue
                try:
                    table.load(str(file))
                except (OSError, paramiko.SSHException) as exc:
                    log.warning("%s: could not read known hosts: %s", file, exc)

    def lookup(self, names: Iterable[str]) -> dict[str, list[paramiko.PKey]]:
        """Every known key of each key type recorded for any of ``names``."""
        found: dict[str, list[paramiko.PKey]] = {}
        with self._lock:
            for table in self._tables:
                for name in names:
                    entry = table.lookup(name)
                    for keytype in entry or ():
                        found.setdefault(keytype, []).append(entry[keytype])
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
            for name in names:
                self._tables[0].add(name, key.get_name(), key)


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


