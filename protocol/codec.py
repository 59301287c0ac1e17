"""msgpack encoding with hard limits, and typed conversion of attrs classes.

Unpacking always uses ``raw=False`` and ``strict_map_key=True``, explicit
``max_*_len`` bounds and no ext or object hooks (specs/PROTOCOL.md §3, §10).
Every msgpack exception is wrapped in :class:`DecodeError`.

``to_wire``/``from_wire`` turn frozen attrs classes into plain msgpack maps and
back, checking each field's type strictly (a bool is not an int, a str is not
bytes). Unknown keys are kept in an ``extra`` field where the class has one and
are otherwise ignored, so newer peers can add fields (§3.3).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Collection, Mapping
from itertools import repeat
from operator import itemgetter
from typing import Any, Final, TypeVar

import attrs
import msgpack

from .errors import DecodeError
from .limits import (
    MAX_ARRAY_LEN,
    MAX_BIN_LEN,
    MAX_CONTAINERS,
    MAX_MAP_LEN,
    MAX_MESSAGE_BODY,
    MAX_NESTING,
    MAX_STR_LEN,
    MAX_WIRE_INT,
)

T = TypeVar("T")


def packb(obj: object) -> bytes:
    """Encode canonically: maps with sorted keys, bin type for bytes."""
    try:
        return msgpack.packb(_sorted(obj), use_bin_type=True, datetime=False)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as e:
        raise DecodeError(f"cannot encode value: {e}") from e


def _sorted(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_sorted(v) for v in obj]
    return obj


def unpackb(
    data: bytes | memoryview,
    max_body: int = MAX_MESSAGE_BODY,
    max_containers: int = MAX_CONTAINERS,
) -> Any:
    """Decode one msgpack value under the protocol's limits.

    ``max_containers`` bounds the arrays and maps of the value, all levels
    together (the releaser passes the lower MAX_SERVER_CONTAINERS, §10).

    Raises :class:`DecodeError` for anything that is not exactly one valid,
    in-limits msgpack value without ext types.
    """
    if len(data) > max_body:
        raise DecodeError(f"body of {len(data)} bytes exceeds {max_body}")
    limits = {
        "raw": False,
        "strict_map_key": True,
        "max_str_len": MAX_STR_LEN,
        "max_bin_len": MAX_BIN_LEN,
        "max_array_len": min(MAX_ARRAY_LEN, len(data)),
        "max_map_len": min(MAX_MAP_LEN, len(data) // 2),
        "max_ext_len": 0,
    }
    try:
        # First walk the structure with skip(), which builds no objects: a
        # header bomb (containers declaring huge counts that the body cannot
        # fill) fails here without allocating (specs/PROTOCOL.md §10).
        scanner = msgpack.Unpacker(max_buffer_size=max(len(data), 1), **limits)
        scanner.feed(data)
        scanner.skip()
        if scanner.tell() != len(data):
            raise DecodeError("trailing bytes after the msgpack value")
        structure = _Structure(max_containers)
        value = msgpack.unpackb(
            data,
            use_list=True,
            ext_hook=_refuse_ext,
            list_hook=structure.array,
            object_pairs_hook=structure.map,
            **limits,
        )
    except DecodeError:
        raise
    except msgpack.OutOfData as e:
        raise DecodeError("truncated msgpack value") from e
    except msgpack.ExtraData as e:  # pragma: no cover - caught by the scan above
        raise DecodeError("trailing bytes after the msgpack value") from e
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        raise DecodeError(f"invalid msgpack: {e}") from e
    return value


class _Structure:
    """Counts and measures arrays and maps as msgpack builds them (§10).

    Refuses past MAX_CONTAINERS containers and past MAX_NESTING levels. The
    hooks run once per container, bottom-up: each container's height (1 + the
    tallest container inside it) is kept by ``id`` and looked up by its
    parent, so Python code runs per container, never per scalar. Finding the
    containers among a container's items is done by C loops (``map``), which
    is what keeps an 8 MiB body of 8 M nils at about the cost of msgpack
    itself (a per-item Python walk took 3.4 s on the event loop; issue 10,
    item 4).
    """

    def __init__(self, limit: int = MAX_CONTAINERS) -> None:
        self.limit = limit
        self.left = limit
        self._heights: dict[int, int] = {}

    def array(self, items: list[object]) -> list[object]:
        self._measure(items, items)
        return items

    def map(self, pairs: list[tuple[object, object]]) -> dict[str, object]:
        out = _strict_map(pairs)
        self._measure(out, out.values())
        return out

    def _measure(self, container: object, children: Collection[object]) -> None:
        self.left -= 1
        if self.left < 0:
            raise DecodeError(f"more than {self.limit} arrays and maps in one message")
        height = 1
        if children:
            kinds = set(map(type, children))
            # Only lists and dicts come out of this decoder (use_list=True, the
            # map hook above), so exact types are enough.
            if list in kinds or dict in kinds:
                # A container not in _heights has height 1 (only taller ones
                # are stored); a scalar's default 1 never exceeds that.
                height += max(map(self._heights.get, map(id, children), repeat(1)))
        if height > MAX_NESTING:
            raise DecodeError(f"msgpack nesting deeper than {MAX_NESTING}")
        # Every container stays alive (its parent holds it) until the decode
        # ends, so its id cannot be reused by another container meanwhile.
        if height > 1:
            self._heights[id(container)] = height


def _refuse_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def _strict_map(pairs: list[tuple[object, object]]) -> dict[str, object]:
    # Map keys are strings and unique (specs/PROTOCOL.md §3.2): strict_map_key
    # still lets bin keys through, and a duplicate key would let two decoders
    # read different values out of the same signed bytes. Checked with C loops
    # (dict(), map()) so a map of 10,000 pairs costs no per-pair Python code.
    out: dict[str, object] = dict(pairs)  # type: ignore[arg-type]
    if not pairs:
        return out
    if set(map(type, map(itemgetter(0), pairs))) != {str}:
        key = next(k for k, _ in pairs if not isinstance(k, str))
        raise DecodeError(f"map key {key!r} is not a string")
    if len(out) != len(pairs):
        seen: set[object] = set()
        for key, _ in pairs:  # the error path only: name the first duplicate
            if key in seen:
                raise DecodeError(f"duplicate map key {key!r}")
            seen.add(key)
    return out


# --- attrs <-> wire maps ---------------------------------------------------------

_hints_cache: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _hints_cache.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _hints_cache[cls] = hints
    return hints


#: attrs field metadata key: leave the field out of the encoding when it is None.
OMIT_NONE: Final = "fleetpush.omit_none"


#: Values that go on the wire as they are (most of what to_wire meets).
_PLAIN: Final = frozenset({str, int, float, bool, bytes, type(None)})
#: Per attrs class: (name, omitted when None) of each field, worked out once.
_layouts: dict[type, tuple[tuple[str, bool], ...]] = {}


def to_wire(obj: object) -> Any:
    """Turn an attrs instance (recursively) into msgpack-ready values."""
    if type(obj) in _PLAIN:
        return obj
    layout = _layouts.get(type(obj))
    if layout is None and attrs.has(type(obj)):
        # A field with init=False is derived from the others (a cache, e.g.
        # FileEntry's chunk offsets): it never goes on the wire.
        layout = tuple(
            (f.name, bool(f.metadata.get(OMIT_NONE)))
            for f in attrs.fields(type(obj))  # type: ignore[arg-type]
            if f.init
        )
        _layouts[type(obj)] = layout
    if layout is not None:
        out: dict[str, Any] = {}
        for name, omit_none in layout:
            value = getattr(obj, name)
            if name == "extra":
                for k, v in value.items():
                    out.setdefault(k, v)
                continue
            if value is None and omit_none:
                # A field added after a format was fixed is absent when unset, so
                # the canonical bytes of everything that does not use it stay
                # the same (specs/PROTOCOL.md §7.3, §7.5).
                continue
            out[name] = to_wire(value)
        return out
    if isinstance(obj, list | tuple):
        return [to_wire(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_wire(v) for k, v in obj.items()}
    return obj


def from_wire(cls: type[T], data: object, where: str = "") -> T:
    """Build ``cls`` from a decoded msgpack map, checking every field's type.

    Raises :class:`DecodeError` naming the offending field.
    """
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise DecodeError(f"{where}: expected a map, got {type(data).__name__}")
    fields, names, has_extra = _plan(cls)
    kwargs: dict[str, Any] = {}
    for name, hint, limit, required in fields:
        if name in data:
            value = data[name]
            # An over-long array is refused before its items are converted:
            # converting 100,000 (file, chunk) pairs took 0.75 s of the event
            # loop just for max_len to refuse them afterwards (issue 10, item 4;
            # found by the live fuzz campaign). Same words as attrs' max_len.
            if limit is not None and isinstance(value, list) and len(value) > limit:
                raise DecodeError(f"{where}: Length of {name!r} must be <= {limit}: {len(value)}")
            kwargs[name] = _convert(hint, value, f"{where}.{name}")
        elif required:
            raise DecodeError(f"{where}: missing field {name!r}")
    if has_extra:
        kwargs["extra"] = {k: v for k, v in data.items() if k not in names}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise DecodeError(f"{where}: {e}") from e


#: Per attrs class: (name, type hint, max_len bound, required) of each field but
#: ``extra``, the field names, and whether it keeps unknown keys in ``extra``.
#: Worked out once per class: reading attrs' fields, hints and validators for
#: every decoded object was most of what a 1,000-row page cost (issue 13).
_Plan = tuple[tuple[tuple[str, Any, int | None, bool], ...], frozenset[str], bool]
_plans: dict[type, _Plan] = {}


def _plan(cls: type) -> _Plan:
    plan = _plans.get(cls)
    if plan is None:
        hints = _hints(cls)
        fields = tuple(
            (f.name, hints[f.name], _max_len(f.validator), f.default is attrs.NOTHING)
            for f in attrs.fields(cls)
            if f.name != "extra" and f.init
        )
        has_extra = any(f.name == "extra" for f in attrs.fields(cls))
        plan = (fields, frozenset(name for name, *_ in fields), has_extra)
        _plans[cls] = plan
    return plan


_SCALARS: Final = frozenset({str, int, float, bool, bytes})
_origins: dict[Any, tuple[Any, tuple[Any, ...]]] = {}


def _origin(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    """``typing.get_origin`` and ``get_args`` of ``hint``, worked out once per hint."""
    found = _origins.get(hint)
    if found is None:
        found = (typing.get_origin(hint), typing.get_args(hint))
        _origins[hint] = found
    return found


def _max_len(validator: object) -> int | None:
    """The ``attrs.validators.max_len`` bound among a field's validators, if any."""
    for v in getattr(validator, "_validators", (validator,)):
        limit = getattr(v, "max_length", None)
        if isinstance(limit, int):
            return limit
    return None


