"""The job spec: the one definition of every training field, its range and its default.

`JobCreate` (the request body) is built from it; the worker validates the job's stored config
with `JobConfig` and refuses keys it does not know instead of dropping them. Defaults that
depend on the backbone (input size, mean/std) are resolved here, once, when the spec is
built, so the stored config says what actually ran. No torch, no FastAPI.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)

from core.augmentations import AUG_OPS
from core.backbones import BACKBONES, DEFAULT_BACKBONE, BackboneSpec
from core.search import SearchSpec

# Default backbone LR multiplier per strategy (head LR x this).
DEFAULT_BACKBONE_LR_MULT = {"full": 1.0, "lp_ft": 0.5, "gradual": 0.5, "linear_probe": 0.0}
Strategy = Literal["lp_ft", "full", "linear_probe", "gradual"]
# Per-channel normalization in the schema itself, so clients (and the fuzzer) see the bounds.
MeanValue = Annotated[float, Field(ge=-10.0, le=10.0)]
StdValue = Annotated[float, Field(gt=0.0, le=10.0)]


def _ops_json_schema(schema: dict[str, Any]) -> None:
    """The exact shape of each op (its name, its parameters and their ranges) in OpenAPI."""
    schema.clear()
    schema["oneOf"] = [
        {
            "type": "object",
            "title": name,
            "properties": {
                "name": {"const": name},
                **{
                    k: {"type": "number", "minimum": lo, "maximum": hi} for k, (lo, hi) in p.items()
                },
            },
            "required": ["name"],
            "additionalProperties": False,
        }
        for name, p in sorted(AUG_OPS.items())
    ]


class AugmentationOp(BaseModel):
    """One explicit op: `{"name": "rotation", "degrees": 10}`. See AUG_OPS for names and ranges."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_ops_json_schema)

    name: str

    @model_validator(mode="after")
    def _known_op(self) -> AugmentationOp:
        if self.name not in AUG_OPS:
            raise ValueError(
                f"unknown augmentation op {self.name!r}; available: {', '.join(sorted(AUG_OPS))}"
            )
        allowed = AUG_OPS[self.name]
        for key, value in (self.model_extra or {}).items():
            if key not in allowed:
                raise ValueError(
                    f"op {self.name!r} has no parameter {key!r}; "
                    f"it takes: {', '.join(sorted(allowed)) or 'none'}"
                )
            lo, hi = allowed[key]
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not lo <= value <= hi
            ):
                raise ValueError(f"op {self.name!r}: {key}={value!r} is outside [{lo}, {hi}]")
        return self

    def params(self) -> dict[str, Any]:
        """The op as a plain dict: `{"name": ..., **parameters}`."""
        return {"name": self.name, **(self.model_extra or {})}


