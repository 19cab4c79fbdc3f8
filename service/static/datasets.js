// Datasets: upload (drag and drop, with progress), the list, and one dataset's ingest
// report: classes and splits, sample sheet, duplicates, leakage, rejected files.

import { api, upload } from "./api.js";
import { authImage, bytes, dropZone, h, notice, num, replace, section, table, when } from "./ui.js";

export async function datasetsView(main) {
  const status = h("div", { class: "status" });
  const bar = h("progress", { max: 1, value: 0, hidden: true, "aria-label": "Upload progress" });
  const barText = h("span", { class: "muted", "aria-live": "polite" });
  const name = h("input", { id: "dataset-name", type: "text", maxlength: 200, placeholder: "optional" });
  const list = h("div", {}, h("p", { class: "muted" }, "Loading…"));

  async function send(files) {
    const form = new FormData();
    form.append("file", files[0]);
    if (name.value.trim()) form.append("name", name.value.trim());
    bar.hidden = false;
    bar.value = 0;
    notice(status, "");
    barText.textContent = `Uploading ${files[0].name}…`;
    try {
      const ds = await upload("/v1/datasets", form, (f) => {
        bar.value = f;
        barText.textContent = f < 1 ? `Uploading ${files[0].name}: ${Math.round(100 * f)}%` : "Checking the images…";
      });
      barText.textContent = `Uploaded: ${ds.num_images} images, ${ds.num_classes} classes.`;
      location.hash = `#/datasets/${ds.id}`;
    } catch (err) {
      bar.hidden = true;
      barText.textContent = "";
      notice(status, `Upload refused: ${err.message}`);
    }
  }

  replace(
    main,
    h("h1", {}, "Datasets"),
    section(
      "Upload a dataset",
      h(
        "p",
        { class: "muted" },
        "A .zip or .tar(.gz) of class folders (cat/001.jpg), train/val/test folders, or a CSV manifest.",
      ),
      h("div", { class: "field" }, h("label", { for: "dataset-name" }, "Name"), name),
      dropZone({
        id: "dataset-file",
        label: "Archive to upload",
        accept: ".zip,.tar,.tgz,.tar.gz,application/zip,application/x-tar,application/gzip",
        onFiles: send,
      }),
      h("div", { class: "progress-row" }, bar, barText),
      status,
    ),
    section("Your datasets", list),
  );

  try {
    const page = await api("/v1/datasets?limit=100");
    if (!page.data.length) return replace(list, h("p", { class: "muted" }, "No datasets yet."));
    replace(
      list,
      table(
        ["Name", "Images", "Classes", "Layout", "Size", "Uploaded", ""],
        page.data.map((d) => [
          h("a", { href: `#/datasets/${d.id}` }, d.name),
          d.num_images,
          d.num_classes,
          d.layout,
          bytes(d.size_bytes),
          when(d.created_at),
          h("a", { href: `#/submit/${d.id}`, class: "button small" }, "Train"),
        ]),
      ),
    );
  } catch (err) {
    notice(list, err.message);
  }
}

// The groups behind a count, folded: a dataset can have hundreds.
function examples(groups, what) {
  if (!groups || !groups.length) return null;
  return h(
    "details",
    {},
    h("summary", {}, `Show ${groups.length} ${what}`),
    h(
      "ul",
      { class: "groups" },
      groups.map((g) => h("li", {}, g.map((e) => `${e.path} (${e.class}${e.split ? `, ${e.split}` : ""})`).join("  ≡  "))),
    ),
  );
}

export async function datasetView(main, id) {
  replace(main, h("p", { class: "muted" }, "Loading…"));
  let ds;
  try {
    ds = await api(`/v1/datasets/${encodeURIComponent(id)}`);
  } catch (err) {
    return notice(main, err.message);
  }
  // Columns per split only when the archive had splits (an unsplit one has just "unsplit").
  const splits = Object.keys(ds.splits).filter((sp) => sp !== "unsplit" || Object.keys(ds.splits).length > 1);
  const dup = ds.duplicates || {};
  const leak = ds.leakage || {};
  const conflicts = ds.conflicting_labels || {};
  const sizes = ds.image_sizes || {};
  const size = (d) => (d ? `${d.min} / ${d.median} / ${d.max}` : "–");
  replace(
    main,
    h("p", {}, h("a", { href: "#/datasets" }, "← Datasets")),
    h("h1", {}, ds.name),
    h(
      "div",
      { class: "actions" },
      h("a", { href: `#/submit/${ds.id}`, class: "button" }, "Train a model on this dataset"),
    ),
    section(
      "Ingest report",
      h(
        "dl",
        { class: "facts" },
        [
          ["Images", ds.num_images],
          ["Classes", ds.num_classes],
          ["Task", ds.task],
          ["Layout", `${ds.layout} (${ds.format})`],
          ["Size", bytes(ds.size_bytes)],
          ["Imbalance (largest / smallest class)", num(ds.imbalance_ratio, 2)],
          ["Width min / median / max", size(sizes.width)],
          ["Height min / median / max", size(sizes.height)],
          ["Rejected files", ds.num_rejected],
          ["Skipped files", ds.num_skipped],
        ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]),
      ),
      table(
        ["Class", "Images", ...splits],
        ds.classes.map((c) => [c.name, c.count, ...splits.map((s) => ds.splits[s][c.name] ?? 0)]),
        "Images per class and split",
      ),
    ),
    section("Samples", authImage(`/v1/datasets/${ds.id}/samples.png`, "Sample images per class", "sheet")),
    section(
      "Duplicates and leakage",
      h(
        "p",
        { class: leak.groups ? "notice warning" : "" },
        leak.groups
          ? `${leak.groups} group(s) leak across splits: ${leak.detail || ""}`
          : "No image appears in more than one split.",
      ),
      examples(leak.examples, "leaking group(s)"),
      h("p", {}, `${dup.exact_groups || 0} exact duplicate group(s), ${dup.near_groups || 0} near-duplicate group(s).`),
      examples(dup.exact, "exact duplicate group(s)"),
      examples(dup.near, "near-duplicate group(s)"),
      conflicts.groups ? h("p", { class: "notice warning" }, `${conflicts.groups} identical image group(s) carry different labels.`) : null,
      examples(conflicts.examples, "conflicting group(s)"),
    ),
    ds.rejected.length || ds.skipped.length
      ? section(
          "Files left out",
          table(["File", "Why"], [...ds.rejected, ...ds.skipped].map((f) => [f.path, f.reason])),
        )
      : null,
  );
}
