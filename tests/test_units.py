from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from dynabase.spec.units import ByteSize, Duration

durations = TypeAdapter(Duration)
sizes = TypeAdapter(ByteSize)


@pytest.mark.parametrize(
    ("text", "ms"),
    [("10s", 10_000), ("5m", 300_000), ("1h30m", 5_400_000), ("250ms", 250), ("1d", 86_400_000)],
)
def test_duration_parses_to_exact_milliseconds(text: str, ms: int) -> None:
    parsed = durations.validate_python(text)
    assert parsed.milliseconds == ms
    assert durations.dump_python(parsed) == text


@pytest.mark.parametrize(
    ("text", "size"),
    [("64MB", 64 * 1024**2), ("1GB", 1024**3), ("800kB", 800 * 1024), ("512B", 512)],
)
def test_size_parses_to_exact_bytes(text: str, size: int) -> None:
    assert sizes.validate_python(text).bytes == size


@pytest.mark.parametrize("bad", ["10", "ten seconds", "-5s", "5 m", "", "1.5s", 10])
def test_bad_duration_names_the_value_and_the_fix(bad: object) -> None:
    with pytest.raises(ValidationError) as info:
        durations.validate_python(bad)
    message = info.value.errors()[0]["msg"]
    assert str(bad) in message
    assert "10s" in message  # the example of what to write


@pytest.mark.parametrize("bad", ["64", "64mb", "1.5GB", "lots", 64])
def test_bad_size_names_the_value_and_the_fix(bad: object) -> None:
    with pytest.raises(ValidationError) as info:
        sizes.validate_python(bad)
    assert "1GB" in info.value.errors()[0]["msg"]


def test_equal_durations_compare_equal_however_written() -> None:
    assert durations.validate_python("60s") == durations.validate_python("1m")


@given(st.integers(min_value=1, max_value=10**9))
def test_duration_round_trips_through_canonical_text(ms: int) -> None:
    assert durations.validate_python(Duration.of_ms(ms).text).milliseconds == ms


@given(st.integers(min_value=1, max_value=2**40))
def test_size_round_trips_through_canonical_text(count: int) -> None:
    assert sizes.validate_python(ByteSize.of_bytes(count).text).bytes == count
