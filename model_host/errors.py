"""Errors of the model host that cross its modules (a request's own errors travel as error frames)."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """The model folder exists but could not be loaded (bad weights, unsupported architecture)."""


class DeviceError(RuntimeError):
    """The device asked for does not exist here or this build of torch cannot use it."""
