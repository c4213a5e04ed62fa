"""The recipe schema and its loader: YAML in, a validated `Recipe` out, or one clear error.

Every error names the recipe file and line (or the `--set` override that caused it), the stage,
and the field. Stages are a discriminated union on `kind`; each kind's config lives with its code.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from slimlm import safe_yaml
from slimlm.compress.config import PruneConfig
from slimlm.errors import RecipeError, SourceError
from slimlm.evaluate.catalogue import ALWAYS_MEASURED, ALWAYS_MEASURED_EXPORT
from slimlm.evaluate.spec import Evaluation, gate_metric_names, metric_is_known, task_problems
from slimlm.export.config import GGUF_K_QUANTS, K_QUANT_BLOCK
from slimlm.sources.models import check_model_spec
from slimlm.sources.specs import DataSpec
from slimlm.stage import GGUF, HF, ONNX, PLAIN_NAME, StageConfig, Strict
from slimlm.stages import STAGE_KINDS

AnyStage = Annotated[Union[STAGE_KINDS], Field(discriminator="kind")]  # noqa: UP007 - needs a runtime Union


class Recipe(Strict):
    name: str = Field(pattern=PLAIN_NAME, description="the run's name; runs/<name> is its default run directory")
    model: str = Field(description="the teacher: a hub id, a local HF directory, a .gguf file, or pypi:PKG==VER/FILE")
    trust_remote_code: bool = False
    allow_pickle: bool = False
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    data: dict[str, DataSpec] = {}
    evaluation: Evaluation = Evaluation()
    stages: list[AnyStage] = []

    @field_validator("model")
    @classmethod
    def _model_spec(cls, model: str) -> str:
        try:
            check_model_spec(model)
        except SourceError as e:
            raise ValueError(str(e)) from None
        return model

    def stage(self, name: str) -> StageConfig:
        return next(s for s in self.stages if s.name == name)


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, validate. Raises RecipeError with file:line, stage and field on any mistake."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a directory; give the path of a recipe's .yaml file")
    if not path.exists():
        raise RecipeError(f"recipe {path} does not exist")
    if not path.is_file():
        raise RecipeError(f"recipe {path} is not a regular file (a pipe or device); give a recipe's .yaml file")
    try:
        node = safe_yaml.compose(safe_yaml.read_text(path))
        data = safe_yaml.construct(node)
    except safe_yaml.YamlInputError as e:
        where = f"{path}:{e.line}" if e.line else str(path)
        raise RecipeError(f"{where}: {e}" if e.line else str(e)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    except OSError as e:
        raise RecipeError(f"cannot read the recipe {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with name, model, data, evaluation and stages")
    where = Locator(path, _line_index(node))
    for item in overrides:
        apply_override(data, item, where)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError("\n".join(where.explain(err, data) for err in e.errors())) from None
    check_recipe(recipe, where)
    return recipe


def _line_index(node, path: tuple = ()) -> dict[tuple, int]:
    """Map every key path in the YAML document to its 1-based line."""
    lines: dict[tuple, int] = {}
    if node is None:
        return lines
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            lines[path + (key.value,)] = key.start_mark.line + 1
            lines.update({k: v for k, v in _line_index(value, path + (key.value,)).items() if k != path + (key.value,)})
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            lines.update(_line_index(value, path + (i,)))
    return lines


class Locator:
    """Turns a path inside the recipe data into `file:line: stage 'x', field 'a.b'`."""

    def __init__(self, path: Path, lines: dict[tuple, int]):
        self.path, self.lines, self.overridden = path, lines, {}

    def where(self, data_path: tuple, data: dict) -> str:
        for n in range(len(data_path), -1, -1):
            if data_path[:n] in self.overridden:
                origin = f"{self.path} (--set {self.overridden[data_path[:n]]})"
                break
            if data_path[:n] in self.lines:
                origin = f"{self.path}:{self.lines[data_path[:n]]}"
                break
        else:
            origin = str(self.path)
        parts = [origin]
        if len(data_path) >= 2 and data_path[0] == "stages" and isinstance(data_path[1], int):
            stage = _get(data, data_path[:2])
            label = (stage.get("name") or stage.get("kind") or "?") if isinstance(stage, dict) else "?"
            parts.append(f"stage '{label}' (stages[{data_path[1]}])")
            field_path = data_path[2:]
        else:
            field_path = data_path
        if field_path:
            parts.append("field '" + ".".join(str(p) for p in field_path) + "'")
        return parts[0] + ": " + ", ".join(parts[1:]) if len(parts) > 1 else parts[0]

    def explain(self, err: dict, data: dict) -> str:
        data_path = _data_path(err["loc"], data)
        kind = err["type"]
        if kind == "extra_forbidden":
            key = data_path[-1]
            known = _known_fields(err["loc"][:-1])
            hint = difflib.get_close_matches(str(key), known, n=1)
            msg = f"unknown key '{key}'" + (
                f"; did you mean '{hint[0]}'?" if hint else f"; allowed keys: {', '.join(known)}"
            )
        elif kind == "missing":
            msg = "required field is missing"
        elif kind == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == PLAIN_NAME:
            msg = (
                f"{err['input']!r} is not a plain name: use letters, digits, '_', '.' and '-', starting with a "
                "letter or digit (it becomes a folder or file name)"
            )
        elif kind == "union_tag_invalid":
            kinds = ", ".join(_stage_kind(c) for c in STAGE_KINDS)
            msg = f"unknown stage kind {err['input'].get('kind')!r}; known kinds: {kinds}"
        elif len(data_path) == 2 and data_path[0] == "stages" and not isinstance(err.get("input"), dict):
            msg = f"a stage is a mapping such as {{name: prune, kind: prune, ...}} (got {err.get('input')!r})"
        elif kind == "union_tag_not_found":
            msg = "each stage needs a `kind` (" + ", ".join(_stage_kind(c) for c in STAGE_KINDS) + ")"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], (dict, list)):
                msg += f" (got {err['input']!r})"
        return f"{self.where(data_path, data)}: {msg}"

    def error(self, data_path: tuple, data: dict, message: str) -> RecipeError:
        return RecipeError(f"{self.where(data_path, data)}: {message}")


def _data_path(loc: tuple, data: Any) -> tuple:
    """Drop the discriminator tags pydantic inserts into error locations, keeping real keys and indexes."""
    path, node = [], data
    for part in loc:
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            path.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and part == node.get("kind"):
            continue  # discriminated-union tag
        else:
            path.append(part)
            node = None
    return tuple(path)


def _known_fields(loc: tuple) -> list[str]:
    """Field names of the model class at a validation location (for 'did you mean')."""
    cls: Any = Recipe
    for part in loc:
        cls = _unwrap(cls, part)
        if cls is None:
            return []
    return sorted(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def _unwrap(annotation: Any, part: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if part in annotation.model_fields:
            return annotation.model_fields[part].annotation
        return None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _unwrap(args[0], part)
    if origin in (list, tuple) and isinstance(part, int):
        return args[0]
    if origin is dict:
        return args[1]
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        for member in args:
            if isinstance(member, type) and issubclass(member, StageConfig) and _stage_kind(member) == part:
                return member
        members = [a for a in args if a is not type(None)]
        return _unwrap(members[0], part) if len(members) == 1 else None
    return None


def _stage_kind(cls: type[StageConfig]) -> str:
    return typing.get_args(cls.model_fields["kind"].annotation)[0]


def _get(data: Any, path: tuple) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


# ---------------------------------------------------------------- overrides


def apply_override(data: dict, item: str, where: Locator) -> None:
    """Apply `a.b.c=value` (torchtune style). Stages are addressed by name: `stages.prune.target.params=0.5`."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. stages.distill.tokens=5000")
    try:
        value = safe_yaml.load(raw) if raw else ""
    except safe_yaml.YamlInputError as e:
        raise RecipeError(f"--set {key}: {e}") from None
    except yaml.YAMLError:
        value = raw
    parts: list[Any] = key.split(".")
    node: Any = data
    path: list[Any] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            names = [s.get("name") if isinstance(s, dict) else None for s in node]
            if part.isdigit():
                if int(part) >= len(node):
                    raise RecipeError(
                        f"--set {key}: {'.'.join(map(str, path))} has {len(node)} item(s), so index {part} is out of "
                        f"range; use 0 to {len(node) - 1}" + (" or a stage's name" if path == ["stages"] else "")
                    )
                part = int(part)
            elif part in names:
                part = names.index(part)
            elif path == ["stages"]:
                shown = ", ".join(str(n) for n in names if n is not None) or "none"
                raise RecipeError(f"--set {key}: no stage named {part!r} (stages: {shown})")
            else:
                raise RecipeError(f"--set {key}: {'.'.join(map(str, path))} is a list; address its items by index")
        elif not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {'.'.join(map(str, path))} is not a mapping")
        path.append(part)
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
    where.overridden[tuple(path)] = key


