"""The registry of merge methods: a method registers itself under its name (`@register`).

Methods of other packages join the registry without foldin knowing them: a package declares its
module under the `foldin.methods` entry point group, or the FOLDIN_METHODS environment variable
names modules (comma-separated) to import. Either is loaded the first time a method is looked up
or listed, so `foldin methods` lists such a method, `foldin init --method NAME` accepts it, and a
state made with it reopens in a later process.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from functools import partial
from importlib.metadata import entry_points

from foldin.errors import FoldinError
from foldin.methods.base import MergeMethod

ENTRY_POINT_GROUP = "foldin.methods"
MODULES_VARIABLE = "FOLDIN_METHODS"

_REGISTRY: dict[str, type[MergeMethod]] = {}
_plugins_loaded = False


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make a method available under `cls.name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise FoldinError(
            f"merge method {cls.name!r} is registered twice ({cls.__module__} and {_REGISTRY[cls.name].__module__})."
        )
    _REGISTRY[cls.name] = cls
    return cls


def _load_plugins() -> None:
    """Import the modules that entry points and FOLDIN_METHODS name (once per process)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    named: list[tuple[str, Callable[[], object]]] = [
        (f"entry point {ep.name!r}", ep.load) for ep in entry_points(group=ENTRY_POINT_GROUP)
    ]
    modules = [m.strip() for m in os.environ.get(MODULES_VARIABLE, "").split(",") if m.strip()]
    named += [(f"{MODULES_VARIABLE} module {m!r}", partial(importlib.import_module, m)) for m in modules]
    for what, load in named:
        try:
            load()
        except FoldinError:
            raise
        except Exception as e:  # a plugin's own bug or a missing module: say which plugin
            raise FoldinError(f"the method plugin {what} could not be loaded: {type(e).__name__}: {e}.") from e


def get_method(name: str) -> type[MergeMethod]:
    if name not in _REGISTRY:
        _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FoldinError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}.") from None


def available_methods() -> dict[str, type[MergeMethod]]:
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))
