"""Stopping a run between two pieces of work: what asks (`Stop`) and what is raised (`Stopped`)."""

from __future__ import annotations

from collections.abc import Callable

Stop = Callable[[], bool]  # polled between pieces of work: True once a stop was asked for


class Stopped(BaseException):  # a signal like KeyboardInterrupt, never a job's failure
    """The run was asked to stop (Ctrl-C, SIGTERM) between two pieces of work."""
