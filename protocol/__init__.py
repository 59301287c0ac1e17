"""fleetpush.protocol: the sans-IO wire protocol and trust rules.

No sockets, files, clocks or randomness live here (specs/PROTOCOL.md §1):
bytes in, events out, bytes to send; time is passed in.
"""

# Imported for its effect too: it adds get_peers/report_peer to METHODS (§7.11).
from . import p2p as p2p
from . import p2p_view as p2p_view  # adds p2p_view (§7.11)
from .auth import auth_payload, sign_challenge, verify_challenge
from .connection import Connection
from .errors import (
    BadPath,
    BadSignature,
    CloseCode,
    ConnectionTimeout,
    DecodeError,
    ErrorCode,
    ExpiredManifest,
    FleetpushError,
    FrameError,
    FrameTooLarge,
    IntegrityError,
    LocalProtocolError,
    ManifestError,
    MinVersionNotMet,
    ProtocolError,
    RemoteProtocolError,
    RollbackRefused,
    RpcError,
    ThresholdNotMet,
    TrustError,
    UnknownKey,
    VersionError,
    VersionMismatch,
    WrongApp,
)
from .events import (
    NEED_DATA,
    ChunkReceived,
    ConnectionClosed,
    ConnectionEvent,
    ErrorReceived,
    NotificationReceived,
    RequestReceived,
    ResponseReceived,
)
from .frames import PROTOCOL_VERSION, DataFrame, FrameDecoder, MessageFrame
from .hashing import available_algorithms, new_hasher
from .manifest import FileEntry, Manifest, PythonEnv, sign_manifest
from .messages import METHODS
from .state import Side, State
from .trust import TrustRoot, VerifiedManifest, verify_manifest
from .versions import canonical_version, parse_version

__all__ = [
    "METHODS",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "BadPath",
    "BadSignature",
    "ChunkReceived",
    "CloseCode",
    "Connection",
    "ConnectionClosed",
    "ConnectionEvent",
    "ConnectionTimeout",
    "DataFrame",
    "DecodeError",
    "ErrorCode",
    "ErrorReceived",
    "ExpiredManifest",
    "FileEntry",
    "FleetpushError",
    "FrameDecoder",
    "FrameError",
    "FrameTooLarge",
    "IntegrityError",
    "LocalProtocolError",
    "Manifest",
    "ManifestError",
    "MessageFrame",
    "MinVersionNotMet",
    "NotificationReceived",
    "ProtocolError",
    "PythonEnv",
    "RemoteProtocolError",
    "RequestReceived",
    "ResponseReceived",
    "RollbackRefused",
    "RpcError",
    "Side",
    "State",
    "ThresholdNotMet",
    "TrustError",
    "TrustRoot",
    "UnknownKey",
    "VerifiedManifest",
    "VersionError",
    "VersionMismatch",
    "WrongApp",
    "auth_payload",
    "available_algorithms",
    "canonical_version",
    "new_hasher",
    "parse_version",
    "sign_challenge",
    "sign_manifest",
    "verify_challenge",
    "verify_manifest",
]
