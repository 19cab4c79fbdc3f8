// The dashboard's shell: sign-in, navigation and a hash router (#/datasets, #/jobs/ID…),
// so every view has an address that can be bookmarked without carrying the key.

import { ApiError, api, apiKey, hooks, setApiKey } from "./api.js";
import { datasetView, datasetsView } from "./datasets.js";
import { jobView, jobsView } from "./jobs.js";
import { modelsView } from "./models.js";
import { submitView } from "./submit.js";
import { h, notice, replace } from "./ui.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
let me = null;
let viewAbort = null;

const ROUTES = [
  [/^#\/datasets\/([\w.-]+)$/, (m, id) => datasetView(m, id)],
  [/^#\/datasets$/, (m) => datasetsView(m)],
  [/^#\/submit(?:\/([\w.-]+))?$/, (m, id) => submitView(m, id)],
  [/^#\/jobs\/([\w.-]+)$/, (m, id, signal) => jobView(m, id, signal)],
  [/^#\/jobs$/, (m) => jobsView(m)],
  [/^#\/models$/, (m) => modelsView(m)],
];

function route() {
  if (!me) return;
  if (viewAbort) viewAbort.abort();
  viewAbort = new AbortController();
  const hash = location.hash || "#/datasets";
  for (const a of nav.querySelectorAll("a")) {
    const current = hash.startsWith(a.getAttribute("href"));
    if (current) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  for (const [pattern, view] of ROUTES) {
    const match = hash.match(pattern);
    if (match) {
      view(main, match[1], viewAbort.signal);
      main.focus({ preventScroll: true });
      return;
    }
  }
  location.hash = "#/datasets";
}

function signInView(message) {
  me = null;
  nav.hidden = true;
  replace(who);
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", required: true, spellcheck: "false" });
  const status = h("div", { class: "status" });
  const form = h(
    "form",
    {
      class: "signin card",
      onsubmit: async (e) => {
        e.preventDefault();
        setApiKey(input.value.trim());
        await start(status);
      },
    },
    h("h1", {}, "Sign in"),
    h("p", {}, "Paste an API key (ask your operator, or run ", h("code", {}, "finetune keys create"), "). It is kept in this tab's session storage only."),
    h("div", { class: "field" }, h("label", { for: "api-key" }, "API key"), input),
    h("button", { type: "submit" }, "Sign in"),
    status,
  );
  replace(main, form);
  if (message) notice(status, message);
  input.focus();
}

function signedIn() {
  nav.hidden = false;
  const signOut = h("button", { type: "button", class: "secondary small", onclick: () => { setApiKey(""); signInView(); } }, "Sign out");
  replace(
    who,
    me.auth_enabled ? `Tenant ${me.tenant_name}` : "Authentication is off on this server",
    " ",
    me.auth_enabled ? signOut : null,
  );
  route();
}

async function start(status) {
  try {
    me = await api("/v1/me");
    signedIn();
  } catch (err) {
    const refused = err instanceof ApiError && err.status === 401;
    if (refused && apiKey()) setApiKey("");
    if (status && refused) return notice(status, `Sign-in refused: ${err.message}`);
    signInView(refused ? null : `The service answered: ${err.message}`);
  }
}

hooks.onUnauthorized = (err) => {
  if (!me) return; // signing in: the form says why
  setApiKey("");
  signInView(`Signed out: ${err.message}`);
};
document.querySelector(".skip").addEventListener("click", (e) => {
  e.preventDefault(); // the hash is the router's
  main.focus();
});
window.addEventListener("hashchange", route);
start();
