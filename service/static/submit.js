// The submit form. Only the fields the user fills are sent: the auto recipe keeps every
// field set by hand and picks the rest, so a blank field means "let the recipe decide".

import { api } from "./api.js";
import { h, notice, replace, section } from "./ui.js";

const PRESETS = {
  quick: {
    label: "Quick check",
    help: "one short epoch at a small size: is the data usable?",
    values: { recipe: "auto", epochs: "1", image_size: "64", time_budget_seconds: "60" },
  },
  auto: {
    label: "Automatic",
    help: "the recipe measures the data and this machine and picks everything",
    values: { recipe: "auto" },
  },
  thorough: {
    label: "Thorough",
    help: "the automatic recipe with a 30-minute budget",
    values: { recipe: "auto", time_budget_seconds: "1800", augmentation: "standard" },
  },
};

const FIELDS = ["recipe", "backbone", "strategy", "epochs", "image_size", "batch_size", "learning_rate", "augmentation", "time_budget_seconds"];

function field(id, label, control, help) {
  control.id = id;
  control.name = id;
  return h(
    "div",
    { class: "field" },
    h("label", { for: id }, label),
    control,
    help ? h("small", { class: "muted", id: `${id}-help` }, help) : null,
  );
}

function select(options) {
  return h(
    "select",
    {},
    options.map(([value, text, disabled]) => h("option", { value, disabled: !!disabled }, text)),
  );
}

export async function submitView(main, datasetId) {
  replace(main, h("p", { class: "muted" }, "Loading…"));
  let datasets;
  let backbones;
  try {
    [datasets, backbones] = await Promise.all([api("/v1/datasets?limit=500"), api("/v1/backbones")]);
  } catch (err) {
    return notice(main, err.message);
  }
  if (!datasets.data.length) {
    return replace(
      main,
      h("h1", {}, "New training job"),
      h("p", {}, "Upload a dataset first: ", h("a", { href: "#/datasets" }, "Datasets"), "."),
    );
  }
  const c = {
    dataset_id: select(datasets.data.map((d) => [d.id, `${d.name} (${d.num_images} images, ${d.num_classes} classes)`])),
    recipe: select([
      ["auto", "auto: measure, then pick what is not set"],
      ["manual", "manual: the fields as given"],
    ]),
    backbone: select([
      ["", "chosen by the recipe"],
      ...backbones.data.map((b) => [
        b.name,
        `${b.name} · ${b.params_millions.toFixed(1)} M params · ${b.weights_available ? "weights available" : "weights missing"}`,
        !b.weights_available,
      ]),
    ]),
    strategy: select([
      ["", "chosen by the recipe"],
      ["lp_ft", "lp_ft: linear probe, then fine-tune"],
      ["linear_probe", "linear_probe: train the head only"],
      ["full", "full: fine-tune everything"],
      ["gradual", "gradual: unfreeze block by block"],
    ]),
    epochs: h("input", { type: "number", min: 1, max: 500, step: 1 }),
    image_size: h("input", { type: "number", min: 32, max: 1024, step: 1 }),
    batch_size: h("input", { type: "number", min: 1, max: 1024, step: 1 }),
    learning_rate: h("input", { type: "number", min: 0, max: 1, step: "any" }),
    augmentation: select([
      ["", "light (default)"],
      ["none", "none"],
      ["light", "light"],
      ["standard", "standard"],
      ["strong", "strong"],
    ]),
    time_budget_seconds: h("input", { type: "number", min: 5, step: 1 }),
  };
  if (datasetId) c.dataset_id.value = datasetId;
  const status = h("div", { class: "status" });

  function applyPreset(name) {
    for (const f of FIELDS) c[f].value = "";
    c.recipe.value = "auto";
    for (const [k, v] of Object.entries(PRESETS[name].values)) c[k].value = v;
  }

  const presets = h(
    "fieldset",
    { class: "presets" },
    h("legend", {}, "Preset"),
    Object.entries(PRESETS).map(([key, p]) =>
      h(
        "label",
        { class: "preset" },
        h("input", { type: "radio", name: "preset", value: key, checked: key === "auto", onchange: () => applyPreset(key) }),
        ` ${p.label} `,
        h("small", { class: "muted" }, p.help),
      ),
    ),
  );

  async function onSubmit(e) {
    e.preventDefault();
    const body = { dataset_id: c.dataset_id.value, recipe: c.recipe.value };
    for (const f of ["backbone", "strategy"]) if (c[f].value) body[f] = c[f].value;
    for (const f of ["epochs", "image_size", "batch_size"]) if (c[f].value) body[f] = parseInt(c[f].value, 10);
    for (const f of ["learning_rate", "time_budget_seconds"]) if (c[f].value) body[f] = parseFloat(c[f].value);
    if (c.augmentation.value) body.augmentation = { preset: c.augmentation.value };
    button.disabled = true;
    notice(status, "Submitting…", "info");
    try {
      const job = await api("/v1/jobs", { method: "POST", json: body });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      notice(status, `The job was refused: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  }

  const button = h("button", { type: "submit" }, "Start training");
  replace(
    main,
    h("h1", {}, "New training job"),
    section(
      "What to train",
      h(
        "form",
        { class: "grid-form", onsubmit: onSubmit },
        field("dataset_id", "Dataset", c.dataset_id),
        presets,
        field("recipe", "Recipe", c.recipe),
        field("backbone", "Backbone", c.backbone, "Backbones whose weights are not on this host cannot be chosen."),
        field("strategy", "Strategy", c.strategy),
        field("epochs", "Epochs", c.epochs),
        field("image_size", "Image size (px)", c.image_size),
        field("batch_size", "Batch size", c.batch_size),
        field("learning_rate", "Learning rate", c.learning_rate),
        field("augmentation", "Augmentation", c.augmentation),
        field("time_budget_seconds", "Time budget (seconds)", c.time_budget_seconds, "Blank: the recipe picks one (auto) or none (manual)."),
        h("div", { class: "actions" }, button),
        status,
      ),
    ),
  );
}
