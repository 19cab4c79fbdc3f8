// Talking to /v1/: the key lives in sessionStorage (gone when the tab closes) and travels
// only in the Authorization header, never in a URL.

const KEY = "finetune.apiKey";

export class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function failure(resp) {
  let code = null;
  let detail = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    code = body.error_code || null;
    if (typeof body.detail === "string") detail = body.detail;
    else if (body.detail) detail = JSON.stringify(body.detail);
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(resp.status, code, detail);
}

// A listener the app sets to send the user back to sign in when a key stops working.
export const hooks = { onUnauthorized: null };

export async function request(path, { method = "GET", json, body, signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  const resp = await fetch(path, init);
  if (!resp.ok) {
    const err = await failure(resp);
    if (resp.status === 401 && hooks.onUnauthorized) hooks.onUnauthorized(err);
    throw err;
  }
  return resp;
}

export async function api(path, options) {
  const resp = await request(path, options);
  return resp.status === 204 ? null : resp.json();
}

// An image behind the key: fetched with the header, shown through an object URL.
export async function blobUrl(path) {
  const resp = await request(path);
  return URL.createObjectURL(await resp.blob());
}

// An upload with progress: fetch() reports no upload progress, XMLHttpRequest does.
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    };
    xhr.onload = () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // not JSON
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else {
        const detail = body && typeof body.detail === "string" ? body.detail : xhr.statusText;
        reject(new ApiError(xhr.status, body && body.error_code, detail || `HTTP ${xhr.status}`));
      }
    };
    xhr.onerror = () => reject(new ApiError(0, null, "the upload failed: network error"));
    xhr.send(form);
  });
}

// A model download. With S3 storage the API hands out a presigned URL the browser opens
// itself; otherwise the file comes from the API with the key and is saved from a blob.
export async function download(jobId, format) {
  const link = await api(`/v1/jobs/${jobId}/model/link?format=${encodeURIComponent(format)}`);
  const a = document.createElement("a");
  a.download = link.filename;
  if (link.url) {
    a.href = link.url;
  } else {
    const resp = await request(`/v1/jobs/${jobId}/model?format=${encodeURIComponent(format)}`);
    a.href = URL.createObjectURL(await resp.blob());
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
  }
  document.body.append(a);
  a.click();
  a.remove();
}

// Server-sent events read with fetch() (EventSource cannot send the key). Resolves false
// at once when the route does not exist, so the caller polls instead.
export async function streamEvents(path, onEvent, signal) {
  let resp;
  try {
    resp = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal });
  } catch {
    return false;
  }
  const type = resp.headers.get("Content-Type") || "";
  if (!resp.ok || !type.startsWith("text/event-stream") || !resp.body) return false;
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return true;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(event, data.join("\n"));
    }
  }
}