# ---------------------------------------------------------------- cross-field checks


def check_recipe(recipe: Recipe, where: Locator) -> None:
    """Checks that span fields: names, references to data, stage order, gate metrics."""
    data = recipe.model_dump(mode="json")
    for path, value in recipe.evaluation.data_references().items():
        if value not in recipe.data:
            raise where.error(
                path,
                data,
                f"no data source named {value!r}; define it under `data:` (have: {', '.join(recipe.data) or 'none'})",
            )
    for name, spec in recipe.data.items():
        prompts = spec.generate.prompts if spec.generate else None
        if prompts is not None and (prompts not in recipe.data or prompts == name):
            raise where.error(
                ("data", name, "generate", "prompts"),
                data,
                f"no other data source named {prompts!r} to take prompts from",
            )
    problems = task_problems(recipe.evaluation.lm_eval) if recipe.evaluation.lm_eval else {}
    if problems:  # a task that does not exist has no metrics to check gates against
        raise RecipeError("\n".join(where.where(path, data) + ": " + msg for path, msg in problems.items()))
    evaluation_metrics = gate_metric_names(recipe.evaluation)
    seen: dict[str, int] = {}
    fmt, producer = HF, "the teacher"
    formats = {"teacher": (HF, "the teacher")}
    rounding: dict[str, int | None] = {"teacher": None}  # the width rounding of the last prune upstream of each stage
    previous = "teacher"
    for i, stage in enumerate(recipe.stages):
        always = set(ALWAYS_MEASURED_EXPORT if stage.produces in (ONNX, GGUF) else ALWAYS_MEASURED)
        evaluated = always | evaluation_metrics
        if stage.name == "teacher":
            raise where.error(
                ("stages", i, "name"), data, "'teacher' is reserved for the input model; rename the stage"
            )
        if stage.name in seen:
            raise where.error(
                ("stages", i, "name"),
                data,
                f"duplicate stage name {stage.name!r} (also stages[{seen[stage.name]}]); names must be unique",
            )
        seen[stage.name] = i
        for field_name, value in stage.data_references().items():
            if value not in recipe.data:
                raise where.error(
                    ("stages", i, *field_name.split(".")),
                    data,
                    f"no data source named {value!r}; define it under `data:` (have: {', '.join(recipe.data) or 'none'})",
                )
        if stage.input is not None:
            if stage.input not in formats:
                raise where.error(
                    ("stages", i, "input"),
                    data,
                    f"{stage.input!r} is not an earlier stage; choose one of: {', '.join(formats)}",
                )
            fmt, producer = formats[stage.input]
        if fmt not in stage.consumes:
            raise where.error(
                ("stages", i, "kind"),
                data,
                f"kind {stage.kind} needs a {' or '.join(sorted(stage.consumes))} artifact, but it follows "
                f"{producer}, which produces {fmt}; reorder the stages",
            )
        fmt, producer = stage.produces, f"stage '{stage.name}'"
        formats[stage.name] = (fmt, producer)
        upstream = rounding[stage.input or previous]
        rounding[stage.name] = stage.width_rounding if isinstance(stage, PruneConfig) else upstream
        previous = stage.name
        round_to = rounding[stage.name]
        if getattr(stage, "quantize", None) in GGUF_K_QUANTS and round_to and round_to % K_QUANT_BLOCK:
            raise where.error(
                ("stages", i, "quantize"),
                data,
                f"{stage.quantize} packs rows in blocks of 256, but the prune stage before it rounds widths to "
                f"{round_to}; set round_to: 256 there (llama.cpp silently uses another type for rows that do "
                "not fit), or export q4_1 / q8_0",
            )
        for g, gate in enumerate(stage.gates):
            _check_gate(gate, ("stages", i, "gates", g), evaluated, stage.metrics, where, data)


def _check_gate(gate, path: tuple, evaluated: set[str], stage_metrics: frozenset[str], where: Locator, data) -> None:
    available = evaluated | stage_metrics
    if not metric_is_known(gate.metric, available) and gate.metric.split(".")[0] not in stage_metrics:
        raise where.error(
            (*path, "metric"),
            data,
            f"gate on {gate.metric!r}, which this run does not measure; measured: {', '.join(sorted(available))}",
        )
    if gate.relative_to and not metric_is_known(gate.metric, evaluated):
        raise where.error(
            (*path, "relative_to"),
            data,
            f"{gate.metric!r} is only measured by this stage, so it has no {gate.relative_to} value to compare with",
        )
    if gate.relative_to == "teacher" and gate.metric.startswith("agreement."):
        raise where.error(
            (*path, "relative_to"),
            data,
            "agreement is measured against the teacher, so it has no teacher value; use an absolute bound (min/max)",
        )
    if gate.above_chance and not (gate.metric.startswith("tasks.") and gate.metric.count(".") == 2):
        raise where.error(
            (*path, "above_chance"),
            data,
            "above_chance applies to a multiple-choice task's accuracy, e.g. metric: tasks.piqa.acc",
        )


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_defaults=False), sort_keys=False)
