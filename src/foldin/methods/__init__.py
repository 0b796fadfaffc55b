"""Merge methods: one module per method, each registered by name in `registry`."""

# importing each method's module registers it
from foldin.methods import adamerging, average, dop, magmax, opcm, otmf, task_arithmetic, ties  # noqa: F401
from foldin.methods.registry import available_methods, get_method, register

__all__ = ["available_methods", "get_method", "register"]
