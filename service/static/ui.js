// Small DOM helpers. Text always goes in as text nodes (never innerHTML), so names from
// uploaded archives cannot inject markup.

import { blobUrl } from "./api.js";

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function table(columns, rows, caption) {
  return h(
    "table",
    {},
    caption ? h("caption", {}, caption) : null,
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((cell) => h("td", {}, cell))))),
  );
}

export function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function pct(x) {
  return x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`;
}

export function num(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function badge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}

// A message in the page's live region (read out by screen readers) and, for errors, in
// the element given.
export function notice(el, text, kind = "error") {
  return replace(el, text ? h("p", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text) : null);
}

// An <img> whose bytes need the key: loaded through fetch, shown from an object URL.
export function authImage(path, alt, cls = "") {
  const img = h("img", { alt, class: cls });
  blobUrl(path)
    .then((url) => {
      img.src = url;
    })
    .catch((err) => {
      img.replaceWith(h("p", { class: "muted" }, `${alt}: ${err.message}`));
    });
  return img;
}

export function section(title, ...children) {
  return h("section", { class: "card" }, h("h2", {}, title), ...children);
}

// A drop zone over a file input: the input stays the accessible control (label, keyboard,
// screen readers); dropping a file onto the zone hands it to the same handler.
export function dropZone({ id, label, accept, multiple = false, onFiles }) {
  const input = h("input", { type: "file", id, accept, multiple });
  input.addEventListener("change", () => {
    if (input.files.length) onFiles([...input.files]);
  });
  const zone = h(
    "div",
    { class: "dropzone" },
    h("label", { for: id }, label),
    input,
    h("p", { class: "muted" }, "or drop it here"),
  );
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) onFiles([...e.dataTransfer.files]);
  });
  return zone;
}
