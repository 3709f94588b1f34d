"""Loading a job file: YAML, an optional preset underneath, `--set a.b=value` on top."""

from __future__ import annotations

import copy
from importlib.resources import files
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from thinkbatch.schemas.job import JobSpec, flat_engine_args

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# Package data of thinkbatch.deployments (deployments/ in a checkout), so a wheel
# installed with `pip install .` finds presets by name as a source checkout does.
PRESETS = files("thinkbatch.deployments") / "presets"


class JobFileError(ValueError):
    """Every problem of a job file at once, so a user fixes them in one go.

    When the file parsed but some sections failed validation, `partial` is the job with
    each failed section (named in `failed`) at its defaults, so the checks that need only
    the other sections still run and report in the same round."""

    def __init__(self, errors: list[str], partial: JobSpec | None = None,
                 failed: frozenset[str] = frozenset()):
        self.errors = errors
        self.partial = partial
        self.failed = failed
        super().__init__("invalid job:\n" + "\n".join(f"  - {e}" for e in errors))


def parse_set(expr: str) -> tuple[list[str], Any]:
    """`engine.max_in_flight=64` -> (["engine", "max_in_flight"], 64); values are YAML."""
    key, sep, raw = expr.partition("=")
    if not sep or not key.strip():
        raise JobFileError([f"--set {expr!r}: expected KEY.PATH=VALUE"])
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def find_preset(name: str) -> Path | Traversable:
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.exists():
        return as_path
    candidate = PRESETS / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.name.removesuffix(".yaml") for p in PRESETS.iterdir()
                   if p.name.endswith(".yaml"))
    raise JobFileError([f"preset {name!r} not found; known presets: {', '.join(known)}"])


def _read_yaml(path: Path | Traversable) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise JobFileError([f"job file {str(path)!r} does not exist"]) from None
    except yaml.YAMLError as e:
        raise JobFileError([f"{path}: not valid YAML: {e}"]) from None
    if not isinstance(data, dict):
        raise JobFileError([f"{path}: top level must be a mapping"])
    return data


def resolve_raw(
    job: dict[str, Any], sets: Sequence[str] = (), preset: str | None = None
) -> dict[str, Any]:
    """Preset (from --preset or the job's `preset:` key) under the job, --set on top."""
    data = copy.deepcopy(job)
    for expr in sets:
        keys, value = parse_set(expr)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise JobFileError([f"--set {expr!r}: {k} is not a mapping"])
        node[keys[-1]] = value
    data = _flat(data)
    name = preset or data.get("preset")
    if name:
        data = deep_merge(_preset_chain(name), data)
        data["preset"] = name
    return data


def _preset_chain(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset may itself name a preset it refines (the TP8-only variant does)."""
    if name in seen:
        raise JobFileError([f"presets include each other: {' -> '.join((*seen, name))}"])
    data = _flat(_read_yaml(find_preset(name)))
    base = data.pop("preset", None)
    return deep_merge(_preset_chain(base, (*seen, name)), data) if base else data


def _flat(layer: dict[str, Any]) -> dict[str, Any]:
    """One file's `engine.extra_args` (the older spelling) merged into its engine section
    before the files are merged, so that a job's older spelling still overrides its
    preset's flat argument as it did."""
    if "engine" not in layer:
        return layer
    return {**layer, "engine": flat_engine_args(layer["engine"])}


def format_validation_error(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "job"
        out.append(f"{where}: {e['msg']}")
    return out


def load_job(
    path: str | Path | None = None,
    *,
    sets: Sequence[str] = (),
    preset: str | None = None,
    inline: dict[str, Any] | None = None,
) -> JobSpec:
    """Read, merge and validate; raises JobFileError listing every problem."""
    raw = inline if inline is not None else _read_yaml(Path(path))
    return validate_job(resolve_raw(raw, sets, preset))


def validate_job(data: dict[str, Any]) -> JobSpec:
    """A merged job mapping -> JobSpec; raises JobFileError with every pydantic error and
    the sections that did validate (see JobFileError.partial)."""
    data = _flat(data)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        failed = frozenset(str(err["loc"][0]) for err in e.errors() if err["loc"])
        raise JobFileError(format_validation_error(e), _partial(data, failed),
                           failed) from None


def _partial(data: dict[str, Any], failed: frozenset[str]) -> JobSpec:
    """Each section validated on its own. A failed one keeps each of its fields that
    validates alone, the rest at its model's defaults (so a check reading it sees the
    given values or neutral ones); checks of the section itself are skipped, but one that
    reads only a valid field still reports (an unknown engine argument beside a bad TP/DCP
    pair)."""
    sections: dict[str, Any] = {}
    for name, field in JobSpec.model_fields.items():
        kind = field.annotation
        if name in failed:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                sections[name] = _valid_fields(kind, data.get(name))
        elif name in data:
            sections[name] = TypeAdapter(kind).validate_python(data[name])
    return JobSpec.model_construct(**sections)


def _valid_fields(kind: type[BaseModel], given: Any) -> BaseModel:
    """`kind` at its defaults with each field of `given` that validates alone, in order (a
    field validator sees the fields kept before it, as in a whole validation)."""
    section = kind.model_construct()
    for key, value in (given.items() if isinstance(given, dict) else ()):
        candidate = section.model_copy()
        try:
            kind.__pydantic_validator__.validate_assignment(candidate, key, value)
        except ValidationError:
            continue
        section = candidate
    return section
