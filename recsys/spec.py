"""The dataset spec: one YAML file that names every column's type and role.

Every step reads column names from here; nothing downstream knows AliCCP's column names.
Plain dataclasses (not pydantic) because the same module runs in both Python environments,
and the trainer environment is pinned to pydantic 1 by TensorFlow 2.12's typing-extensions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

# Types a spec may name, mapped to pyarrow type names (pyarrow is imported lazily by callers).
SUPPORTED_TYPES = ("int8", "int16", "int32", "int64", "float32", "float64", "string")

# `exclude_seen: all`: every interaction keeps its item out of that user's lists.
EVERY_INTERACTION = "all"

DEFAULT_SPEC_PATH = Path(__file__).resolve().parent.parent / "specs" / "aliccp.yaml"


class SpecError(ValueError):
    """A dataset spec that cannot be used; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Categorify:
    """How the NVTabular workflow encodes categorical columns."""

    freq_threshold: int = 0
    # Per-column caps for huge cardinalities: the N most frequent values keep their own id,
    # the rest share the out-of-vocabulary id.
    max_size: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MultiValued:
    """A column of tokens joined by `separator` (ML-1M's genres "Comedy|Romance"): an NVTabular list column.

    Each row keeps its first `max_tokens` tokens, padded to that width, so the models see a fixed-size list.
    """

    separator: str = "|"
    max_tokens: int = 8


@dataclasses.dataclass(frozen=True)
class Validation:
    """Thresholds for the Great Expectations suite."""

    max_null_fraction: float = 0.5
    value_ranges: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    # Glob patterns of the raw CSV files for each original split, e.g. {"train": "train*.csv"}.
    splits: dict[str, str]
    # Column name -> type, in the order the generator writes them.
    columns: dict[str, str]
    user_id: str
    item_id: str
    timestamp: str
    user_features: tuple[str, ...]
    item_features: tuple[str, ...]
    user_item_features: tuple[str, ...]
    context_features: tuple[str, ...]
    targets: tuple[str, ...]
    # Context columns whose values make a new visitor's segment (seed 000: location and device).
    segment_features: tuple[str, ...] = ()
    # The target whose positive rows are purchases: those items are not recommended to the buyer again.
    purchase_target: str | None = None
    # Which interactions keep an item from being recommended to that user again: EVERY_INTERACTION (any row,
    # whatever its targets; a rated movie), a tuple of targets (rows positive in any of them), or None for
    # the default, the purchase target's positives.
    exclude_seen: str | tuple[str, ...] | None = None
    # Features that are numbers, not categories (a price, an age): NVTabular fills missing values with the
    # median and normalizes them; the models take them as floats.
    continuous: tuple[str, ...] = ()
    # Features that hold several tokens each (genres): column -> how to split it.
    multi_valued: dict[str, MultiValued] = dataclasses.field(default_factory=dict)
    categorify: Categorify = Categorify()
    validation: Validation = Validation()
    source: str = "<memory>"

    @property
    def features(self) -> tuple[str, ...]:
        """Columns that count as features for null cleaning (ids, targets and time excluded)."""
        return self.user_features + self.item_features + self.user_item_features + self.context_features

    @property
    def excludes_every_interaction(self) -> bool:
        return self.exclude_seen == EVERY_INTERACTION

    @property
    def seen_targets(self) -> tuple[str, ...]:
        """The targets whose positive rows exclude the item (empty when every interaction does, or none)."""
        if self.exclude_seen is None:
            return (self.purchase_target,) if self.purchase_target else ()
        return () if isinstance(self.exclude_seen, str) else self.exclude_seen

    @property
    def categorical_columns(self) -> tuple[str, ...]:
        """The columns Categorify encodes: ids and every feature that is not continuous (multi-valued ones too)."""
        return (self.user_id, self.item_id, *(name for name in self.features if name not in self.continuous))

    def feature_kind(self, column: str) -> str:
        """"continuous", "multi_valued" or "categorical"."""
        if column in self.continuous:
            return "continuous"
        return "multi_valued" if column in self.multi_valued else "categorical"

    @property
    def primary_target(self) -> str:
        return self.targets[0]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data


def _require(raw: dict[str, Any], key: str, source: str) -> Any:
    if key not in raw:
        raise SpecError(f"{source}: missing field '{key}'")
    return raw[key]


def parse_spec(raw: dict[str, Any], source: str = "<memory>") -> DatasetSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec must be a YAML mapping")
    columns = _require(raw, "columns", source)
    if not isinstance(columns, dict) or not columns:
        raise SpecError(f"{source}: 'columns' must map column names to types")
    for column, type_name in columns.items():
        if type_name not in SUPPORTED_TYPES:
            raise SpecError(
                f"{source}: columns.{column}: unsupported type '{type_name}' (one of {', '.join(SUPPORTED_TYPES)})"
            )
    roles = _require(raw, "roles", source)

    def role_list(key: str) -> tuple[str, ...]:
        value = roles.get(key, [])
        if not isinstance(value, list):
            raise SpecError(f"{source}: roles.{key} must be a list of column names")
        return tuple(value)

    spec = DatasetSpec(
        name=str(_require(raw, "name", source)),
        splits=dict(_require(raw, "splits", source)),
        columns=dict(columns),
        user_id=_require(roles, "user_id", source),
        item_id=_require(roles, "item_id", source),
        timestamp=_require(roles, "timestamp", source),
        user_features=role_list("user_features"),
        item_features=role_list("item_features"),
        user_item_features=role_list("user_item_features"),
        context_features=role_list("context_features"),
        targets=role_list("targets"),
        segment_features=role_list("segment_features"),
        purchase_target=roles.get("purchase_target"),
        exclude_seen=_exclude_seen(raw, source),
        continuous=_name_list(raw, "continuous", source),
        multi_valued=_multi_valued(raw, source),
        categorify=Categorify(**raw.get("categorify", {})),
        validation=Validation(
            max_null_fraction=raw.get("validation", {}).get("max_null_fraction", 0.5),
            value_ranges={
                column: (float(bounds[0]), float(bounds[1]))
                for column, bounds in raw.get("validation", {}).get("value_ranges", {}).items()
            },
        ),
        source=source,
    )
    _check_roles(spec)
    return spec


