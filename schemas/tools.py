"""OpenAI-style function tool schemas, checked one way for the job's `tools` (refused
before any model loads) and for a row's tools column (that row is invalid_input)."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError


def tool_errors(tools: Any, where: str = "tools") -> list[str]:
    """Every problem of a list of `{type: function, function: {name, parameters?}}`,
    each prefixed with its place (e.g. `tools[1].function.parameters.type`); [] if valid.
    `parameters` must be a JSON Schema (draft 2020-12 meta-schema), as chat templates and
    tool-call parsers read it."""
    if not isinstance(tools, list):
        return [f"{where}: must be a list of tool schemas"]
    errors = []
    for i, tool in enumerate(tools):
        at = f"{where}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            errors.append(f"{at}: must be {{type: function, function: {{name, parameters?}}}}")
            continue
        fn = tool.get("function")
        if not isinstance(fn, dict):
            errors.append(f"{at}.function: must be an object {{name, parameters?}}")
            continue
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            errors.append(f"{at}.function.name: must be a non-empty string")
        if "parameters" in fn:
            errors += _parameters_errors(fn["parameters"], f"{at}.function.parameters")
    return errors


def _parameters_errors(parameters: Any, at: str) -> list[str]:
    if not isinstance(parameters, dict):
        return [f"{at}: must be a JSON Schema object"]
    try:
        Draft202012Validator.check_schema(parameters)
    except SchemaError as e:
        inner = "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in e.absolute_path)
        return [f"{at}{inner}: not a valid JSON Schema: {e.message}"]
    return []
