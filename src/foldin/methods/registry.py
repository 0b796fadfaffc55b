"""The registry of merge methods: a method registers itself under its name (`@register`)."""

from __future__ import annotations

from foldin.errors import FoldinError
from foldin.methods.base import MergeMethod

_REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make a method available under `cls.name`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"merge method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[MergeMethod]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FoldinError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}.") from None


def available_methods() -> dict[str, type[MergeMethod]]:
    return dict(sorted(_REGISTRY.items()))
