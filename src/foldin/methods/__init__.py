"""Merge methods: one module per method, each registered by name in `registry`."""

from foldin.methods import adamerging, average, dop, magmax, opcm, otmf, task_arithmetic, ties  # noqa: F401  (registration)
from foldin.methods.registry import available_methods, get_method, register

__all__ = ["available_methods", "get_method", "register"]
