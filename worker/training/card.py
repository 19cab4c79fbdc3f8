"""The model card: `README.md` in every model bundle, written from what the job measured.

A card says what the model is for and where it stops being trustworthy: the data it saw (the
dataset's hash, classes and split sizes), its held-out metrics overall and per class, how it
was trained (the recipe's choices), how to run it, and the limitations a user must know
before deploying it (small validation sets, weak classes, a refitted probe, warnings).
"""

from __future__ import annotations

from typing import Any


def _pct(value: Any) -> str:
    return f"{100 * float(value):.1f}%" if isinstance(value, (int, float)) else "n/a"


def _per_class_table(report: dict[str, Any]) -> list[str]:
    rows = report.get("per_class") or []
    if not rows:
        return []
    out = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for r in rows:
        name = str(r.get("class", "?")).replace("|", "\\|")
        out.append(
            f"| {name} | {_pct(r.get('precision'))} | {_pct(r.get('recall'))} | "
            f"{_pct(r.get('f1'))} | {r.get('support', r.get('positives', ''))} |"
        )
    return out


def _limitations(
    report: dict[str, Any], split: dict[str, Any], training: dict[str, Any], warnings: list[str]
) -> list[str]:
    notes = []
    n_val = int(report.get("num_samples") or 0)
    if n_val and n_val < 500:
        notes.append(
            f"The validation split has {n_val} images: one image moves accuracy by "
            f"{100 / n_val:.2f} points, so small differences between models are noise."
        )
    weak = [
        r["class"]
        for r in report.get("per_class") or []
        if isinstance(r.get("recall"), (int, float)) and r["recall"] < 0.7
    ]
    if weak:
        notes.append(f"Recall under 70% for: {', '.join(map(str, weak[:10]))}.")
    if training.get("refit"):
        notes.append(
            "The delivered head was refitted on the training and validation images together; "
            "the validation figures above are therefore not held out."
        )
    if split and split.get("source") != "dataset":
        notes.append(
            "The validation images were split off the training data; images from a "
            "different camera, domain or class balance may score lower."
        )
    notes.extend(warnings)
    notes.append(
        "The model only knows the classes listed above: it will assign one of them to any "
        "image, including images of none of them."
    )
    return notes


def render_card(
    metadata: dict[str, Any],
    report: dict[str, Any],
    split: dict[str, Any] | None,
    training: dict[str, Any],
    warnings: list[str],
) -> str:
    """Markdown for the bundle's README.md."""
    split = split or {}
    val = report.get("validation") or {}
    test = report.get("test") or {}
    config = metadata.get("train_config", {})
    multilabel = metadata.get("task") == "multi-label"
    lines = [
        f"# Model card: {metadata.get('backbone')} fine-tuned on {metadata.get('num_classes')} "
        "classes",
        "",
        f"Job `{metadata.get('job_id')}`, dataset `{metadata.get('dataset_id')}` "
        f"(sha256 `{str(metadata.get('dataset_sha256'))[:16]}…`).",
        "",
        "## Intended use",
        "",
        (
            "Multi-label image tagging: a sigmoid score per class, class i present when its "
            "score reaches `thresholds[i]` in metadata.json."
            if multilabel
            else "Single-label image classification into the classes below (softmax over "
            "the logits)."
        ),
        "Run `model.onnx` with onnxruntime (preprocessing in metadata.json: resize the shorter "
        f"side to {metadata.get('resize_size')} px ({metadata.get('interpolation')}), centre "
        f"crop {metadata.get('input_size', [0, 0])[1]} px, RGB, scale to [0, 1], normalise "
        "with `mean`/`std`), or rebuild it from `model.safetensors` with timm.",
        "",
        "## Data",
        "",
        f"- classes: {', '.join(map(str, metadata.get('class_names', [])))}",
        f"- training images: {split.get('train_used', split.get('train', 'n/a'))}; "
        f"validation images: {split.get('val', val.get('num_samples', 'n/a'))}"
        + (f"; test images: {test.get('num_samples')}" if test else ""),
        f"- validation split: {split.get('source', 'n/a')}",
        "",
        "## Metrics",
        "",
    ]
    for name, rep in (("validation", val), ("test", test)):
        if not rep:
            continue
        if multilabel:
            lines.append(
                f"- {name}: mAP {_pct(rep.get('mean_average_precision'))}, micro-F1 "
                f"{_pct(rep.get('micro_f1'))}, macro-F1 {_pct(rep.get('macro_f1'))} "
                f"({rep.get('num_samples')} images)"
            )
        else:
            lines.append(
                f"- {name}: top-1 {_pct(rep.get('top1_accuracy'))}, top-5 "
                f"{_pct(rep.get('top5_accuracy'))}, macro-F1 {_pct(rep.get('macro_f1'))}, "
                f"ECE {rep.get('ece', 0):.3f} ({rep.get('num_samples')} images)"
            )
    table = _per_class_table(test or val)
    if table:
        lines += ["", f"Per class ({'test' if test else 'validation'}):", "", *table]
    recipe = training.get("recipe") or {}
    lines += [
        "",
        "## Training",
        "",
        f"- backbone `{config.get('backbone')}` ({metadata.get('library')}), strategy "
        f"`{config.get('strategy')}`, {config.get('epochs')} epochs, input "
        f"{config.get('image_size')} px, batch {config.get('batch_size')}, learning rate "
        f"{config.get('learning_rate')}, seed {config.get('seed')}",
    ]
    if recipe.get("reason"):
        lines.append(f"- recipe: {recipe['reason']}")
    onnx = metadata.get("onnx") or {}
    if onnx.get("top1_agreement") is not None:
        lines.append(
            f"- ONNX check: top-1 agreement with PyTorch {_pct(onnx['top1_agreement'])} on "
            f"{onnx['checked_images']} validation images, largest logit difference "
            f"{onnx['max_abs_logit_diff']:.1e}"
        )
    tta = metadata.get("tta_check") or {}
    if tta:
        used = "averages each image with its mirror" if tta.get("use") else "does not flip"
        lines.append(
            f"- test-time augmentation: serving {used} (on {tta['checked_images']} validation "
            f"images: {_pct(tta['accuracy'])} plain, {_pct(tta['accuracy_hflip'])} with the "
            "mirror averaged in)"
        )
    versions = metadata.get("library_versions") or {}
    if versions:
        lines.append("- libraries: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    lines += ["", "## Limitations", ""]
    lines += [f"- {note}" for note in _limitations(val, split, training, warnings)]
    return "\n".join(lines) + "\n"
