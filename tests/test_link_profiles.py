"""Link profiles: the shipped TOML, validation, lookup errors, and the analytic bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.link.profiles import LinkProfile, bound_ms, get_profile, load_profiles
from splitedge.errors import SplitedgeError

SHIPPED = ["gprs", "edge", "3g", "dsl", "wifi", "lte", "satellite"]


def test_shipped_profiles_are_complete_and_cited() -> None:
    profiles = load_profiles()
    assert set(SHIPPED) <= set(profiles)
    for name in SHIPPED:
        p = profiles[name]
        assert p.name == name
        assert len(p.source) > 20, f"{name} must say where its numbers come from"
        assert p.jitter_ms <= 0.25 * p.delay_ms or p.jitter_ms <= 2, f"{name}: keep jitter small"


def test_shipped_rates_grow_with_the_generation() -> None:
    p = load_profiles()
    downs = [p[n].down_kbit for n in ("gprs", "edge", "3g", "lte", "wifi")]
    assert downs == sorted(downs)


def test_satellite_delay_respects_the_speed_of_light() -> None:
    # Ground -> GEO -> ground is at least 2 * 35786 km at c: a physics floor for one way.
    floor_ms = 2 * 35_786e3 / 299_792_458 * 1e3
    assert floor_ms == pytest.approx(238.7, abs=0.1)
    assert get_profile("satellite").delay_ms >= floor_ms


def test_bound_is_round_trip_plus_serialisation() -> None:
    link = LinkProfile("test", up_kbit=1000, down_kbit=250, delay_ms=20)
    # 28 KiB up at 1 Mbit/s = 229.376 ms; 100 B down at 250 kbit/s = 3.2 ms; RTT 40 ms.
    assert bound_ms(link, 28 * 1024, 100) == pytest.approx(40 + 229.376 + 3.2)
    assert bound_ms(link, 0, 0) == pytest.approx(40)
    assert link.rtt_ms == 40


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"up_kbit": 0}, ["up_kbit", "0"]),
        ({"down_kbit": -5}, ["down_kbit", "-5"]),
        ({"down_kbit": float("inf")}, ["down_kbit", "inf"]),
        ({"delay_ms": -1}, ["delay_ms", "-1"]),
        ({"jitter_ms": 30}, ["jitter_ms", "30", "20"]),
        ({"queue_bytes": 100}, ["queue_bytes", "100", "1500"]),
        ({"queue_bytes": 2048.0}, ["queue_bytes", "2048.0"]),
        ({"up_kbit": True}, ["up_kbit", "True"]),
    ],
)
def test_invalid_values_name_the_field_and_value(kwargs: dict, words: list[str]) -> None:
    args = {"name": "bad", "up_kbit": 1000, "down_kbit": 1000, "delay_ms": 20, **kwargs}
    with pytest.raises(ValueError) as err:
        LinkProfile(**args)
    for word in words:
        assert word in str(err.value)


def test_unknown_profile_lists_known_names() -> None:
    with pytest.raises(SplitedgeError) as err:
        get_profile("carrier-pigeon")
    for name in SHIPPED:
        assert name in str(err.value)


def test_lookup_is_case_insensitive() -> None:
    assert get_profile("LTE").name == "lte"


def test_user_toml(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(
        '[lab]\nup_kbit = 1000\ndown_kbit = 2000\ndelay_ms = 20\nsource = "our bench"\n'
    )
    lab = get_profile("lab", path)
    assert (lab.up_kbit, lab.down_kbit, lab.delay_ms, lab.jitter_ms) == (1000, 2000, 20, 0)
    assert list(load_profiles(path)) == ["lab"]


@pytest.mark.parametrize(
    "text, words",
    [
        ("[lab]\nup_kbit = 1\ndown_kbit = 1\ndelay_ms = 1\nlos_pct = 1\n", ["los_pct", "lab"]),
        ("[lab]\nup_kbit = 0\ndown_kbit = 1\ndelay_ms = 1\n", ["up_kbit", "lab"]),
        ("[lab]\nup_kbit = 1\n", ["lab", "down_kbit", "delay_ms"]),
        ("lab = 3\n", ["lab"]),
        ("[lab\n", ["TOML"]),
    ],
)
def test_bad_user_toml_is_a_user_error(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SplitedgeError) as err:
        load_profiles(path)
    for word in [str(path), *words]:
        assert word in str(err.value)


def test_missing_user_toml_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(SplitedgeError, match="not found"):
        load_profiles(tmp_path / "nope.toml")
