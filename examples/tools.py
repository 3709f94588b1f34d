"""The demo's tools, for a rollout job (`rollout.tools: [{python: tools.py}]`).

Every public function defined here becomes a tool: thinkbatch derives its JSON schema
from the signature (type hints, defaults; `Annotated[str, Field(description=...)]` for a
parameter's description) and the docstring, and validates the model's arguments against
it before the call. Names are those of the trained miniature's tools; results are
deterministic text, a function of the arguments only, so a rollout is reproducible and a
model can state the returned value in its answer.
"""

from __future__ import annotations

import hashlib
from typing import Any

SKIES = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "clear", "stormy")
# Factor (or formula) per (from_unit, to_unit) pair.
_CONVERSIONS: dict[tuple[str, str], Any] = {
    ("km", "miles"): 0.621371, ("miles", "km"): 1.609344, ("kg", "pounds"): 2.204623,
    ("pounds", "kg"): 0.453592, ("meters", "feet"): 3.28084, ("feet", "meters"): 0.3048,
    ("liters", "gallons"): 0.264172, ("gallons", "liters"): 3.785412,
    ("celsius", "fahrenheit"): lambda v: v * 9 / 5 + 32,
    ("fahrenheit", "celsius"): lambda v: (v - 32) * 5 / 9,
}


def _stable(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


def get_weather(city: str) -> str:
    """The current weather in a city: temperature in °C and the sky."""
    h = _stable(f"weather:{city}")
    return f"{h % 41 - 5} °C and {SKIES[h // 41 % len(SKIES)]}"


def get_time(city: str) -> str:
    """The local time in a city, as HH:MM (24-hour clock)."""
    h = _stable(f"time:{city}")
    return f"{h % 24:02d}:{h // 24 % 60:02d}"


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a value between units: km/miles, kg/pounds, meters/feet, liters/gallons,
    celsius/fahrenheit."""
    rule = _CONVERSIONS.get((from_unit, to_unit))
    if rule is None:
        raise ValueError(f"cannot convert {from_unit} to {to_unit}")
    result = rule(value) if callable(rule) else value * rule
    # Rounded as people quote a conversion: whole from 100, one decimal below.
    return f"{result:.0f} {to_unit}" if abs(result) >= 100 else f"{result:.1f} {to_unit}"
