"""What every config shares: the method registry, JSON round trip, and the per-layer budget."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from ..schedule import RSpec, layer_schedule

_REGISTRY: dict[str, type[ReductionConfig]] = {}

#: the entropy guard's default floor (``ToMe(entropy_floor=DEFAULT_ENTROPY_FLOOR)``, method ``tome-guard``):
#: a block may not take an image's token entropy below 27.34 % of its maximum
DEFAULT_ENTROPY_FLOOR = 0.2734


def _check_entropy_floor(name: str, floor: Any) -> None:
    """``ValueError`` unless ``floor`` is ``None`` (no guard) or a fraction in [0, 1]."""
    if floor is None:
        return
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
        raise ValueError(
            f"{name}: entropy_floor is a fraction of the maximum token entropy in [0, 1] (e.g. "
            f"{DEFAULT_ENTROPY_FLOOR}), or None for no guard; got {floor!r}"
        )


@dataclass(frozen=True)
class ReductionConfig:
    """Base of every strategy config. ``method`` names the strategy in JSON and on the CLI."""

    method: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            _REGISTRY[cls.method] = cls

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with a ``"method"`` key; tuples become lists (JSON has no tuples)."""
        return {"method": self.method, **asdict(self)}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def method_names() -> list[str]:
    """Names of every registered method (``"tome"``, ``"random"``, ``"pool"``, ...)."""
    return list(_REGISTRY)


def config_class(method: str) -> type[ReductionConfig]:
    """The config class registered under ``method``; ``ValueError`` listing the known ones."""
    if not isinstance(method, str) or method not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[method]


def config_from_dict(data: dict[str, Any]) -> ReductionConfig:
    """Build a config from :meth:`ReductionConfig.to_dict` output (or hand-written JSON)."""
    if not isinstance(data, dict):
        raise TypeError(
            f'a config dict is expected, e.g. {{"method": "tome", "r": 16}}; got {type(data).__name__}'
        )
    data = dict(data)
    if "method" not in data:
        raise ValueError(
            f'a config needs a "method" key naming the method ({", ".join(_REGISTRY)}), '
            f'e.g. {{"method": "tome", "r": 16}}; got keys {sorted(map(str, data))}'
        )
    method = data.pop("method")
    if not isinstance(method, str):
        raise ValueError(f'"method" must be a method name ({", ".join(_REGISTRY)}), got {method!r}')
    cls = config_class(method)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as err:  # e.g. a comparison of a string option with a number
        raise ValueError(f"invalid options for method {method!r}: {err}") from None


def config_from_json(source: str | os.PathLike[str]) -> ReductionConfig:
    """A config from JSON text (``'{"method": "tome", "r": 16}'``) or from a JSON file (a path as
    ``str`` or ``pathlib.Path``, e.g. what ``tokenbudget plan --out`` writes)."""
    looks_like_json = isinstance(source, str) and source.lstrip()[:1] in ("{", "[", '"')
    if isinstance(source, os.PathLike) or (isinstance(source, str) and not looks_like_json):
        path = os.fspath(source)
        if not os.path.isfile(path):
            what = "a folder" if os.path.isdir(path) else "no file"
            raise ValueError(
                f"config {path!r} is neither JSON text nor a JSON file ({what} there); give e.g. "
                '\'{"method": "tome", "r": 16}\' or the path of a file holding it'
            )
        with open(path, encoding="utf-8") as f:
            text, origin = f.read(), f" in {path}"
    elif isinstance(source, (str, bytes, bytearray)):
        text, origin = source, ""
    else:
        raise TypeError(f"config_from_json takes JSON text or a file path, got {type(source).__name__}")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f'config{origin} is not valid JSON ({err}); expected e.g. \'{{"method": "tome", "r": 16}}\''
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f'a JSON config{origin} must be an object with a "method" key, got {type(data).__name__}'
        )
    return config_from_dict(data)


@dataclass(frozen=True)
class BudgetConfig(ReductionConfig):
    """A per-layer token budget shared by every method: exactly one of ``r``, ``keep``, ``tokens``.

    Args:
        r: tokens removed per block: an int, ``(r, inflection)`` (ToMe's linear schedule, inflection
            in [-1, 1], -1 = the paper's decreasing schedule) or a list with one count per block.
            ``r=0`` leaves the model unchanged. A block that cannot remove ``r`` (at most half of its
            non-prefix tokens) removes what it can; ``last_state(model).merged_per_layer`` says so.
        keep: fraction of the non-prefix tokens left after the last block (0 < keep <= 1), turned
            into a per-layer schedule for the actual input length.
        tokens: total tokens (prefix included) left after the last block.
    """

    r: RSpec | None = None
    keep: float | None = None
    tokens: int | None = None

    #: boolean options of the subclass, validated as such
    _flags: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        name = type(self).__name__
        given = [field for field in ("r", "keep", "tokens") if getattr(self, field) is not None]
        if len(given) != 1:
            raise ValueError(
                f"{name} needs exactly one budget: r (tokens removed per block, e.g. {name}(r=16)), keep "
                f"(fraction of tokens left, e.g. {name}(keep=0.25)) or tokens (tokens left); got {given or 'none'}"
            )
        r = self.r
        if isinstance(r, list) and len(r) == 2 and isinstance(r[1], float):
            # JSON has no tuples: a list whose second entry is a float is the (r, inflection) form.
            r = (r[0], r[1])
        elif isinstance(r, (list, tuple)) and not (len(r) == 2 and isinstance(r[1], float)):
            r = list(r)  # per-layer counts
        object.__setattr__(self, "r", r)
        if r is not None:
            # The block count is unknown until apply(); check the form of the spec now.
            layer_schedule(r, len(r) if isinstance(r, list) else 2)
        if self.keep is not None:
            if (
                isinstance(self.keep, bool)
                or not isinstance(self.keep, (int, float))
                or not 0.0 < self.keep <= 1.0
            ):
                raise ValueError(f"keep must be a fraction in (0, 1], got {self.keep!r}")
        if self.tokens is not None:
            if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
                raise ValueError(f"tokens must be an int >= 1, got {self.tokens!r}")
        for flag in self._flags:
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")

    def to_dict(self) -> dict[str, Any]:
        data = {"method": self.method}
        for f in fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    @property
    def is_identity(self) -> bool:
        """True when the budget is certainly zero (r=0 in every block, or keep=1)."""
        if self.r is not None:
            if isinstance(self.r, int):
                return self.r == 0
            if isinstance(self.r, tuple):
                return self.r[0] == 0
            return all(c == 0 for c in self.r)
        return self.keep == 1.0
