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


def _with_kinds(continuous: list[str], multi_valued: dict) -> dict:
    raw = _raw()
    raw["columns"]["item_price"], raw["columns"]["item_tags"] = "float32", "string"
    raw["roles"]["item_features"] += ["item_price", "item_tags"]
    raw["continuous"], raw["multi_valued"] = continuous, multi_valued
    return raw


def test_continuous_and_multi_valued_features_are_read_with_their_options():
    spec = parse_spec(_with_kinds(["item_price"], {"item_tags": {"separator": ";", "max_tokens": 4}}), "my.yaml")

    assert spec.continuous == ("item_price",) and spec.multi_valued["item_tags"].separator == ";"
    assert [spec.feature_kind(name) for name in ("item_price", "item_tags", "item_brand")] == [
        "continuous", "multi_valued", "categorical"]  # fmt: skip
    # Categorify encodes the token lists, not the numbers.
    assert "item_tags" in spec.categorical_columns and "item_price" not in spec.categorical_columns
    assert parse_spec(_with_kinds([], {"item_tags": None}), "my.yaml").multi_valued["item_tags"].max_tokens == 8


@pytest.mark.parametrize(("continuous", "multi_valued", "message"), [
    (["item_tags"], {}, "continuous column 'item_tags' is string, not a number"),
    (["click"], {}, "continuous names 'click', which is not a feature"),
    ([], {"item_price": {}}, "multi_valued column 'item_price' is float32, not string"),
    ([], {"item_tags": {"max_tokens": 0}}, r"multi_valued\.item_tags\.max_tokens must be a positive integer"),
    ([], {"item_tags": {"sep": "|"}}, r"multi_valued\.item_tags may set separator and max_tokens only"),
])  # fmt: skip
def test_a_feature_kind_that_cannot_be_used_is_named(continuous: list[str], multi_valued: dict, message: str):
    raw = _with_kinds(continuous, multi_valued)
    with pytest.raises(SpecError, match=message):
        parse_spec(raw, "my.yaml")


def test_a_multi_valued_context_feature_is_refused():
    raw = _with_kinds([], {"location": {}})
    with pytest.raises(SpecError, match="multi_valued 'location' is a context feature"):
        parse_spec(raw, "my.yaml")
