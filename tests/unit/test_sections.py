"""The settings reader (awsomefsd/config/sections.py): what the file and the environment may
write for each type, and every wrong value reported at once, each by its place."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pytest

from awsomefsd.config.sections import AfterValidator, BeforeValidator, Field, Section, SettingsError


def _even(value: int) -> int:
    if value % 2:
        raise ValueError(f"{value} is odd")
    return value


class Inner(Section):
    flag: bool = Field(False, description="a flag")
    count: int = Field(3, ge=1, le=7)
    ratio: float = Field(0.5, gt=0, lt=1)
    mode: Literal["a", "b"] = "a"
    where: Path | None = None
    names: list[str] = Field(default_factory=list)
    even: Annotated[int, BeforeValidator(lambda v: int(str(v).removesuffix("x"))), AfterValidator(_even)] = 2


class Outer(Section):
    inner: Inner = Inner()
    label: str = "x"


def errors(data: dict[str, object]) -> list[tuple[str, str]]:
    with pytest.raises(SettingsError) as caught:
        Outer.model_validate(data)
    return [(".".join(map(str, e["loc"])), e["msg"]) for e in caught.value.errors()]


@pytest.mark.parametrize(("text", "value"), [("true", True), ("Off", False), ("1", True), ("no", False)])
def test_the_environments_text_is_read_as_each_type(text: str, value: bool) -> None:
    inner = Outer.model_validate({"inner": {"flag": text, "count": " 5 ", "ratio": "0.25", "where": "/x",
                                            "names": ("p", "q"), "even": "4x"}}).inner
    assert (inner.flag, inner.count, inner.ratio, inner.where, inner.names, inner.even) == \
        (value, 5, 0.25, Path("/x"), ["p", "q"], 4)


def test_defaults_fill_what_is_not_given_and_each_instance_has_its_own() -> None:
    first, second = Outer.model_validate({}), Outer.model_validate({"inner": {}})
    assert first == second and first.inner.count == 3 and first.inner.where is None
    first.inner.names.append("mine")
    assert second.inner.names == [] and Inner().names == []


def test_every_wrong_value_is_reported_at_once_by_its_place() -> None:
    assert errors({"inner": {"flag": "maybe", "count": 8, "ratio": 1, "mode": "c", "names": "p", "even": 3,
                             "extra": 1}, "label": 5}) == [
        ("inner.extra", "Extra inputs are not permitted"),
        ("inner.flag", "Input should be a valid boolean"),
        ("inner.count", "Input should be less than or equal to 7"),
        ("inner.ratio", "Input should be less than 1"),
        ("inner.mode", "Input should be 'a' or 'b'"),
        ("inner.names", "Input should be a valid list"),
        ("inner.even", "Value error, 3 is odd"),
        ("label", "Input should be a valid string"),
    ]


@pytest.mark.parametrize(("count", "says"), [
    (0, "Input should be greater than or equal to 1"), (2.5, "got a number with a fractional part"),
    ("many", "Input should be a valid integer"), (True, "Input should be a valid integer"),
])
def test_integers_are_whole_and_bounded(count: object, says: str) -> None:
    ((where, msg),) = errors({"inner": {"count": count}})
    assert where == "inner.count" and says in msg


def test_a_section_must_be_a_table_and_a_list_item_its_type() -> None:
    assert errors({"inner": 3}) == [("inner", "Input should be a valid dictionary or instance of Inner")]
    assert errors({"inner": {"names": ["p", 7]}}) == [("inner.names.1", "Input should be a valid string")]


def test_a_copy_takes_updates_unchecked_and_leaves_the_original() -> None:
    outer = Outer.model_validate({"label": "before"})
    copied = outer.model_copy(update={"label": "after"})
    assert (outer.label, copied.label) == ("before", "after") and copied.inner is outer.inner
    assert copied.model_dump() == {"inner": Inner().model_dump(), "label": "after"}


def test_fields_say_their_defaults_types_and_descriptions() -> None:
    assert Inner.model_fields["flag"].description == "a flag" and Inner.model_fields["count"].default == 3
    assert Outer.model_fields["inner"].annotation is Inner
