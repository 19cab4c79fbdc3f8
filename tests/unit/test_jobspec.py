"""The job spec: one definition, defaults resolved per backbone, unknown keys refused."""

import pytest

from core.backbones import BACKBONES
from core.jobspec import (
    ConfigInvalid,
    JobConfig,
    JobCreate,
    JobSpec,
    parse_job_config,
    pinned_fields,
)


def test_the_request_body_is_the_spec_plus_the_job_envelope():
    assert set(JobCreate.model_fields) - set(JobSpec.model_fields) == {
        "dataset_id",
        "max_duration_seconds",
        "webhook_url",
    }
    assert set(JobConfig.model_fields) - set(JobCreate.model_fields) == {
        "dataset_sha256",
        "pinned",
        "plan",
    }


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_each_backbone_gets_its_own_input_size_and_normalization(name):
    spec = JobSpec(backbone=name)
    backbone = BACKBONES[name]
    assert spec.image_size == backbone.input_size
    assert spec.mean == backbone.mean and spec.std == backbone.std


def test_a_stored_config_round_trips_unchanged():
    stored = JobCreate(dataset_id="ds_1", backbone="efficientnet_lite1").model_dump(mode="json")
    envelope = {"dataset_sha256": None, "pinned": None, "plan": None}
    assert parse_job_config(stored).model_dump(mode="json") == {**stored, **envelope}


def test_pinned_fields_are_what_the_caller_set_not_the_filled_in_defaults():
    spec = JobCreate(dataset_id="ds_1", epochs=3, augmentation={"hflip": False})
    # image_size, mean and std are filled in from the backbone: not the caller's.
    assert pinned_fields(spec) == ["augmentation", "epochs"]
    assert spec.image_size == 224
    assert pinned_fields(JobCreate(dataset_id="ds_1", image_size=96)) == ["image_size"]


def test_unknown_keys_are_refused_with_their_names_not_dropped():
    stored = JobCreate(dataset_id="ds_1").model_dump(mode="json")
    stored["augmentation"]["warp"] = 1
    with pytest.raises(ConfigInvalid, match=r"does not know: augmentation\.warp"):
        parse_job_config({**stored})
    with pytest.raises(ConfigInvalid, match="does not know: turbo"):
        parse_job_config({**JobCreate(dataset_id="ds_1").model_dump(mode="json"), "turbo": True})


def test_values_out_of_range_in_a_stored_config_are_refused():
    stored = JobCreate(dataset_id="ds_1").model_dump(mode="json")
    with pytest.raises(ConfigInvalid, match="epochs"):
        parse_job_config({**stored, "epochs": 0})
