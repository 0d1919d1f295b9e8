// inferq's browser page: submit a job, stream its tokens with EventSource, watch queues and workers.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("inferq-token") || "", job: null, source: null, lastSeq: -1,
                recent: JSON.parse(sessionStorage.getItem("inferq-recent") || "[]") };

function headers(extra = {}) {
  return state.token ? { ...extra, Authorization: `Bearer ${state.token}` } : extra;
}

async function api(method, path, body) {
  const opts = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) opts.body = JSON.stringify(body);
  const resp = await fetch(path, opts);
  if (resp.status === 401) { askForToken(); throw new Error("a token is needed"); }
  const data = await resp.json();
  if (!resp.ok) throw new Error(data.error ? `${data.error.code}: ${data.error.message}` : resp.statusText);
  return data;
}

function askForToken() { $("auth").hidden = false; $("token").focus(); }

// EventSource cannot send headers: the token travels as ?access_token= on stream routes.
function streamUrl(path) {
  return state.token ? `${path}?access_token=${encodeURIComponent(state.token)}` : path;
}

function setStatus(text) { $("status").textContent = text; }

async function loadModels() {
  const data = await api("GET", "/v1/models");
  const select = $("model");
  const current = select.value;
  select.innerHTML = "";
  for (const m of data.data) {
    const opt = document.createElement("option");
    opt.value = m.id;
    opt.textContent = `${m.id} (${m.workers} worker${m.workers === 1 ? "" : "s"})`;
    select.appendChild(opt);
  }
  if (current) select.value = current;
}

async function submitJob(event) {
  event.preventDefault();
  const stop = $("stop").value.split("\n").filter((s) => s.length > 0);
  const body = { operation: "infer", model: $("model").value, prompt: $("prompt").value,
                 max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value), stop };
  $("output").textContent = "";
  $("summary").textContent = "";
  try {
    const accepted = await api("POST", "/v1/jobs", body);
    state.recent.unshift(accepted.job_id);
    state.recent = state.recent.slice(0, 20);
    sessionStorage.setItem("inferq-recent", JSON.stringify(state.recent));
    watch(accepted.job_id, accepted.sse_url);
    refreshJobs();
  } catch (err) {
    setStatus(err.message);
  }
}

function watch(jobId, sseUrl) {
  if (state.source) state.source.close();
  state.job = jobId;
  state.lastSeq = -1;
  state.started = performance.now();
  state.firstToken = null;
  state.ended = false;
  $("cancel").disabled = false;
  setStatus("submitted");
  // On a dropped connection EventSource reconnects by itself and sends Last-Event-ID;
  // the seq check below makes sure no text is shown twice whatever the server resends.
  const source = new EventSource(streamUrl(sseUrl));
  state.source = source;
  const handle = (e) => {
    const ev = JSON.parse(e.data);
    if (ev.seq <= state.lastSeq) return;
    state.lastSeq = ev.seq;
    onEvent(ev, source);
  };
  for (const type of ["queued", "started", "token", "narration", "metrics", "end", "error"]) {
    source.addEventListener(type, handle);
  }
  source.onerror = () => { if (state.source === source) setStatus("reconnecting…"); };
}

function onEvent(ev, source) {
  switch (ev.type) {
    case "queued":
      setStatus(`queued, position ${ev.position}${ev.eta_s ? `, about ${Math.round(ev.eta_s)} s` : ""}`);
      break;
    case "started":
      setStatus(`running on ${ev.worker}`);
      break;
    case "token":
      if (state.firstToken === null) state.firstToken = performance.now();
      $("output").textContent += ev.t;
      break;
    case "end":
    case "error": {
      state.ended = true;
      source.close();  // otherwise EventSource would reconnect for ever
      $("cancel").disabled = true;
      if (ev.type === "end") {
        const ttft = state.firstToken ? Math.round(state.firstToken - state.started) : "-";
        setStatus(ev.stop_reason === "cancelled" ? "cancelled" : "finished");
        $("summary").textContent = `${ev.tokens_out} tokens in ${ev.decode_time_ms} ms, TTFT ${ttft} ms, ` +
          `stopped on ${ev.stop_reason}`;
      } else {
        setStatus(`failed: ${ev.code}`);
        $("summary").textContent = ev.message;
      }
      refreshJobs();
      break;
    }
  }
}

async function cancelJob() {
  if (!state.job) return;
  const job = state.job;
  try {
    await api("DELETE", `/v1/jobs/${job}`);
    // The stream's end can arrive before this answer does: never paint over it.
    if (state.job === job && !state.ended) setStatus("cancelling…");
  }
  catch (err) { setStatus(err.message); }
}

function cells(row, values) {
  row.innerHTML = "";
  for (const v of values) {
    const td = document.createElement("td");
    td.textContent = v === null || v === undefined ? "" : String(v);
    row.appendChild(td);
  }
}

async function refreshJobs() {
  const body = document.querySelector("#jobs tbody");
  const rows = [];
  for (const id of state.recent) {
    try {
      const j = await api("GET", `/v1/jobs/${id}`);
      const tr = document.createElement("tr");
      const took = j.finished_ms && j.submitted_ms ? `${j.finished_ms - j.submitted_ms} ms` : "";
      cells(tr, [id.slice(0, 8), j.model, j.state, j.position, j.result ? j.result.tokens_out : "", took]);
      tr.dataset.job = id;
      tr.dataset.state = j.state;
      rows.push(tr);
    } catch (err) { /* an expired job simply drops out of the list */ }
  }
  body.replaceChildren(...rows);
}

async function refreshWorkers() {
  const data = await api("GET", "/v1/workers");
  const body = document.querySelector("#workers tbody");
  body.replaceChildren(...data.workers.map((w) => {
    const tr = document.createElement("tr");
    cells(tr, [w.id, w.model, w.backend, w.state,
               w.last_tokens_per_sec ? w.last_tokens_per_sec.toFixed(0) : "", (w.current_job || "").slice(0, 8)]);
    tr.dataset.model = w.model;
    return tr;
  }));
}

function followNarration() {
  const list = $("narration");
  const source = new EventSource(streamUrl("/v1/narration"));
  source.addEventListener("narration", (e) => {
    const ev = JSON.parse(e.data);
    const li = document.createElement("li");
    li.textContent = `${new Date(ev.ts).toLocaleTimeString()} ${ev.human}`;
    list.prepend(li);
    while (list.children.length > 100) list.lastChild.remove();
  });
}

async function start() {
  $("job-form").addEventListener("submit", submitJob);
  $("cancel").addEventListener("click", cancelJob);
  $("save-token").addEventListener("click", () => {
    state.token = $("token").value.trim();
    sessionStorage.setItem("inferq-token", state.token);
    $("auth").hidden = true;
    start();
  });
  try {
    await loadModels();
    await refreshWorkers();
    await refreshJobs();
  } catch (err) {
    setStatus(err.message);
    return;  // waiting for a token
  }
  followNarration();
  setInterval(() => { refreshWorkers().catch(() => {}); refreshJobs().catch(() => {}); loadModels().catch(() => {}); },
              2000);
}

start();
