"""Python tools of the rollout tests (`rollout.tools: [{python: tests.rollout_tools}]`):
one that answers, one that raises, one that outlives any test's tool timeout, one that
sleeps a random time, one whose result outgrows a miniature's context."""

from __future__ import annotations

import random
import time


def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"21 °C and sunny in {city}"


def explode(reason: str = "boom") -> str:
    """Always fails."""
    raise RuntimeError(f"exploded: {reason}")


def stall() -> str:
    """Returns long after any test's tool_timeout_s (0.5 s), and soon enough that the
    slot its thread keeps until it returns is free again within the test."""
    time.sleep(10)
    return "too late"


def nap() -> str:
    """Sleeps a random time up to 0.3 s."""
    seconds = random.uniform(0, 0.3)
    time.sleep(seconds)
    return f"slept {seconds:.3f} s"


def encyclopedia(topic: str = "everything") -> str:
    """A result longer than the miniature's context."""
    return f"{topic}: " + "lorem ipsum dolor sit amet " * 400
