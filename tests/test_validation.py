"""The checks and converters the settings share, on a small value of their own."""

from __future__ import annotations

import enum
import math

import attrs
import pytest

from mailedge.validation import (
    InvalidSettingError,
    count,
    enum_value,
    expect_int,
    number,
    of_type,
    parsed,
    seconds,
)


class Colour(enum.StrEnum):
    RED = "red"


@attrs.frozen
class Sample:
    flag: bool = attrs.field(default=False, validator=of_type("a boolean", bool))
    size: int = attrs.field(default=1, validator=count)
    wait: float = attrs.field(default=1.0, validator=seconds(60.0))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"flag": 1}, "flag: expected a boolean, got 1"),
        ({"size": True}, "size: expected an integer, got True"),
        ({"size": 0}, "size: must be at least 1, got 0"),
        ({"wait": "1"}, "wait: expected a number of seconds, got '1'"),
        ({"wait": 0}, "wait: must be more than 0 and at most 60 seconds, got 0"),
        ({"wait": math.nan}, "wait: must be more than 0 and at most 60 seconds, got nan"),
        ({"wait": 61}, "wait: must be more than 0 and at most 60 seconds, got 61"),
    ],
)
def test_each_check_names_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidSettingError) as caught:
        Sample(**fields)  # type: ignore[arg-type]
    assert str(caught.value) == message
    assert caught.value.field == message.partition(":")[0]


def test_a_bool_is_no_integer() -> None:
    field = attrs.fields(Sample).size
    assert expect_int(field, 3) == 3
    with pytest.raises(InvalidSettingError, match="expected an integer, got False"):
        expect_int(field, False)


def test_numbers_read_as_a_person_writes_them() -> None:
    assert (number(2592000.0), number(0.25), number(3.0)) == ("2592000", "0.25", "3")


def test_converters_name_the_field_when_text_does_not_convert() -> None:
    assert enum_value(Colour, "colour", "red") is Colour.RED
    assert enum_value(Colour, "colour", Colour.RED) is Colour.RED
    with pytest.raises(InvalidSettingError, match=r"^colour: expected a Colour, got 'blue'$"):
        enum_value(Colour, "colour", "blue")
    assert parsed("size", int, "12") == 12
    with pytest.raises(InvalidSettingError, match=r"^size: invalid literal"):
        parsed("size", int, "twelve")
