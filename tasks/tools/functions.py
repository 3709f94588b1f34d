"""A Python module's functions as tools: which of its functions are tools, each one's
arguments as a pydantic model made from its signature (the JSON schema the model is shown,
and the check of what the model sends), its description from its docstring. Used both in
thinkbatch's process (tools/python.py) and in an isolated tool's worker process
(tools/isolated.py), which import it and not each other."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from thinkbatch.schemas.rollout import ToolSource
from thinkbatch.tasks.tools.tool import ToolboxError, ToolFailed


def defined_functions(source: ToolSource, base_dir: Path, at: str) -> dict[str, Callable[..., Any]]:
    """The source's tools by name: its public functions (or those of `functions`)."""
    assert source.python is not None
    module = _import(source.python, base_dir, at)
    defined = {name: fn for name, fn in vars(module).items()
               if inspect.isfunction(fn) and fn.__module__ == module.__name__
               and not name.startswith("_")}
    for name in source.functions or []:
        if name not in defined:
            raise ToolboxError(f"{at}: no public function {name!r} defined there "
                               f"(it has: {', '.join(defined) or 'none'})")
    if not defined:
        raise ToolboxError(f"{at}: defines no public function")
    return {name: defined[name] for name in source.functions or defined}


def _import(ref: str, base_dir: Path, at: str) -> ModuleType:
    """A file path (`tools.py`, `lib/tools.py`; relative to base_dir) or a module name
    (`package.tools`, found on sys.path, else in base_dir)."""
    try:
        if ref.endswith(".py") or "/" in ref:
            path = (base_dir / ref).resolve()
            if not path.is_file():
                raise ToolboxError(f"{at}: no such file {path}")
            name = f"thinkbatch_tools_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # annotations and pickling look the module up
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            return module
        try:
            return importlib.import_module(ref)
        except ModuleNotFoundError as e:
            if e.name != ref.split(".")[0] or str(base_dir) in sys.path:
                raise
            sys.path.append(str(base_dir))
            return importlib.import_module(ref)
    except ToolboxError:
        raise
    except Exception as e:
        raise ToolboxError(f"{at}: import failed: {type(e).__name__}: {e}") from e


def validated(model: type[BaseModel], args: dict[str, Any], name: str) -> dict[str, Any]:
    """The function's keyword arguments, checked by its model."""
    try:
        values = model.model_validate(args)
    except ValidationError as e:
        raise ToolFailed(f"error: invalid arguments for {name!r}: {_brief(e)}") from None
    return {field: values.__dict__[field] for field in model.model_fields}


def arguments_model(name: str, fn: Callable[..., Any]) -> type[BaseModel]:
    """A pydantic model of the keyword arguments, one field per parameter (unknown
    arguments are errors)."""
    fields: dict[str, Any] = {}
    for p in inspect.signature(fn, eval_str=True).parameters.values():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise TypeError(f"parameter {p} is not a JSON argument (no *args, **kwargs or "
                            f"positional-only parameters)")
        annotation = Any if p.annotation is p.empty else p.annotation
        fields[p.name] = (annotation, ... if p.default is p.empty else p.default)
    with warnings.catch_warnings():  # a parameter named like a BaseModel method is fine here
        warnings.simplefilter("ignore")
        return create_model(f"{name}_arguments",
                            __config__=ConfigDict(extra="forbid", protected_namespaces=()),
                            **fields)


def description(fn: Callable[..., Any]) -> str:
    """The docstring, its hard-wrapped lines joined: a paragraph is one line."""
    paragraphs = (inspect.getdoc(fn) or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def _brief(e: ValidationError) -> str:
    """pydantic's errors in one line, e.g. `city: Field required; x: Input should be ...`."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}"
                     for err in e.errors(include_url=False))
