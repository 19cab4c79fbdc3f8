// Jobs: the list, and one job's page: live progress (server-sent events when the API
// has them, else polling), curves, and once it succeeded the report, confusion matrix,
// per-class table, label issues, downloads and a place to try the model.

import { api, download, streamEvents } from "./api.js";
import { confusionMatrix, curves } from "./charts.js";
import { tryModel } from "./models.js";
import { badge, duration, h, notice, num, pct, replace, section, table, when } from "./ui.js";

const TERMINAL = ["succeeded", "failed", "canceled"];
const FORMATS = [
  ["zip", "Model bundle (.zip)"],
  ["onnx", "ONNX"],
  ["safetensors", "safetensors weights"],
  ["torchscript", "TorchScript"],
  ["card", "Model card"],
];

export async function jobsView(main) {
  replace(main, h("h1", {}, "Jobs"), h("p", { class: "muted" }, "Loading…"));
  try {
    const page = await api("/v1/jobs?limit=100");
    replace(
      main,
      h("h1", {}, "Jobs"),
      h("div", { class: "actions" }, h("a", { href: "#/submit", class: "button" }, "New training job")),
      page.data.length
        ? table(
            ["Job", "Status", "Backbone", "Progress", "Best val. accuracy", "Created"],
            page.data.map((j) => [
              h("a", { href: `#/jobs/${j.id}` }, j.id),
              badge(j.status),
              j.config.backbone || "–",
              pct(j.progress.fraction),
              pct(j.best_metrics && j.best_metrics.val_accuracy),
              when(j.created_at),
            ]),
          )
        : h("p", { class: "muted" }, "No jobs yet."),
    );
  } catch (err) {
    notice(main, err.message);
  }
}

function progressText(job) {
  const p = job.progress;
  const parts = [];
  if (p.phase) parts.push(p.phase);
  if (p.total_epochs) parts.push(`epoch ${p.epoch} of ${p.total_epochs}`);
  if (p.total_steps) parts.push(`step ${p.step} of ${p.total_steps}`);
  if (p.eta_seconds !== null && !TERMINAL.includes(job.status)) parts.push(`about ${duration(p.eta_seconds)} left`);
  return `${pct(p.fraction)}${parts.length ? ` · ${parts.join(" · ")}` : ""}`;
}

function reportSection(report) {
  const v = report.validation || {};
  const per = v.per_class || [];
  return [
    section(
      "Evaluation (validation split)",
      h(
        "dl",
        { class: "facts" },
        [
          ["Top-1 accuracy", pct(v.top1_accuracy)],
          ["Top-5 accuracy", pct(v.top5_accuracy)],
          ["Macro F1", num(v.macro_f1)],
          ["Calibration error (ECE)", num(v.ece)],
          ["Images", v.num_samples ?? "–"],
        ].map(([k, x]) => [h("dt", {}, k), h("dd", {}, String(x))]),
      ),
      v.held_out === false
        ? h(
            "p",
            { class: "notice warning" },
            "Not held out: the delivered head was refitted on the training and validation images " +
              "together, so these figures are optimistic. The best epoch's validation score above is held out.",
          )
        : null,
      report.warnings.length ? h("ul", { class: "notice warning" }, report.warnings.map((w) => h("li", {}, w))) : null,
    ),
    v.confusion_matrix ? section("Confusion matrix", confusionMatrix(report.classes, v.confusion_matrix)) : null,
    per.length
      ? section(
          "Per class",
          table(
            ["Class", "Precision", "Recall", "F1", "Images"],
            per.map((c) => [c.class, pct(c.precision), pct(c.recall), num(c.f1), c.support]),
          ),
        )
      : null,
  ];
}

async function labelIssues(jobId) {
  const box = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  try {
    const doc = await api(`/v1/jobs/${jobId}/label-issues?limit=20`);
    const label = (l) => (Array.isArray(l) ? l.join(", ") : l);
    replace(
      box,
      h("p", {}, `${doc.count} of ${doc.images} training images may be mislabelled (${doc.method}).`),
      doc.data.length
        ? table(
            ["Image", "Given label", "Suggested", "Label quality"],
            doc.data.map((i) => [i.path, label(i.given_label), label(i.suggested_label), num(i.score, 2)]),
          )
        : null,
    );
  } catch (err) {
    replace(box, h("p", { class: "muted" }, err.message));
  }
  return section("Label issues", box);
}

