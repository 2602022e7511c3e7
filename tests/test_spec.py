from pathlib import Path

import pytest
import yaml

from recsys.spec import DEFAULT_SPEC_PATH, SpecError, load_spec, parse_spec


def test_default_spec_describes_aliccp(spec):
    assert spec.name == "aliccp"
    assert spec.user_id == "user_id" and spec.item_id == "item_id"
    assert set(spec.context_features) == {"position", "location", "device"}
    assert spec.primary_target == "click"
    assert len(spec.columns) == 28
    assert set(spec.features).isdisjoint({spec.user_id, spec.item_id, spec.timestamp, *spec.targets})


def _raw() -> dict:
    return yaml.safe_load(DEFAULT_SPEC_PATH.read_text())


def test_role_naming_an_unknown_column_is_refused():
    raw = _raw()
    raw["roles"]["item_features"].append("item_colour")
    with pytest.raises(SpecError, match="item_colour"):
        parse_spec(raw, "my.yaml")


def test_unsupported_type_names_the_column():
    raw = _raw()
    raw["columns"]["position"] = "decimal"
    with pytest.raises(SpecError, match=r"columns\.position.*decimal"):
        parse_spec(raw, "my.yaml")


def test_a_column_with_two_roles_is_refused():
    raw = _raw()
    raw["roles"]["user_features"].append("position")
    with pytest.raises(SpecError, match="more than one role: position"):
        parse_spec(raw, "my.yaml")


def test_missing_field_and_missing_file_are_named(tmp_path: Path):
    raw = _raw()
    del raw["roles"]["timestamp"]
    with pytest.raises(SpecError, match=r"my\.yaml: missing field 'timestamp'"):
        parse_spec(raw, "my.yaml")
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
