"""Merge methods: one module per method, each registered by name in `registry`."""

# importing each method's module registers it
from foldin.methods import (  # noqa: F401
    adamerging,
    average,
    dop,
    magmax,
    nufilt,
    opcm,
    otmf,
    task_arithmetic,
    ties,
)
from foldin.methods.registry import available_methods, get_method, register

__all__ = ["available_methods", "get_method", "register"]