def _name_list(raw: dict[str, Any], key: str, source: str) -> tuple[str, ...]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise SpecError(f"{source}: {key} must be a list of column names, not {value!r}")
    return tuple(value)


def _multi_valued(raw: dict[str, Any], source: str) -> dict[str, MultiValued]:
    value = raw.get("multi_valued") or {}
    if not isinstance(value, dict):
        raise SpecError(f"{source}: multi_valued must map column names to {{separator, max_tokens}}")
    result = {}
    for column, options in value.items():
        options = options or {}
        unknown = sorted(set(options) - {"separator", "max_tokens"}) if isinstance(options, dict) else None
        if unknown is None or unknown:
            raise SpecError(f"{source}: multi_valued.{column} may set separator and max_tokens only, not {options!r}")
        parsed = MultiValued(**options)
        if not isinstance(parsed.separator, str) or not parsed.separator:
            raise SpecError(f"{source}: multi_valued.{column}.separator must be a non-empty string")
        if not isinstance(parsed.max_tokens, int) or parsed.max_tokens < 1:
            raise SpecError(f"{source}: multi_valued.{column}.max_tokens must be a positive integer")
        result[str(column)] = parsed
    return result


def _exclude_seen(raw: dict[str, Any], source: str) -> str | tuple[str, ...] | None:
    value = raw.get("exclude_seen")
    if value is None or value == EVERY_INTERACTION:
        return value
    if not isinstance(value, list) or not all(isinstance(target, str) for target in value):
        raise SpecError(f"{source}: exclude_seen must be '{EVERY_INTERACTION}' or a list of targets, not {value!r}")
    return tuple(value)


def _check_roles(spec: DatasetSpec) -> None:
    named = [spec.user_id, spec.item_id, spec.timestamp, *spec.features, *spec.targets]
    for column in named:
        if column not in spec.columns:
            raise SpecError(f"{spec.source}: role names column '{column}', which is not in 'columns'")
    duplicated = sorted({column for column in named if named.count(column) > 1})
    if duplicated:
        raise SpecError(f"{spec.source}: columns with more than one role: {', '.join(duplicated)}")
    if not spec.targets:
        raise SpecError(f"{spec.source}: roles.targets must name at least one target")
    if not {"train", "test"} <= set(spec.splits):
        raise SpecError(f"{spec.source}: splits must name 'train' and 'test' file patterns")
    for column in spec.segment_features:
        if column not in spec.context_features:
            raise SpecError(f"{spec.source}: roles.segment_features names '{column}', which is not a context feature")
    if spec.purchase_target is not None and spec.purchase_target not in spec.targets:
        raise SpecError(f"{spec.source}: roles.purchase_target '{spec.purchase_target}' is not one of the targets")
    for target in spec.seen_targets:
        if target not in spec.targets:
            raise SpecError(f"{spec.source}: exclude_seen names '{target}', which is not one of the targets")
    for column in spec.continuous:
        if column not in spec.features:
            raise SpecError(f"{spec.source}: continuous names '{column}', which is not a feature")
        if not spec.columns[column].startswith(("float", "int")):
            raise SpecError(f"{spec.source}: continuous column '{column}' is {spec.columns[column]}, not a number")
    for column in spec.multi_valued:
        if column not in spec.features:
            raise SpecError(f"{spec.source}: multi_valued names '{column}', which is not a feature")
        if spec.columns[column] != "string":
            raise SpecError(f"{spec.source}: multi_valued column '{column}' is {spec.columns[column]}, not string")
        if column in spec.continuous:
            raise SpecError(f"{spec.source}: '{column}' is both continuous and multi_valued")
        if column in spec.context_features:  # a request sends one value per context feature
            raise SpecError(f"{spec.source}: multi_valued '{column}' is a context feature; only user, item and "
                            "user-item features may be multi-valued")
    for column in spec.segment_features:
        if spec.feature_kind(column) != "categorical":
            raise SpecError(f"{spec.source}: segment feature '{column}' must be a single-valued category")
    for column in spec.validation.value_ranges:
        if column not in spec.columns:
            raise SpecError(f"{spec.source}: validation.value_ranges names unknown column '{column}'")


def load_spec(path: str | Path | None = None) -> DatasetSpec:
    spec_path = Path(path) if path else DEFAULT_SPEC_PATH
    try:
        raw = yaml.safe_load(spec_path.read_text())
    except FileNotFoundError as error:
        raise SpecError(f"dataset spec not found: {spec_path}") from error
    except yaml.YAMLError as error:
        raise SpecError(f"{spec_path}: not valid YAML: {error}") from error
    return parse_spec(raw, source=str(spec_path))
