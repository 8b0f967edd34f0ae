"""marshmallow schemas: the only place that validates a metadata file.

Declarative on purpose: every rule a facility metadata file must meet (README,
"Library"; docs/compatibility.md lists where they differ from the original
``mento``) is a field, a validator or a hook below, and every violation comes back as data (the
marshmallow error dict) before anything can reach a command line. Names that
end up in ssh or shell commands (nodes, the account, ids) are checked here,
once, so no later layer has to guess whether they are safe; a control
character in a value the objects hold is refused here too. The validated plain
data becomes objects through :func:`mento_fab.beamtime.from_dict`, the same
constructor the metadata cache uses.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    post_load,
    pre_load,
    validate,
    validates_schema,
)
from marshmallow.experimental.context import Context

from mento_fab.beamtime import BeamtimeMetadata, from_dict
from mento_fab.errors import BadInput, MetadataError
from mento_fab.names import BEAMLINE_RE, CONTROL_RE, HOSTNAME_RE, IDENTIFIER_RE, USERNAME_RE

__all__ = ["BeamtimeMetadataSchema", "Files", "flatten_errors", "load_document"]

log = logging.getLogger(__name__)

#: The files a document names: ``(key path, absolute path, required)``. A required file
#: is one the objects hold (the key, the token files); the others only have their form checked.
Files = list[tuple[str, str, bool]]

#: Keys of older files and the names they have now.
LEGACY_KEYS = {
    "core-path": "corePath",
    "event-start": "eventStart",
    "event-end": "eventEnd",
    "beamline_alias": "beamlineAlias",
}


@dataclass
class LoadContext:
    """Per-load state: where relative ``*Path`` values start, and which files they named."""

    base: Path
    files: Files = field(default_factory=list)


#: marshmallow 4 replaced ``Schema.context`` with context variables.
LoadingFile = Context[LoadContext]


def _shown(value: object, limit: int = 40) -> str:
    """A bounded, escaped rendering of a bad value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Identifier(fields.Field):
    """A string id; hand-made files write ids as JSON numbers, the objects hold strings."""

    default_error_messages = {
        "invalid": "Not a valid id (letters, digits, '_', '.', ':', '+', '-'): {shown}.",
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise self.make_error("invalid", shown=_shown(value))
        text = str(value)
        if not IDENTIFIER_RE.match(text):
            raise self.make_error("invalid", shown=_shown(value))
        return text


class HostName(fields.String):
    """A reserved node's host name, validated before it can reach a connection."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not HOSTNAME_RE.match(text):
            raise ValidationError(f"Not a valid host name: {_shown(text)}.")
        return text


class SessionFile(fields.String):
    """A ``*Path`` value: relative to the metadata file's directory, held as an absolute path.

    ``must_exist=False`` for a file the objects do not hold (the public key, the
    legacy token path): its form is checked, its absence is no error.
    """

    def __init__(self, *, must_exist: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.must_exist = must_exist

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not text or CONTROL_RE.search(text):  # NUL, or a newline that would split a message
            raise ValidationError("Not a valid file path.")
        context = LoadingFile.get()
        resolved = str(context.base / text)
        if CONTROL_RE.search(resolved):
            raise ValidationError(
                "Not a valid file path: the session directory's path holds a control character."
            )
        section = getattr(self.parent, "section", "")
        key = f"{section}.{self.data_key or attr}".lstrip(".")
        context.files.append((key, resolved, self.must_exist))
        return resolved


class _Schema(Schema):
    class Meta:
        # Other facilities' tools add keys over the years: accept and ignore them.
        unknown = EXCLUDE

    @pre_load
    def none_string_is_unset(self, data: Any, **kwargs: Any) -> Any:
        # The facility's files write the string "None" for "not set", like null (or absent).
        if isinstance(data, dict):
            return {k: None if v == "None" else v for k, v in data.items()}
        return data


class OnlineAnalysisSchema(_Schema):
    section = "onlineAnalysis"

    nodes = fields.List(
        HostName(), data_key="reservedNodes", required=True, validate=validate.Length(min=1)
    )
    partition = Identifier(data_key="slurmPartition", required=True)
    reservation = Identifier(data_key="slurmReservation", required=True)
    user = fields.String(
        data_key="userAccount",
        required=True,
        validate=validate.Regexp(USERNAME_RE, error="Not a valid POSIX user name."),
    )
    key = SessionFile(data_key="sshPrivateKeyPath", required=True)
    # Held by no object: validated for form only, never required to exist.
    public_key = SessionFile(data_key="sshPublicKeyPath", load_default=None, must_exist=False)
    legacy_asapo_token = SessionFile(
        data_key="asapoBeamtimeTokenPath", load_default=None, must_exist=False
    )

    @post_load
    def make_online(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        # blfs_mountpoint depends on the beamline: the parent schema fills it in.
        return {
            "ssh": {"user": data["user"], "key": data["key"]},
            "slurm": {"partition": data["partition"], "reservation": data["reservation"]},
            "nodes": list(data["nodes"]),
            "blfs_mountpoint": None,
        }


class AsapoSchema(_Schema):
    section = "asapo"

    endpoint = fields.String(required=True, validate=validate.Length(min=1))
    token_rw = SessionFile(data_key="beamtimeTokenPath", required=True)
    token_ro = SessionFile(data_key="beamtimeClbtTokenPath", required=True)

    @post_load
    def make_asapo(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {k: data[k] for k in ("endpoint", "token_ro", "token_rw")}


class BeamtimeMetadataSchema(_Schema):
    """A user beamtime (``beamtimeId``) or commissioning (``id``) metadata file."""

    beamline = fields.String(
        required=True, validate=validate.Regexp(BEAMLINE_RE, error="Not a valid beamline name.")
    )
    beamtime_id = Identifier(data_key="beamtimeId", load_default=None)
    commissioning_id = Identifier(data_key="id", load_default=None)
    corefs_path = fields.String(data_key="corePath", required=True, validate=validate.Length(min=1))
    online = fields.Nested(
        OnlineAnalysisSchema, data_key="onlineAnalysis", allow_none=True, load_default=None
    )
    asapo = fields.Nested(AsapoSchema, allow_none=True, load_default=None)

    @pre_load
    def rename_legacy_keys(self, data: Any, **kwargs: Any) -> Any:
        if isinstance(data, dict):
            for old, new in LEGACY_KEYS.items():
                if old in data and new not in data:
                    data = {**data, new: data[old]}
        return data

    @validates_schema
    def check_session_id(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("beamtime_id") is not None:
            return
        commissioning = data.get("commissioning_id")
        if commissioning is None:
            raise ValidationError(
                "Missing data: neither 'beamtimeId' (user beamtime) nor 'id' (commissioning).",
                "beamtimeId",
            )
        if not commissioning.startswith("c"):
            raise ValidationError("A commissioning id starts with 'c'.", "id")

    @post_load
    def make_metadata(self, data: dict[str, Any], **kwargs: Any) -> BeamtimeMetadata:
        beamline = data["beamline"]
        online: dict[str, Any] | None = data["online"]
        if online is not None:
            # A fixed rule of the facility, not a key: commissioning files write "P04".
            online["blfs_mountpoint"] = f"/beamline/{beamline.lower()}"
        if data["beamtime_id"] is not None:
            beamtime, tag = data["beamtime_id"], "current"
        else:
            beamtime, tag = data["commissioning_id"], "commissioning"
        plain = {
            "beamline": beamline,
            "beamtime": beamtime,
            "corefs_path": data["corefs_path"],
            "tag": tag,
            "online": online,
            "asapo": data["asapo"],
        }
        try:
            return from_dict(plain)  # the one constructor, shared with the metadata cache
        except BadInput as exc:  # the rules here and there disagree: say so, as data
            raise ValidationError(str(exc)) from None


def flatten_errors(messages: Any, prefix: str = "") -> list[tuple[str, str]]:
    """marshmallow's nested error dict as ``(key path, message)`` pairs.

    ``{"onlineAnalysis": {"reservedNodes": {1: [...]}}}`` becomes
    ``onlineAnalysis.reservedNodes[1]``.
    """
    if isinstance(messages, dict):
        pairs: list[tuple[str, str]] = []
        for key, value in messages.items():
            if isinstance(key, int):
                path = f"{prefix}[{key}]"
            elif key == "_schema":
                path = prefix
            else:
                path = f"{prefix}.{key}" if prefix else str(key)
            pairs.extend(flatten_errors(value, path))
        return pairs
    if isinstance(messages, list | tuple):
        return [pair for item in messages for pair in flatten_errors(item, prefix)]
    return [(prefix or "(top level)", str(messages))]


def _decode(path: Path, raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MetadataError(
            path, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MetadataError(
            path, f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except (ValueError, RecursionError) as exc:  # e.g. a 5000-digit number, absurd nesting
        raise MetadataError(path, f"invalid JSON: {type(exc).__name__}") from None


def _any_control(value: Any, path: tuple[str | int, ...]) -> dict[Any, Any]:
    """Every string in a held value (and its keys) holding a control character."""
    if isinstance(value, str):
        return {path: ["Control character in a text value."]} if CONTROL_RE.search(value) else {}
    found: dict[Any, Any] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if CONTROL_RE.search(key):
                found[(*path, "_schema")] = [f"Control character in a key: {_shown(key)}."]
            else:
                found.update(_any_control(item, (*path, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.update(_any_control(item, (*path, index)))
    return found


def control_characters(
    value: Any, path: tuple[str | int, ...] = (), schema: Schema | None = None
) -> dict[Any, Any]:
    """Control characters in the values the objects hold, and in the keys beside them.

    An escape in a held value (``corePath``, ``asapo.endpoint``…) would reach a
    terminal, a log or a command line raw: refused. Free text the objects never
    hold (``title``, a multi-line ``beamlineSetup``) is ignored, as the original
    ignores it: refusing it blocked whole beamtimes. Returned in the shape of
    marshmallow's error dict, so it merges with the schema's errors.
    """
    schema = schema or BeamtimeMetadataSchema()
    if not isinstance(value, dict):
        return {}
    held = {field.data_key or name: field for name, field in schema.fields.items()}
    held.update({old: held[new] for old, new in LEGACY_KEYS.items() if new in held})
    found: dict[Any, Any] = {}
    for key, item in value.items():
        if CONTROL_RE.search(key):
            found[(*path, "_schema")] = [f"Control character in a key: {_shown(key)}."]
        elif key not in held:
            continue  # never held, never shown
        elif isinstance(held[key], fields.Nested):
            found.update(control_characters(item, (*path, key), held[key].schema))
        else:
            found.update(_any_control(item, (*path, key)))
    return found


def _nest(flat: dict[tuple[str | int, ...], list[str]]) -> dict[Any, Any]:
    """``{("a", 0): [msg]}`` as marshmallow nests it: ``{"a": {0: [msg]}}``."""
    nested: dict[Any, Any] = {}
    for path, messages in flat.items():
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node.setdefault(path[-1], []).extend(messages)
    return nested


def _merge(into: dict[Any, Any], more: dict[Any, Any]) -> dict[Any, Any]:
    for key, value in more.items():
        mine = into.get(key)
        if mine is None:
            into[key] = value
        elif isinstance(mine, dict) and isinstance(value, dict):
            _merge(mine, value)
        elif isinstance(mine, list) and isinstance(value, list):
            mine.extend(value)
    return into


def _problems(path: Path, messages: dict[Any, Any]) -> MetadataError:
    text = "; ".join(f"{key}: {msg.rstrip('.')}" for key, msg in flatten_errors(messages))
    return MetadataError(path, text, messages)


def load_document(path: Path, raw: bytes) -> tuple[BeamtimeMetadata, Files]:
    """Validate the bytes of one metadata file and load them.

    Returns the object and the files the document names (:data:`Files`); whether
    those files exist is checked by the caller, after validation.
    """
    document = _decode(path, raw)
    if not isinstance(document, dict):
        kind = {list: "an array", str: "a string", type(None): "null"}.get(
            type(document), type(document).__name__
        )
        raise MetadataError(path, f"the top level must be a JSON object, not {kind}")
    context = LoadContext(base=path.resolve().parent)
    schema = BeamtimeMetadataSchema()
    with LoadingFile(context):
        controls = control_characters(document)
        if controls:  # report them with whatever else is wrong, before building anything
            raise _problems(path, _merge(schema.validate(document), _nest(controls)))
        try:
            md: BeamtimeMetadata = schema.load(document)
        except ValidationError as exc:
            raise _problems(path, exc.messages) from None  # type: ignore[arg-type]
    online_raw = document.get("onlineAnalysis")
    if md.asapo is None and isinstance(online_raw, dict) and "asapoBeamtimeTokenPath" in online_raw:
        log.info("%s: pre-2021 onlineAnalysis.asapoBeamtimeTokenPath ignored", path)
    return md, context.files
