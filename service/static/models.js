// Models: the registry (every succeeded job's model, by name and version) and trying a
// model: drop an image for its predictions, then ask for a Grad-CAM overlay.

import { api, blobUrl, request } from "./api.js";
import { dropZone, h, notice, pct, replace, section, table, when } from "./ui.js";

const STAGES = ["none", "staging", "production", "archived"];

export async function modelsView(main) {
  replace(main, h("h1", {}, "Models"), h("p", { class: "muted" }, "Loading…"));
  let page;
  try {
    page = await api("/v1/models?limit=100");
  } catch (err) {
    return notice(main, err.message);
  }
  const status = h("div", { class: "status" });
  const tryBox = h("div");
  function stageControl(m) {
    const id = `stage-${m.id}`;
    const sel = h("select", { id }, STAGES.map((s) => h("option", { value: s, selected: s === m.stage }, s)));
    sel.addEventListener("change", async () => {
      try {
        await api(`/v1/models/${encodeURIComponent(m.id)}`, { method: "PATCH", json: { stage: sel.value } });
        notice(status, `${m.name} v${m.version} is now ${sel.value}.`, "info");
      } catch (err) {
        notice(status, err.message);
        sel.value = m.stage;
      }
    });
    return [h("label", { for: id, class: "visually-hidden" }, `Stage of ${m.name} v${m.version}`), sel];
  }
  replace(
    main,
    h("h1", {}, "Models"),
    page.data.length
      ? section(
          "Registry",
          table(
            ["Model", "Version", "Stage", "Backbone", "Val. accuracy", "Job", "Created", ""],
            page.data.map((m) => [
              m.name,
              `v${m.version}`,
              stageControl(m),
              m.backbone || "–",
              pct(m.metrics && m.metrics.val_accuracy),
              h("a", { href: `#/jobs/${m.job_id}` }, m.job_id),
              when(m.created_at),
              h("button", {
                type: "button",
                class: "small secondary",
                onclick: () => replace(tryBox, tryModel(`/v1/models/${encodeURIComponent(m.id)}`, `${m.name} v${m.version}`)),
              }, "Try it"),
            ]),
          ),
          status,
        )
      : h("p", { class: "muted" }, "No models yet: a job that succeeds registers its model here."),
    tryBox,
  );
}

async function explain(base, file, box) {
  const form = new FormData();
  form.append("file", file);
  replace(box, h("p", { class: "muted", role: "status" }, "Computing the Grad-CAM overlay…"));
  try {
    let doc = await (await request(`${base}/explain`, { method: "POST", body: form })).json();
    const deadline = Date.now() + 120000;
    while (doc.status === "pending" && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 1000));
      doc = await (await request(doc.status_url)).json();
    }
    if (doc.status !== "done") throw new Error(doc.status === "failed" ? "the explanation failed" : "no answer yet: try again");
    const p = doc.prediction;
    replace(
      box,
      h("img", { src: await blobUrl(doc.image_url), alt: `Grad-CAM overlay for ${p.explained.label}`, class: "overlay" }),
      h("p", {}, `Heatmap for ${p.explained.label} (${pct(p.explained.probability)}).`),
    );
  } catch (err) {
    notice(box, `Grad-CAM: ${err.message}`);
  }
}

// Predictions (and an explanation) for images dropped on the box, from a job's or a
// registered model's routes: `base` is /v1/jobs/{id} or /v1/models/{ref}.
export function tryModel(base, title = "this model") {
  const results = h("div", { "aria-live": "polite" });
  async function predict(files) {
    const form = new FormData();
    for (const f of files) form.append("files", f);
    replace(results, h("p", { class: "muted" }, "Predicting…"));
    try {
      const doc = await (await request(`${base}/predict`, { method: "POST", body: form })).json();
      const first = files[0];
      const camBox = h("div");
      const preview = h("img", { src: URL.createObjectURL(first), alt: first.name, class: "preview" });
      replace(
        results,
        table(
          ["Image", "Top classes"],
          doc.data.map((d) => [d.filename, d.top.map((t) => `${t.label} ${pct(t.probability)}`).join(" · ")]),
          "Predictions",
        ),
        h(
          "div",
          { class: "side-by-side" },
          preview,
          h("div", {}, h("button", { type: "button", class: "secondary", onclick: () => explain(base, first, camBox) }, `Explain ${first.name} (Grad-CAM)`), camBox),
        ),
      );
    } catch (err) {
      notice(results, `Prediction failed: ${err.message}`);
    }
  }
  return section(
    `Try ${title}`,
    dropZone({ id: `predict-${base.replace(/\W+/g, "-")}`, label: "Images to classify", accept: "image/*", multiple: true, onFiles: predict }),
    results,
  );
}
