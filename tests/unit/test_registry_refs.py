"""Model references, names and tags of the registry (core/registry.py), without a database."""

from __future__ import annotations

import re

import pytest

from core.errors import ErrorCode, ServiceError
from core.registry import (
    MAX_TAGS,
    REF_PATTERN,
    Ref,
    check_name,
    check_tags,
    default_name,
    parse_ref,
)


@pytest.mark.parametrize(
    "ref, parsed",
    [
        ("pets", Ref("pets")),
        ("mdl_0123456789abcdef01234567", Ref("mdl_0123456789abcdef01234567")),
        ("pets@3", Ref("pets", version=3)),
        ("pets@12", Ref("pets", version=12)),
        ("pets@production", Ref("pets", stage="production")),
        ("pets@staging", Ref("pets", stage="staging")),
        ("my.pets_v2-x@1", Ref("my.pets_v2-x", version=1)),
        ("p" * 64 + "@999999999", Ref("p" * 64, version=999_999_999)),
    ],
)
def test_a_reference_names_a_model_by_id_name_version_or_stage(ref, parsed):
    assert parse_ref(ref) == parsed
    assert re.fullmatch(REF_PATTERN, ref)  # the pattern the API's OpenAPI schema states


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "Pets",
        "-pets",
        "pets@",
        "pets@0",
        "pets@03",
        "pets@-1",
        "pets@latest",
        "pets@archived",
        "pets@none",
        "pets@1@2",
        "@3",
        "p" * 65,
        "pets@1234567890",
        "pets\n",
        "pets/1",
    ],
)
def test_a_malformed_reference_is_refused_saying_what_is_accepted(ref):
    with pytest.raises(ServiceError) as err:
        parse_ref(ref)
    assert err.value.code == ErrorCode.VALIDATION_ERROR and err.value.status_code == 422
    assert "name@<version>" in err.value.detail and "name@production" in err.value.detail
    assert not re.fullmatch(REF_PATTERN, ref)


@pytest.mark.parametrize(
    "dataset_name, name",
    [
        ("pets", "pets"),
        ("My Pets (2024)", "my-pets-2024"),
        ("Éclairs & Crêpes", "eclairs-crepes"),
        ("  __weird__.zip  ", "weird__.zip"),
        ("猫", "model"),
        ("", "model"),
        ("x" * 300, "x" * 64),
        ("a" * 63 + " b", "a" * 63),
    ],
)
def test_a_dataset_name_becomes_a_valid_model_name(dataset_name, name):
    assert default_name(dataset_name) == name
    assert check_name(default_name(dataset_name)) == name


@pytest.mark.parametrize("name", ["Pets", "-pets", "pets!", "p" * 65, "", "pets@1"])
def test_a_bad_name_is_refused_with_the_rule(name):
    with pytest.raises(ServiceError) as err:
        check_name(name)
    assert err.value.code == ErrorCode.VALIDATION_ERROR and "a-z, 0-9" in err.value.detail


def test_tags_are_deduplicated_in_order_and_bounded():
    assert check_tags(["b", "a", "b", "env:prod"]) == ["b", "a", "env:prod"]
    assert check_tags([f"t{i}" for i in range(MAX_TAGS)] * 2) == [f"t{i}" for i in range(20)]
    with pytest.raises(ServiceError, match=f"at most {MAX_TAGS}"):
        check_tags([f"t{i}" for i in range(MAX_TAGS + 1)])
    for bad in ("Upper", 'quo"te', "back\\slash", "", "x" * 51, "%"):
        with pytest.raises(ServiceError, match="is not valid"):
            check_tags(["ok", bad])
