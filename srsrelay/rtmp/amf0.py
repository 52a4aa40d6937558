"""AMF0 encoding and decoding (Adobe "Action Message Format -- AMF 0", 2007).

Python mapping: number <-> float (int is accepted when encoding), boolean <-> bool,
string and long string <-> str, object <-> dict, ECMA array <-> EcmaArray (a dict),
strict array <-> list, date <-> Amf0Date, null <-> None. Undefined decodes to None;
encode the UNDEFINED sentinel to write it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypeAlias

NUMBER = 0x00
BOOLEAN = 0x01
STRING = 0x02
OBJECT = 0x03
NULL = 0x05
UNDEFINED_MARKER = 0x06
REFERENCE = 0x07
ECMA_ARRAY = 0x08
OBJECT_END = 0x09
STRICT_ARRAY = 0x0A
DATE = 0x0B
LONG_STRING = 0x0C
XML_DOCUMENT = 0x0F
TYPED_OBJECT = 0x10
AMF3_SWITCH = 0x11

MAX_DEPTH = 64
"""Deepest nesting of objects/arrays accepted; bounds recursion on hostile input."""

_DOUBLE = struct.Struct(">d")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_DATE = struct.Struct(">dh")
_OBJECT_END = b"\x00\x00\x09"


class Amf0Error(ValueError):
    """AMF0 input is truncated, malformed or uses a type we do not support."""


class Undefined:
    """The AMF0 `undefined` value (encoding only; decoding yields None)."""

    _instance: Undefined | None = None

    def __new__(cls) -> Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNDEFINED"


UNDEFINED = Undefined()


class EcmaArray(dict[str, "Amf0Value"]):
    """An AMF0 ECMA array (associative array); behaves as a dict."""


@dataclass(frozen=True, slots=True)
class Amf0Date:
    """An AMF0 date."""

    milliseconds: float
    """Milliseconds since 1970-01-01 UTC."""
    timezone: int = 0
    """Reserved time-zone field (minutes); writers should send 0."""


Amf0Value: TypeAlias = (
    "float | bool | str | None | Undefined | Amf0Date | dict[str, Amf0Value] | list[Amf0Value]"
)


# --- encoding -------------------------------------------------------------------------------


def encode(*values: Amf0Value) -> bytes:
    """Serialize values one after another."""
    out = bytearray()
    for value in values:
        _encode_value(out, value, 0)
    return bytes(out)


def _encode_key(out: bytearray, key: str) -> None:
    raw = key.encode()
    if len(raw) > 0xFFFF:
        raise Amf0Error(f"AMF0 object key of {len(raw)} bytes is longer than 65535")
    out += _U16.pack(len(raw))
    out += raw


def _encode_pairs(out: bytearray, mapping: dict[str, Amf0Value], depth: int) -> None:
    for key, item in mapping.items():
        _encode_key(out, key)
        _encode_value(out, item, depth + 1)
    out += _OBJECT_END


def _encode_value(out: bytearray, value: Amf0Value, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise Amf0Error(f"AMF0 value nested deeper than {MAX_DEPTH} levels")
    if value is None:
        out.append(NULL)
    elif isinstance(value, Undefined):
        out.append(UNDEFINED_MARKER)
    elif isinstance(value, bool):  # before the number branch: bool is an int
        out.append(BOOLEAN)
        out.append(1 if value else 0)
    elif isinstance(value, int | float):
        out.append(NUMBER)
        out += _DOUBLE.pack(float(value))
    elif isinstance(value, str):
        raw = value.encode()
        if len(raw) <= 0xFFFF:
            out.append(STRING)
            out += _U16.pack(len(raw))
        else:
            out.append(LONG_STRING)
            out += _U32.pack(len(raw))
        out += raw
    elif isinstance(value, Amf0Date):
        out.append(DATE)
        out += _DATE.pack(value.milliseconds, value.timezone)
    elif isinstance(value, EcmaArray):
        out.append(ECMA_ARRAY)
        out += _U32.pack(len(value))
        _encode_pairs(out, value, depth)
    elif isinstance(value, dict):
        out.append(OBJECT)
        _encode_pairs(out, value, depth)
    elif isinstance(value, list):
        out.append(STRICT_ARRAY)
        out += _U32.pack(len(value))
        for item in value:
            _encode_value(out, item, depth + 1)
    else:
        raise Amf0Error(f"cannot encode {type(value).__name__} as AMF0")


# --- decoding -------------------------------------------------------------------------------


def decode_all(data: bytes | memoryview) -> list[Amf0Value]:
    """Decode every value in `data` (a command or data message body)."""
    buf = bytes(data)
    values: list[Amf0Value] = []
    offset = 0
    while offset < len(buf):
        value, offset = decode_value(buf, offset)
        values.append(value)
    return values


def decode_value(buf: bytes, offset: int = 0) -> tuple[Amf0Value, int]:
    """Decode one value at `offset`; return it and the offset just past it."""
    return _decode(buf, offset, 0)


def _need(buf: bytes, offset: int, size: int, what: str) -> None:
    if offset + size > len(buf):
        have = max(len(buf) - offset, 0)
        raise Amf0Error(
            f"AMF0 input truncated: {what} at offset {offset} needs {size} bytes, {have} left"
        )


def _decode_utf8(raw: bytes, offset: int) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise Amf0Error(f"AMF0 string at offset {offset} is not valid UTF-8") from exc


def _decode_pairs(
    buf: bytes, offset: int, depth: int, into: dict[str, Amf0Value]
) -> tuple[dict[str, Amf0Value], int]:
    while True:
        _need(buf, offset, 2, "object key length")
        (key_len,) = _U16.unpack_from(buf, offset)
        offset += 2
        if key_len == 0:
            _need(buf, offset, 1, "object end marker")
            if buf[offset] == OBJECT_END:
                return into, offset + 1
            # An empty key with a value is legal, if unusual.
            key = ""
        else:
            _need(buf, offset, key_len, "object key")
            key = _decode_utf8(buf[offset : offset + key_len], offset)
            offset += key_len
        into[key], offset = _decode(buf, offset, depth + 1)


def _decode(buf: bytes, offset: int, depth: int) -> tuple[Amf0Value, int]:
    if depth > MAX_DEPTH:
        raise Amf0Error(f"AMF0 value nested deeper than {MAX_DEPTH} levels")
    _need(buf, offset, 1, "type marker")
    marker = buf[offset]
    offset += 1
    if marker == NUMBER:
        _need(buf, offset, 8, "number")
        return _DOUBLE.unpack_from(buf, offset)[0], offset + 8
    if marker == BOOLEAN:
        _need(buf, offset, 1, "boolean")
        return buf[offset] != 0, offset + 1
    if marker == STRING or marker == LONG_STRING or marker == XML_DOCUMENT:
        if marker == STRING:
            _need(buf, offset, 2, "string length")
            (length,) = _U16.unpack_from(buf, offset)
            offset += 2
        else:
            _need(buf, offset, 4, "long string length")
            (length,) = _U32.unpack_from(buf, offset)
            offset += 4
        _need(buf, offset, length, "string")
        return _decode_utf8(buf[offset : offset + length], offset), offset + length
    if marker == OBJECT:
        return _decode_pairs(buf, offset, depth, {})
    if marker == NULL or marker == UNDEFINED_MARKER:
        return None, offset
    if marker == ECMA_ARRAY:
        # The count is only a hint (encoders get it wrong); the end marker terminates.
        _need(buf, offset, 4, "ECMA array count")
        return _decode_pairs(buf, offset + 4, depth, EcmaArray())
    if marker == STRICT_ARRAY:
        _need(buf, offset, 4, "strict array count")
        (count,) = _U32.unpack_from(buf, offset)
        offset += 4
        # Every element takes at least one byte: reject absurd counts before looping.
        _need(buf, offset, count, "strict array elements")
        items: list[Amf0Value] = []
        for _ in range(count):
            item, offset = _decode(buf, offset, depth + 1)
            items.append(item)
        return items, offset
    if marker == DATE:
        _need(buf, offset, 10, "date")
        millis, timezone = _DATE.unpack_from(buf, offset)
        return Amf0Date(millis, timezone), offset + 10
    if marker == TYPED_OBJECT:
        _need(buf, offset, 2, "class name length")
        (name_len,) = _U16.unpack_from(buf, offset)
        offset += 2
        _need(buf, offset, name_len, "class name")
        return _decode_pairs(buf, offset + name_len, depth, {})
    if marker == OBJECT_END:
        raise Amf0Error(f"AMF0 object end marker at offset {offset - 1} outside an object")
    if marker == AMF3_SWITCH:
        raise Amf0Error(
            f"AMF3 value (marker 0x11) at offset {offset - 1} not supported; "
            "configure the encoder to use AMF0"
        )
    if marker == REFERENCE:
        raise Amf0Error(f"AMF0 reference (marker 0x07) at offset {offset - 1} not supported")
    raise Amf0Error(f"unknown AMF0 type marker 0x{marker:02x} at offset {offset - 1}")
