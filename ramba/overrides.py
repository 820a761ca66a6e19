"""``KEY=VALUE`` overrides, the one syntax of every ``--set`` (docs/design.md §8).

``KEY`` is a dotted path (``optim.lr``, ``data.sources.0.weight``, ``model.overrides.d_model``); ``VALUE``
is read as YAML (``3e-4`` and ``1e-3`` are floats, ``true``/``null``/``[1, 2]`` what they look like, anything
else a string). Unknown keys are refused by whatever consumes the result (TrainConfig, RambaConfig).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from ramba.errors import ConfigError

__all__ = ["yaml_load", "parse_override", "parse_overrides", "apply_overrides"]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `3e-4` (no dot) as a float, as JSON and Python do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str):
    """YAML as ramba reads it (configs and override values)."""
    return yaml.load(text, Loader=_Loader)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> ``(["optim", "lr"], 0.0003)``."""
    key, sep, raw = str(item).partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=3e-4")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: cannot parse the value ({str(e).splitlines()[0]})") from None
    return [p.strip() for p in parts], value


def parse_overrides(items) -> dict:
    """Flat overrides (no dots), e.g. RambaConfig fields: ``["d_model=32", "hsa_mlp=true"]`` ->
    ``{"d_model": 32, "hsa_mlp": True}``."""
    out = {}
    for item in items or []:
        parts, value = parse_override(item)
        if len(parts) != 1:
            raise ConfigError(f"--set {item!r}: expected a field name without dots here, e.g. d_model=64")
        out[parts[0]] = value
    return out


def apply_overrides(d: dict, items) -> dict:
    """Applies ``KEY=VALUE`` strings to the nested dict ``d`` in place (dotted keys; list items by index)."""
    for item in items or []:
        parts, value = parse_override(item)
        node: Any = d
        for depth, part in enumerate(parts):
            where = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {item!r}: '{where}' is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            if not last and not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {item!r}: '{where}' is not a mapping or list")
    return d