class Augmentation(BaseModel):
    """Training-time augmentation: a preset, or an explicit list of ops.

    Presets: `none` (center crop), `light` (random resized crop + flip), `standard` (+
    TrivialAugmentWide + random erasing), `strong` (+ MixUp/CutMix). Flips are on by
    default; turn them off for digits, text and anything not mirror-symmetric."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["none", "light", "standard", "strong"] = "light"
    hflip: bool = True
    ops: list[AugmentationOp] | None = Field(None, max_length=20)
    mixup_alpha: float | None = Field(None, ge=0.0, le=10.0)
    cutmix_alpha: float | None = Field(None, ge=0.0, le=10.0)


class EarlyStopping(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: Literal["val_accuracy", "val_loss", "val_macro_f1"] = "val_accuracy"
    patience: int = Field(3, ge=1, le=100)
    min_delta: float = Field(0.0, ge=0.0, le=1.0)


MAX_GPUS = 8  # processes of one job (`gpus`): one host's GPUs
_BACKBONE_NAMES: list[JsonValue] = list(sorted(BACKBONES))


class JobSpec(BaseModel):
    """Every field a training run reads. Built by the API from the request and by the
    worker from the stored config; tests and benchmarks build it directly."""

    model_config = ConfigDict(extra="forbid")

    recipe: Literal["auto", "manual"] = Field(
        "auto",
        description="auto (default): the worker measures the data and the device, then picks "
        "the backbone, input size, strategy, epochs, learning rate and (when you set none) the "
        "time budget; every field you set yourself is kept as you set it. manual: the fields "
        "as given, their defaults for the rest",
    )
    backbone: str = Field(
        DEFAULT_BACKBONE, json_schema_extra={"enum": _BACKBONE_NAMES}
    )  # a plain str with an enum in the schema: the error below lists what is available
    strategy: Strategy = "lp_ft"
    epochs: int = Field(5, ge=1, le=500)
    probe_epochs: int = Field(
        100,
        ge=1,
        le=1000,
        description="iterations of the probe's L-BFGS solver per fit on the cached features "
        "(linear_probe, lp_ft; the probe is a logistic regression, its penalty chosen by "
        "cross-validation)",
    )
    batch_size: int = Field(32, ge=1, le=1024)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    backbone_lr_mult: float | None = Field(
        None, ge=0.0, le=10.0, description="backbone LR = head LR x this; default per strategy"
    )
    freeze_norm_stats: bool | None = Field(
        None,
        description="keep BatchNorm on its running statistics while fine-tuning (default: on "
        "for lp_ft, whose probed head was fitted to features computed that way)",
    )
    ema: bool | None = Field(
        None,
        description="evaluate and keep an exponential moving average of the weights while "
        "fine-tuning (smoother on small validation sets; default: on for lp_ft, whose "
        "average starts from the probed model; off for full and gradual, whose would start "
        "from a random head)",
    )
    layer_decay: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="layer-wise learning-rate decay while fine-tuning: each block down from "
        "the head trains at this factor of the one above (default: none, 1.0)",
    )
    optimizer: Literal["adamw", "sgd"] = "adamw"
    schedule: Literal["cosine", "onecycle", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(
        0.5,
        ge=0.0,
        le=50.0,
        description="epochs over which the learning rate rises (quadratically) from zero",
    )
    weight_decay: float | None = Field(
        None, ge=0.0, le=1.0, description="default: 0.05 with AdamW, 1e-4 with SGD"
    )
    label_smoothing: float = Field(0.0, ge=0.0, le=0.5)
    grad_clip_norm: float | None = Field(None, gt=0.0, le=1000.0)
    image_size: int | None = Field(
        None, ge=32, le=1024, description="input size; default: the backbone's (224, 240, 260…)"
    )
    mean: tuple[MeanValue, MeanValue, MeanValue] | None = Field(
        None, description="normalization mean per channel; default: the backbone's"
    )
    std: tuple[StdValue, StdValue, StdValue] | None = Field(
        None, description="normalization std per channel; default: the backbone's"
    )
    val_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    refit: bool = Field(
        True,
        description="when the linear probe is the model delivered, fit its head again on "
        "the training and validation images together (the final report's validation "
        "figures are then not held out; the report says so)",
    )
    max_train_images: int | None = Field(
        None,
        ge=2,
        description="train on at most this many of the training images, taken round robin "
        "over the classes (the auto recipe sets it when the time budget cannot afford a "
        "pass over all of them); default: all",
    )
    export_int8: bool = Field(
        False,
        description="also ship `model.int8.onnx`: static int8 quantization calibrated on "
        "training images, its accuracy change on the validation images recorded",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    early_stopping: EarlyStopping | None = None
    class_balance: Literal["auto", "none", "weighted_loss", "balanced_sampler"] = "auto"
    imbalance_threshold: float = Field(3.0, ge=1.0, le=1000.0)
    time_budget_seconds: float | None = Field(None, ge=5.0, le=7 * 24 * 3600.0)
    compile: bool = False
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="where the job trains: gpu (refused unless a live worker has a GPU), cpu, "
        "or auto (default: a GPU worker when one is live, else a CPU worker)",
    )
    gpus: int = Field(
        1,
        ge=1,
        le=MAX_GPUS,
        description="train this one job on this many GPUs at once (1 to 8: one process per "
        "GPU, DistributedDataParallel; `batch_size` is per GPU). More than 1 needs a live "
        "worker that sees that many GPUs (`finetune worker --gpus 0,1 --per-job`)",
    )
    augmentation: Augmentation = Field(default_factory=Augmentation)
    search: SearchSpec | None = Field(
        None,
        description="hyper-parameter search: `trials` runs, then the best trial's config "
        "trained longer (`retrain_best`), within `budget_seconds` in all; the better of the "
        "two by validation is the job's model",
    )

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        if v not in BACKBONES:
            raise ValueError(f"unknown backbone {v!r}; available: {', '.join(sorted(BACKBONES))}")
        return v

    @model_validator(mode="after")
    def _one_process_per_search_trial(self) -> JobSpec:
        if self.gpus > 1 and self.search is not None:
            raise ValueError(
                f"gpus {self.gpus} with `search`: search trials train in one process each; "
                "set gpus to 1, or drop `search`"
            )
        return self

    @model_validator(mode="after")
    def _resolve_backbone_defaults(self) -> JobSpec:
        # The one place backbone-dependent defaults are filled in.
        # Through __dict__: a filled-in default is not a field the caller set
        # (`model_fields_set`, which the auto recipe reads as "pinned").
        spec = BACKBONES[self.backbone]
        if self.image_size is None:
            self.__dict__["image_size"] = spec.input_size
        if self.mean is None:
            self.__dict__["mean"] = spec.mean
        if self.std is None:
            self.__dict__["std"] = spec.std
        return self

    # Derived values (not fields: they follow from the fields above).
    @property
    def spec(self) -> BackboneSpec:
        return BACKBONES[self.backbone]

    @property
    def input_size(self) -> int:
        assert self.image_size is not None  # resolved by the validator
        return self.image_size

    @property
    def resize_size(self) -> int:
        """Images are stored at this size; evaluation center-crops `image_size` out of it."""
        return int(round(self.input_size / self.spec.crop_pct))

    @property
    def effective_backbone_lr_mult(self) -> float:
        if self.backbone_lr_mult is not None:
            return self.backbone_lr_mult
        return DEFAULT_BACKBONE_LR_MULT[self.strategy]

    @property
    def effective_freeze_norm_stats(self) -> bool:
        if self.freeze_norm_stats is not None:
            return self.freeze_norm_stats
        return self.strategy == "lp_ft"

    @property
    def effective_ema(self) -> bool:
        return self.ema if self.ema is not None else self.strategy == "lp_ft"

    @property
    def effective_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 1e-4 if self.optimizer == "sgd" else 0.05

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class JobCreate(JobSpec):
    """The request body of `POST /v1/jobs`: the spec plus what the job runs on and for how
    long it may run."""

    dataset_id: str = Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$")
    max_duration_seconds: float | None = Field(
        None,
        ge=5.0,
        description="hard cap on the job's running time, all attempts together (default and "
        "maximum: the service's JOB_MAX_DURATION_SECONDS). At the limit the job stops, keeps "
        "its best model so far and ends failed with TIME_LIMIT_EXCEEDED",
    )
    webhook_url: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^[hH][tT][tT][pP][sS]?://",
        description="an http(s) URL that receives this job's signed events (job.running, "
        "job.succeeded, job.failed, job.canceled); its secret is in the create response only",
    )


class JobConfig(JobCreate):
    """What is stored on the job row (`jobs.config`) and what the worker reads back.

    `pinned`: the fields the user set in the request (the auto recipe leaves them alone).
    `plan`: the auto recipe's record, written by the worker once it has chosen (its choices,
    the candidates it scored and the measured speeds); the config's fields then hold what
    actually runs."""

    dataset_sha256: str | None = None
    pinned: list[str] | None = None
    plan: dict[str, Any] | None = None


def pinned_fields(spec: JobSpec) -> list[str]:
    """The training fields the caller set explicitly (pydantic's `model_fields_set`)."""
    return sorted(set(spec.model_fields_set) & set(JobSpec.model_fields))


class ConfigInvalid(ValueError):
    """A stored config this code cannot run: unknown keys or values out of range."""


def parse_job_config(raw: dict[str, Any]) -> JobConfig:
    """The stored config, validated; unknown keys are refused with their names, never
    dropped (a newer API than this worker, or a hand-edited row)."""
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        unknown = [
            ".".join(str(p) for p in e["loc"])
            for e in exc.errors()
            if e["type"] == "extra_forbidden"
        ]
        if unknown:
            raise ConfigInvalid(
                f"the job's config has keys this worker does not know: {', '.join(unknown)} "
                "(is the worker older than the API?); known keys: "
                f"{', '.join(sorted(JobConfig.model_fields))}"
            ) from exc
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigInvalid(f"the job's config is invalid: {problems}") from exc


def training_fields() -> list[str]:
    """The fields that reach training (the spec's own, not the job's envelope)."""
    return list(JobSpec.model_fields)
