"""The connection state machine, as data (specs/PROTOCOL.md §6).

Everything that affects the handshake state and its transitions lives in this
file. Transitions are a table ``(state, sender, label) -> state``; anything not
in the table is a protocol violation: a :class:`LocalProtocolError` if we were
the sender, a :class:`RemoteProtocolError` if the peer was.

``sender`` is the side that sent the message: ``CLIENT`` (the side that
connected: a device or an operator) or ``SERVER`` (the releaser). Labels:

- ``hello``, ``auth``: the handshake requests;
- ``hello_ok``, ``auth_ok``: their successful responses;
- ``hello_err``, ``auth_err``: their error responses. They lead to REFUSED,
  where only the server's ``bye`` (carrying the close code, §5, §9.2) or the
  client's may follow;
- ``bye``: the closing notification, allowed in every state but CLOSED;
- ``message``: any other request, response, error or notification;
- ``data``: a DATA frame.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from .errors import LocalProtocolError, RemoteProtocolError


class Side(Enum):
    CLIENT = "client"
    SERVER = "server"


class State(Enum):
    AWAIT_HELLO = "await_hello"
    AWAIT_HELLO_RESULT = "await_hello_result"
    AWAIT_AUTH = "await_auth"
    AWAIT_AUTH_RESULT = "await_auth_result"
    #: the server refused hello or auth; its ``bye`` follows (§5.4).
    REFUSED = "refused"
    OPEN = "open"
    CLOSED = "closed"


C, S = Side.CLIENT, Side.SERVER

TRANSITIONS: Final[dict[tuple[State, Side, str], State]] = {
    (State.AWAIT_HELLO, C, "hello"): State.AWAIT_HELLO_RESULT,
    (State.AWAIT_HELLO_RESULT, S, "hello_ok"): State.AWAIT_AUTH,
    # A refused handshake is answered by an error *and then* bye with the close
    # code (§5.1, §5.2, §5.4): REFUSED admits nothing but that bye.
    (State.AWAIT_HELLO_RESULT, S, "hello_err"): State.REFUSED,
    (State.AWAIT_AUTH, C, "auth"): State.AWAIT_AUTH_RESULT,
    (State.AWAIT_AUTH_RESULT, S, "auth_ok"): State.OPEN,
    (State.AWAIT_AUTH_RESULT, S, "auth_err"): State.REFUSED,
    (State.OPEN, C, "message"): State.OPEN,
    (State.OPEN, S, "message"): State.OPEN,
    (State.OPEN, S, "data"): State.OPEN,
    **{(st, side, "bye"): State.CLOSED for st in State if st is not State.CLOSED for side in Side},
}


def transition(state: State, sender: Side, label: str, ours: Side) -> State:
    """Return the next state, or raise if ``label`` from ``sender`` is illegal now.

    Raises :class:`LocalProtocolError` when ``sender`` is ``ours`` and
    :class:`RemoteProtocolError` when it is the peer.
    """
    try:
        return TRANSITIONS[(state, sender, label)]
    except KeyError:
        what = f"{sender.value} may not send {label!r} in state {state.value}"
        if sender is ours:
            raise LocalProtocolError(what) from None
        raise RemoteProtocolError(what) from None
