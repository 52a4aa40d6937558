from __future__ import annotations

import pytest

from srsrelay.rtmp import amf0
from srsrelay.rtmp.amf0 import UNDEFINED, Amf0Date, Amf0Error, EcmaArray


def roundtrip(value: amf0.Amf0Value) -> amf0.Amf0Value:
    data = amf0.encode(value)
    decoded, end = amf0.decode_value(data)
    assert end == len(data)
    return decoded


def test_number_bytes_and_roundtrip() -> None:
    assert amf0.encode(1.5) == b"\x00\x3f\xf8\x00\x00\x00\x00\x00\x00"
    assert roundtrip(1.5) == 1.5
    assert roundtrip(7) == 7.0
    assert isinstance(roundtrip(7), float)


def test_boolean() -> None:
    assert amf0.encode(True, False) == b"\x01\x01\x01\x00"
    assert roundtrip(True) is True
    assert roundtrip(False) is False


def test_string_and_long_string() -> None:
    assert amf0.encode("ab") == b"\x02\x00\x02ab"
    assert roundtrip("héllo") == "héllo"
    long = "x" * 70_000
    data = amf0.encode(long)
    assert data[0] == amf0.LONG_STRING
    assert data[1:5] == (70_000).to_bytes(4, "big")
    assert roundtrip(long) == long


def test_object() -> None:
    value: amf0.Amf0Value = {"app": "live", "n": 3.0, "nested": {"ok": True, "z": None}}
    data = amf0.encode(value)
    assert data.startswith(b"\x03\x00\x03app\x02\x00\x04live")
    assert data.endswith(b"\x00\x00\x09\x00\x00\x09")
    assert roundtrip(value) == value


def test_null_and_undefined() -> None:
    assert amf0.encode(None) == b"\x05"
    assert amf0.encode(UNDEFINED) == b"\x06"
    assert amf0.decode_all(b"\x05\x06\x05") == [None, None, None]


def test_ecma_array() -> None:
    value = EcmaArray({"width": 320.0, "height": 240.0})
    data = amf0.encode(value)
    assert data[:5] == b"\x08\x00\x00\x00\x02"
    decoded = roundtrip(value)
    assert isinstance(decoded, EcmaArray)
    assert decoded == {"width": 320.0, "height": 240.0}


def test_ecma_array_count_is_only_a_hint() -> None:
    # Encoders write 0 as the count; the end marker terminates the array.
    data = b"\x08\x00\x00\x00\x00\x00\x01a\x00" + b"\x40\x00" + b"\x00" * 6 + b"\x00\x00\x09"
    assert amf0.decode_all(data) == [{"a": 2.0}]


def test_strict_array() -> None:
    value: amf0.Amf0Value = [1.0, "two", None, [True]]
    data = amf0.encode(value)
    assert data[:5] == b"\x0a\x00\x00\x00\x04"
    assert roundtrip(value) == value


def test_date() -> None:
    value = Amf0Date(1_700_000_000_000.0, 0)
    data = amf0.encode(value)
    assert len(data) == 11 and data[0] == amf0.DATE
    assert roundtrip(value) == value


def test_object_end_outside_object() -> None:
    with pytest.raises(Amf0Error) as exc:
        amf0.decode_all(b"\x05\x09")
    assert str(exc.value) == "AMF0 object end marker at offset 1 outside an object"


def test_truncated_number() -> None:
    with pytest.raises(Amf0Error) as exc:
        amf0.decode_all(b"\x02\x00\x01a\x00\x01\x02")
    assert str(exc.value) == "AMF0 input truncated: number at offset 5 needs 8 bytes, 2 left"


def test_truncated_string() -> None:
    with pytest.raises(Amf0Error) as exc:
        amf0.decode_all(b"\x02\x00\x05ab")
    assert str(exc.value) == "AMF0 input truncated: string at offset 3 needs 5 bytes, 2 left"


def test_truncated_object() -> None:
    with pytest.raises(Amf0Error) as exc:
        amf0.decode_all(amf0.encode({"a": 1.0})[:-3])
    assert str(exc.value) == (
        "AMF0 input truncated: object key length at offset 13 needs 2 bytes, 0 left"
    )


def test_strict_array_absurd_count() -> None:
    with pytest.raises(Amf0Error) as exc:
        amf0.decode_all(b"\x0a\xff\xff\xff\xff\x05")
    assert str(exc.value) == (
        "AMF0 input truncated: strict array elements at offset 5 needs 4294967295 bytes, 1 left"
    )


def test_unknown_marker() -> None:
    with pytest.raises(Amf0Error) as exc:
        amf0.decode_all(b"\x05\x0e")
    assert str(exc.value) == "unknown AMF0 type marker 0x0e at offset 1"


def test_amf3_switch_is_a_clear_error() -> None:
    with pytest.raises(Amf0Error) as exc:
        amf0.decode_all(b"\x02\x00\x01a\x11\x04\x01")
    assert str(exc.value) == (
        "AMF3 value (marker 0x11) at offset 4 not supported; configure the encoder to use AMF0"
    )


def test_nesting_bound() -> None:
    data = b"\x0a\x00\x00\x00\x01" * 100 + b"\x05"
    with pytest.raises(Amf0Error) as exc:
        amf0.decode_all(data)
    assert str(exc.value) == "AMF0 value nested deeper than 64 levels"


def test_invalid_utf8() -> None:
    with pytest.raises(Amf0Error) as exc:
        amf0.decode_all(b"\x02\x00\x02\xff\xfe")
    assert str(exc.value) == "AMF0 string at offset 3 is not valid UTF-8"


def test_typed_object_decodes_as_dict() -> None:
    data = b"\x10\x00\x03Foo" + b"\x00\x01k\x05" + b"\x00\x00\x09"
    assert amf0.decode_all(data) == [{"k": None}]


def test_command_sequence() -> None:
    values: list[amf0.Amf0Value] = ["connect", 1.0, {"app": "live", "objectEncoding": 0.0}]
    assert amf0.decode_all(amf0.encode(*values)) == values