export async function jobView(main, jobId, signal) {
  replace(main, h("p", { class: "muted" }, "Loading…"));
  const head = h("div");
  const bar = h("progress", { max: 1, value: 0, "aria-labelledby": "progress-label" });
  const barText = h("p", { id: "progress-label", "aria-live": "polite" });
  const facts = h("div");
  const controls = h("div", { class: "actions" });
  const charts = h("div", {}, curves([]));
  const results = h("div");
  const status = h("div", { class: "status" });
  replace(
    main,
    h("p", {}, h("a", { href: "#/jobs" }, "← Jobs")),
    head,
    section("Progress", h("div", { class: "progress-row" }, bar), barText, facts, controls, status),
    section("Loss and accuracy", charts),
    results,
  );

  let epochs = -1;
  let finished = false;
  let last = null;

  async function refreshCurves(job) {
    const count = job.latest_metrics ? job.latest_metrics.epoch : -1;
    if (count === epochs && !TERMINAL.includes(job.status)) return;
    epochs = count;
    const metrics = await api(`/v1/jobs/${jobId}/metrics`);
    replace(charts, curves(metrics.data));
  }

  async function finish(job) {
    finished = true;
    if (job.status !== "succeeded") return;
    const report = await api(`/v1/jobs/${jobId}/report`).catch(() => null);
    const downloads = section(
      "Downloads",
      h(
        "div",
        { class: "actions" },
        FORMATS.map(([fmt, text]) =>
          h("button", {
            type: "button",
            class: fmt === "zip" ? "" : "secondary",
            onclick: () => download(jobId, fmt).catch((err) => notice(status, `Download failed: ${err.message}`)),
          }, `Download ${text}`),
        ),
      ),
    );
    replace(results, downloads, report ? reportSection(report) : null, await labelIssues(jobId), tryModel(`/v1/jobs/${jobId}`));
  }

  function render(job) {
    last = job;
    replace(
      head,
      h("h1", {}, "Job ", h("code", {}, job.id), " ", badge(job.status)),
      h("p", { class: "muted" }, "Dataset ", h("a", { href: `#/datasets/${job.dataset_id}` }, job.dataset_id), ` · backbone ${job.config.backbone || "chosen by the recipe"} · created ${when(job.created_at)}`),
    );
    bar.value = job.progress.fraction || 0;
    barText.textContent = progressText(job);
    replace(
      facts,
      job.error ? h("p", { class: "notice error", role: "alert" }, `${job.error.code}: ${job.error.message}`) : null,
      job.warnings && job.warnings.length ? h("ul", { class: "notice warning" }, job.warnings.map((w) => h("li", {}, w))) : null,
      job.best_metrics ? h("p", {}, `Best epoch ${job.best_metrics.epoch}: validation accuracy ${pct(job.best_metrics.val_accuracy)}, loss ${num(job.best_metrics.val_loss)}`) : null,
    );
    if (TERMINAL.includes(job.status)) replace(controls);
    else if (!controls.childElementCount || job.cancel_requested) {
      const mode = h("select", { id: "cancel-mode" }, h("option", { value: "discard" }, "discard everything"), h("option", { value: "stop-and-keep" }, "keep the best epoch so far"));
      replace(
        controls,
        h("label", { for: "cancel-mode" }, "On cancel"),
        mode,
        h("button", {
          type: "button",
          class: "danger",
          disabled: job.cancel_requested,
          onclick: async (e) => {
            e.target.disabled = true;
            try {
              render(await api(`/v1/jobs/${jobId}/cancel`, { method: "POST", json: { mode: mode.value } }));
            } catch (err) {
              notice(status, `Cancel refused: ${err.message}`);
            }
          },
        }, job.cancel_requested ? "Canceling…" : "Cancel job"),
      );
    }
  }

  async function update(job) {
    render(job);
    await refreshCurves(job).catch(() => {});
    if (TERMINAL.includes(job.status) && !finished) await finish(job);
  }

  async function poll() {
    while (!finished && !signal.aborted) {
      try {
        await update(await api(`/v1/jobs/${jobId}`, { signal }));
      } catch (err) {
        if (signal.aborted) return;
        notice(status, err.message);
        if (err.status === 404) return;
      }
      await new Promise((r) => setTimeout(r, 1500));
    }
  }

  try {
    await update(await api(`/v1/jobs/${jobId}`, { signal }));
  } catch (err) {
    return notice(main, err.message);
  }
  if (finished) return;
  // Events say something changed; the job's own route says what (whatever the event holds).
  // One read at a time; events that arrive meanwhile ask for one more read after it.
  let busy = false;
  let again = false;
  async function onEvent() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    try {
      do {
        again = false;
        if (!finished) await update(await api(`/v1/jobs/${jobId}`, { signal }));
      } while (again && !finished);
    } catch {
      // the stream's end (or the polling after it) catches up
    } finally {
      busy = false;
    }
  }
  const streamed = await streamEvents(`/v1/jobs/${jobId}/events`, onEvent, signal).catch(() => false);
  if (!signal.aborted && !finished) {
    if (streamed && last) await update(await api(`/v1/jobs/${jobId}`, { signal }));
    await poll();
  }
}
