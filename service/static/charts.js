// Small charts drawn here (no library): a line chart per metric and a confusion matrix
// as a shaded table, so the numbers stay readable and selectable.

import { h } from "./ui.js";

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue; // 0 is a label
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// series: [{name, cls, points: [[x, y], ...]}]
export function lineChart(title, series, { yMin = null, yMax = null, format = (v) => v.toFixed(2) } = {}) {
  const W = 420;
  const H = 220;
  const pad = { l: 48, r: 12, t: 12, b: 32 };
  const pts = series.flatMap((s) => s.points).filter(([, y]) => Number.isFinite(y));
  const figure = h("figure", { class: "chart" });
  if (!pts.length) {
    figure.append(h("figcaption", {}, title), h("p", { class: "muted" }, "No epochs yet."));
    return figure;
  }
  const xs = pts.map(([x]) => x);
  const ys = pts.map(([, y]) => y);
  const x0 = Math.min(...xs);
  const x1 = Math.max(...xs, x0 + 1);
  let y0 = yMin ?? Math.min(...ys);
  let y1 = yMax ?? Math.max(...ys);
  if (y1 - y0 < 1e-9) {
    y0 -= 0.5;
    y1 += 0.5;
  }
  const sx = (x) => pad.l + ((x - x0) / (x1 - x0)) * (W - pad.l - pad.r);
  const sy = (y) => H - pad.b - ((y - y0) / (y1 - y0)) * (H - pad.t - pad.b);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  for (let i = 0; i <= 4; i += 1) {
    const y = y0 + ((y1 - y0) * i) / 4;
    chart.append(
      svg("line", { x1: pad.l, x2: W - pad.r, y1: sy(y), y2: sy(y), class: "grid" }),
      svg("text", { x: pad.l - 6, y: sy(y) + 4, "text-anchor": "end", class: "tick" }, format(y)),
    );
  }
  const step = Math.max(1, Math.ceil((x1 - x0) / 8));
  for (let x = x0; x <= x1; x += step) {
    chart.append(svg("text", { x: sx(x), y: H - pad.b + 16, "text-anchor": "middle", class: "tick" }, x));
  }
  chart.append(svg("text", { x: (W + pad.l) / 2, y: H - 4, "text-anchor": "middle", class: "tick" }, "epoch"));
  for (const s of series) {
    const p = s.points.filter(([, y]) => Number.isFinite(y));
    if (!p.length) continue;
    chart.append(svg("polyline", { points: p.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "), class: `line ${s.cls}` }));
    for (const [x, y] of p) {
      chart.append(svg("circle", { cx: sx(x), cy: sy(y), r: 3, class: `dot ${s.cls}` }, svg("title", {}, `${s.name}, epoch ${x}: ${format(y)}`)));
    }
  }
  const legend = h("ul", { class: "legend" }, series.map((s) => h("li", {}, h("span", { class: `swatch ${s.cls}` }), s.name)));
  figure.append(h("figcaption", {}, title), chart, legend);
  return figure;
}

export function curves(metrics) {
  const at = (key) => metrics.map((m) => [m.epoch, m[key] ?? NaN]);
  return h(
    "div",
    { class: "charts" },
    lineChart("Loss", [
      { name: "train", cls: "train", points: at("train_loss") },
      { name: "validation", cls: "val", points: at("val_loss") },
    ]),
    lineChart(
      "Accuracy",
      [
        { name: "train", cls: "train", points: at("train_accuracy") },
        { name: "validation", cls: "val", points: at("val_accuracy") },
      ],
      { yMin: 0, yMax: 1, format: (v) => `${Math.round(100 * v)}%` },
    ),
  );
}

export function confusionMatrix(classes, matrix) {
  const max = Math.max(1, ...matrix.flat());
  return h(
    "div",
    { class: "scroll" },
    h(
      "table",
      { class: "confusion" },
      h("caption", {}, "Confusion matrix: rows are the true class, columns the predicted class"),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "true \\ predicted"), classes.map((c) => h("th", { scope: "col" }, c)))),
      h(
        "tbody",
        {},
        matrix.map((row, i) =>
          h(
            "tr",
            {},
            h("th", { scope: "row" }, classes[i]),
            row.map((v, j) => {
              const cell = h("td", { class: v && i === j ? "hit" : v ? "miss" : "" }, v);
              // Shade by count; dark text stays readable up to the darkest shade.
              cell.style.setProperty("--shade", (0.08 + 0.6 * (v / max)).toFixed(3));
              return cell;
            }),
          ),
        ),
      ),
    ),
  );
}
