"""Configs: validation and JSON round trips."""

from __future__ import annotations

import pytest

import tokenbudget as tb


@pytest.mark.parametrize(
    "config",
    [
        tb.ToMe(r=16),
        tb.ToMe(r=(8, -1.0)),
        tb.ToMe(r=[1, 2, 3]),
        tb.ToMe(keep=0.5),
        tb.ToMe(tokens=40, prop_attn=False),
    ],
)
def test_json_round_trip(config) -> None:
    assert tb.config_from_json(config.to_json()) == config
    assert tb.config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one budget"),
        ({"r": 4, "keep": 0.5}, "exactly one budget"),
        ({"r": -1}, ">= 0"),
        ({"keep": 1.5}, "fraction"),
        ({"tokens": 0}, ">= 1"),
        ({"r": "16"}, "int"),
        ({"r": 4, "prop_attn": "yes"}, "True or False"),
    ],
)
def test_bad_configs_say_what_is_wrong(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        tb.ToMe(**kwargs)


def test_unknown_method_and_option() -> None:
    with pytest.raises(ValueError, match="unknown method 'evit'"):
        tb.config_from_json('{"method": "evit", "keep": 0.7}')
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['ratio'\]"):
        tb.config_from_json('{"method": "tome", "ratio": 0.5}')
    with pytest.raises(ValueError, match="not valid JSON"):
        tb.config_from_json("{r: 16}")