def _convert(hint: Any, value: object, where: str) -> Any:
    if hint in _SCALARS:
        return _scalar(hint, value, where)
    origin, args = _origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except DecodeError as e:
                errors.append(str(e))
        raise DecodeError("; ".join(errors) or f"{where}: unexpected nil")
    if hint is Any or hint is object:
        return value
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise DecodeError(f"{where}: expected an array, got {type(value).__name__}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise DecodeError(f"{where}: expected {len(args)} items, got {len(value)}")
            pairs = enumerate(zip(args, value, strict=True))
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
        item = args[0] if args else Any
        try:
            converted = [_convert(item, v, where) for v in value]
        except DecodeError:
            # Name the item that failed: its index is worked out only on this
            # path, not formatted for every item of every page (issue 13).
            for i, v in enumerate(value):
                _convert(item, v, f"{where}[{i}]")
            raise
        return tuple(converted) if origin is tuple else converted
    if origin is dict or origin is Mapping:
        if not isinstance(value, dict):
            raise DecodeError(f"{where}: expected a map, got {type(value).__name__}")
        key_t, val_t = args or (Any, Any)
        return {
            _convert(key_t, k, f"{where} key"): _convert(val_t, v, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    if isinstance(hint, type) and attrs.has(hint):
        return from_wire(hint, value, where)
    raise DecodeError(f"{where}: no wire conversion for {hint!r}")  # pragma: no cover


def _scalar(hint: type, value: object, where: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise DecodeError(f"{where}: expected a boolean, got {type(value).__name__}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise DecodeError(f"{where}: expected an integer, got {type(value).__name__}")
        # Every integer field fits SQLite's signed 64-bit INTEGER (§7.9); the
        # classes' own validators narrow this further (issue 10, item 1).
        if not -MAX_WIRE_INT - 1 <= value <= MAX_WIRE_INT:
            raise DecodeError(f"{where}: integer out of the signed 64-bit range")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DecodeError(f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise DecodeError(f"{where}: expected a string, got {type(value).__name__}")
        return value
    if hint is bytes:
        if not isinstance(value, bytes):
            raise DecodeError(f"{where}: expected binary, got {type(value).__name__}")
        return value
    raise DecodeError(f"{where}: no wire conversion for {hint!r}")  # pragma: no cover
