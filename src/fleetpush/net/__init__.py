"""The trio layer under the releaser and the device: framed peers, TLS, dialling.

It imports only :mod:`fleetpush.protocol` (tests/architecture guards that);
``fleetpush.server``, ``fleetpush.client`` and the front ends build on it.

- :mod:`.peer`: a :class:`~fleetpush.protocol.Connection` driven over a trio stream;
- :mod:`.tls`: TLS contexts, pinning and device certificates;
- :mod:`.dial`: addresses and the one connect-and-authenticate path.
"""

from .dial import (
    DEFAULT_PORT,
    AddressError,
    Dialed,
    DialError,
    dial,
    format_address,
    parse_address,
    single_exception,
)
from .peer import Peer, PeerClosed, TransportError, client_handshake, open_peer
from .tls import ClientTls, ServerTls, TlsError

__all__ = [
    "DEFAULT_PORT",
    "AddressError",
    "ClientTls",
    "DialError",
    "Dialed",
    "Peer",
    "PeerClosed",
    "ServerTls",
    "TlsError",
    "TransportError",
    "client_handshake",
    "dial",
    "format_address",
    "open_peer",
    "parse_address",
    "single_exception",
]
