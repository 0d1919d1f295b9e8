// inferq's browser page: submit a job, stream its tokens with EventSource, watch queues and workers;
// or, for a model that renders its own chat template, hold a conversation through the OpenAI route.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("inferq-token") || "", job: null,
                recent: JSON.parse(sessionStorage.getItem("inferq-recent") || "[]"),
                follows: new Map(),  // job id -> {source, lastSeq}: the open event streams, one per job
                rows: new Map(),     // job id -> what the recent-jobs table shows
                startedOn: new Map(),  // job id -> {worker, ts}: its `started` event, until it ends
                runs: new Map(),  // job id -> the run (take) its last `started` event named
                ended: new Set(),    // jobs whose `end`/`error` this page received
                workers: [], models: [], workersAsked: 0, started: 0, firstToken: null, shownEnded: false,
                chat: [],            // the conversation: [{role, content}], sent whole with every message
                chatting: false };   // a reply is streaming

// A browser opens at most 6 HTTP/1.1 connections to one host and every EventSource holds one:
// the narration feed plus this many job streams leaves two for fetches. Jobs past it are polled.
const MAX_FOLLOWED = 3;
const TERMINAL = new Set(["finished", "failed", "cancelled"]);
const RANK = { queued: 0, expired: 0, running: 1, finished: 2, failed: 2, cancelled: 2 };

function headers(extra = {}) {
  return state.token ? { ...extra, Authorization: `Bearer ${state.token}` } : extra;
}

async function api(method, path, body) {
  const opts = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) opts.body = JSON.stringify(body);
  const resp = await fetch(path, opts);
  if (resp.status === 401) { askForToken(); throw new Error("a token is needed"); }
  const data = await resp.json();
  if (!resp.ok) {
    const err = new Error(data.error ? `${data.error.code}: ${data.error.message}` : resp.statusText);
    err.status = resp.status;
    throw err;
  }
  return data;
}

function askForToken() { $("auth").hidden = false; $("token").focus(); }

// EventSource cannot send headers: the token travels as ?access_token= on stream routes.
function streamUrl(path) {
  return state.token ? `${path}?access_token=${encodeURIComponent(state.token)}` : path;
}

function setStatus(text) { $("status").textContent = text; }

function ago(seconds) {
  if (seconds < 90) return `${Math.max(0, Math.round(seconds))} s ago`;
  return `${Math.round(seconds / 60)} min ago`;
}

// --- models ---------------------------------------------------------------------------------
function modelLabel(m) {
  if (m.status === "online") return `${m.id} (${m.serving_workers} worker${m.serving_workers === 1 ? "" : "s"})`;
  // A model stays known for a while after its last worker left: say so rather than offer it.
  if (m.workers > 0) return `${m.id} (offline: ${m.workers} worker${m.workers === 1 ? "" : "s"} starting)`;
  return `${m.id} (offline, last seen ${ago(Date.now() / 1000 - m.last_seen)})`;
}

async function loadModels() {
  const data = await api("GET", "/v1/models");
  state.models = data.data;
  const select = $("model");
  const current = select.value;
  const online = data.data.filter((m) => m.status === "online");
  const offline = data.data.filter((m) => m.status !== "online");
  select.innerHTML = "";
  for (const m of [...online, ...offline]) {
    const opt = document.createElement("option");
    opt.value = m.id;
    opt.textContent = modelLabel(m);
    opt.disabled = m.status !== "online";
    opt.dataset.status = m.status;
    select.appendChild(opt);
  }
  if (online.some((m) => m.id === current)) select.value = current;
  else select.value = online.length ? online[0].id : "";
  updateMode();
  $("model-note").textContent = online.length ? "" :
    (data.data.length ? "No worker serves any model now: start one (inferq worker / inferq up)." :
      "No model is known yet: start a worker (inferq worker / inferq up).");
}

function modelIsOnline(name) {
  return state.models.some((m) => m.id === name && m.status === "online");
}

// Chat is offered for models whose workers render the file's own chat template (GET /v1/models).
function modelChats(name) {
  const m = state.models.find((x) => x.id === name);
  return Boolean(m && (m.capabilities || []).includes("chat_template"));
}

function chatMode() { return document.querySelector("input[name=mode]:checked").value === "chat"; }

function updateMode() {
  const chats = modelChats($("model").value);
  $("mode-chat").disabled = !chats;
  if (!chats && chatMode()) document.querySelector("input[name=mode][value=prompt]").checked = true;
  $("mode-note").textContent = chats ? "" : "chat needs a model with a chat template";
  const chat = chatMode();
  $("prompt-box").hidden = chat;
  $("output").hidden = chat;
  $("chat-box").hidden = !chat;
  $("submit").textContent = chat ? "Send" : "Submit";
}

// --- submitting and following jobs ------------------------------------------------------------
async function submitJob(event) {
  event.preventDefault();
  const model = $("model").value;
  if (!modelIsOnline(model)) {
    setStatus(model ? `${model} is offline: no worker serves it now` : "no model is online");
    return;
  }
  if (chatMode()) { sendChat(model); return; }
  if (!$("prompt").value) { setStatus("write a prompt first"); return; }
  const stop = $("stop").value.split("\n").filter((s) => s.length > 0);
  const body = { operation: "infer", model, prompt: $("prompt").value,
                 max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value), stop };
  state.job = null;  // the shown job's tokens must not land in the cleared pane
  $("output").textContent = "";
  $("summary").textContent = "";
  try {
    const accepted = await api("POST", "/v1/jobs", body);
    state.recent.unshift(accepted.job_id);
    state.recent = state.recent.slice(0, 20);
    sessionStorage.setItem("inferq-recent", JSON.stringify(state.recent));
    state.rows.set(accepted.job_id, { model, state: "queued", position: null, tokens: "", took: "" });
    watch(accepted.job_id, accepted.sse_url);
    renderJobs();
  } catch (err) {
    setStatus(err.message);
  }
}

// The job shown in the output pane; the stream of the one shown before stays open (state only)
// until it ends, so its row in the table keeps following its events.
function watch(jobId, sseUrl) {
  state.job = jobId;
  state.started = performance.now();
  state.firstToken = null;
  state.shownEnded = false;
  $("cancel").disabled = false;
  setStatus("submitted");
  if (state.follows.size >= MAX_FOLLOWED) {
    const [oldest] = state.follows.keys();
    unfollow(oldest);  // its row falls back to polling
  }
  follow(jobId, sseUrl);
}

function follow(jobId, sseUrl) {
  // On a dropped connection EventSource reconnects by itself and sends Last-Event-ID;
  // the seq check below makes sure no event is handled twice whatever the server resends.
  const source = new EventSource(streamUrl(sseUrl || `/v1/jobs/${jobId}/stream`));
  const f = { source, lastSeq: -1, queuedTs: null };
  state.follows.set(jobId, f);
  const handle = (e) => {
    const ev = JSON.parse(e.data);
    if (ev.seq <= f.lastSeq) return;
    f.lastSeq = ev.seq;
    onEvent(ev, f);
  };
  for (const type of ["queued", "started", "token", "narration", "metrics", "end", "error"]) {
    source.addEventListener(type, handle);
  }
  // The log lost events this page read (a Redis failover): read it again from the start, dropping them.
  source.addEventListener("restart", () => {
    unfollow(jobId);
    state.runs.delete(jobId);
    row(jobId).tokens = 0;
    if (state.job === jobId) {
      $("output").textContent = "";
      state.firstToken = null;
      setStatus("the stream was reset (its log lost events): reading it again");
    }
    follow(jobId, sseUrl);
  });
  source.onerror = () => { if (state.job === jobId && !state.shownEnded) setStatus("reconnecting…"); };
}

function unfollow(jobId) {
  const f = state.follows.get(jobId);
  if (f) f.source.close();  // otherwise EventSource would reconnect for ever
  state.follows.delete(jobId);
}

function row(jobId) {
  if (!state.rows.has(jobId)) {
    state.rows.set(jobId, { model: "", state: "queued", position: null, tokens: "", took: "" });
  }
  return state.rows.get(jobId);
}

function onEvent(ev, f) {
  const shown = ev.job_id === state.job;
  const r = row(ev.job_id);
  switch (ev.type) {
    case "queued":
      f.queuedTs = ev.ts;
      if (RANK[r.state] === 0) { r.state = "queued"; r.position = ev.position; }
      if (shown) setStatus(`queued, position ${ev.position}${ev.eta_s ? `, about ${Math.round(ev.eta_s)} s` : ""}`);
      renderJobs();
      break;
    case "started":
      if (RANK[r.state] < 1) { r.state = "running"; r.position = null; }
      if (ev.model) r.model = ev.model;
      state.startedOn.set(ev.job_id, { worker: ev.worker, ts: ev.ts });
      if (shown) setStatus(`running on ${ev.worker}`);
      // A later take of the job (its earlier one was lost): what the earlier one streamed is void.
      if (state.runs.has(ev.job_id) && state.runs.get(ev.job_id) !== ev.run) {
        r.tokens = 0;
        if (shown) {
          $("output").textContent = "";
          state.firstToken = null;
          setStatus(`restarted on ${ev.worker}: the earlier output is void`);
        }
      }
      state.runs.set(ev.job_id, ev.run);
      renderJobs();
      renderWorkers();
      refreshWorkers().catch(() => {});
      break;
    case "token":
      r.tokens = ev.i + 1;
      if (shown) {
        if (state.firstToken === null) state.firstToken = performance.now();
        $("output").textContent += ev.t;
      }
      renderJobs();
      break;
    case "end":
    case "error": {
      if (ev.type === "end") r.state = ev.stop_reason === "cancelled" ? "cancelled" : "finished";
      else r.state = ev.code === "CANCELLED" ? "cancelled" : "failed";
      r.position = null;
      if (ev.type === "end") r.tokens = ev.tokens_out;
      if (f.queuedTs !== null) r.took = `${ev.ts - f.queuedTs} ms`;
      state.ended.add(ev.job_id);
      state.startedOn.delete(ev.job_id);
      unfollow(ev.job_id);
      if (shown) showEnd(ev);
      renderJobs();
      renderWorkers();  // the worker record may lag the log by a few ms: the event is newer
      refreshWorkers().catch(() => {});
      break;
    }
  }
}

function showEnd(ev) {
  state.shownEnded = true;
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
}

// --- chat ------------------------------------------------------------------------------------------
function chatLine(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("chat-log").appendChild(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

function rememberJob(jobId, model) {
  state.recent.unshift(jobId);
  state.recent = state.recent.slice(0, 20);
  sessionStorage.setItem("inferq-recent", JSON.stringify(state.recent));
  state.rows.set(jobId, { model, state: "queued", position: null, tokens: "", took: "" });
  renderJobs();
}

// One turn: the whole conversation to POST /v1/chat/completions, the reply read as it streams
// (fetch, not EventSource: it is a POST, and the answer is OpenAI's chunks, ended by [DONE]).
async function sendChat(model) {
  const text = $("chat-input").value.trim();
  if (!text || state.chatting) return;
  state.chatting = true;
  $("chat-input").value = "";
  state.chat.push({ role: "user", content: text });
  chatLine("user", text);
  const reply = chatLine("assistant", "");
  const stop = $("stop").value.split("\n").filter((s) => s.length > 0);
  const body = { model, messages: state.chat, stream: true, max_tokens: Number($("max-tokens").value),
                 temperature: Number($("temperature").value) };
  if (stop.length) body.stop = stop;
  state.job = null;
  state.shownEnded = false;
  $("summary").textContent = "";
  setStatus("submitted");
  const started = performance.now();
  let finish = null;
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", body: JSON.stringify(body),
                                                       headers: headers({ "Content-Type": "application/json" }) });
    if (resp.status === 401) { askForToken(); throw new Error("a token is needed"); }
    const jobId = resp.headers.get("X-Inferq-Job-Id");
    if (!resp.ok) {
      const data = await resp.json();
      throw new Error(data.error ? `${data.error.code}: ${data.error.message}` : resp.statusText);
    }
    state.job = jobId;
    reply.dataset.job = jobId;
    rememberJob(jobId, model);
    $("cancel").disabled = false;
    setStatus("running");
    finish = await readChunks(resp, reply);
    state.chat.push({ role: "assistant", content: reply.textContent });
    setStatus("finished");
    const ms = Math.round(performance.now() - started);
    $("summary").textContent = `${reply.textContent.length} characters in ${ms} ms, finish_reason ${finish}`;
  } catch (err) {
    reply.classList.add("failed");
    reply.textContent = err.message;
    state.chat.pop();  // the turn did not happen: the next message replaces it
    setStatus(`failed: ${err.message}`);
  } finally {
    state.chatting = false;
    state.shownEnded = true;
    $("cancel").disabled = true;
    refreshJobs().catch(() => {});
  }
}

async function readChunks(resp, reply) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(`${chunk.error.code}: ${chunk.error.message}`);
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) reply.textContent += choice.delta.content;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  throw new Error("the reply was cut off before it ended");
}

function resetChat() {
  state.chat = [];
  $("chat-log").replaceChildren();
  $("summary").textContent = "";
}

async function cancelJob() {
  if (!state.job) return;
  const job = state.job;
  try {
    await api("DELETE", `/v1/jobs/${job}`);
    // The stream's end can arrive before this answer does: never paint over it.
    if (state.job === job && !state.shownEnded) setStatus("cancelling…");
  }
  catch (err) { setStatus(err.message); }
}

// --- the tables ---------------------------------------------------------------------------------
function cells(tr, values) {
  tr.innerHTML = "";
  for (const v of values) {
    const td = document.createElement("td");
    td.textContent = v === null || v === undefined ? "" : String(v);
    tr.appendChild(td);
  }
}

function renderJobs() {
  const body = document.querySelector("#jobs tbody");
  const rows = [];
  for (const id of state.recent) {
    const r = state.rows.get(id);
    if (!r || r.gone) continue;  // not read yet, or expired from Redis
    const tr = document.createElement("tr");
    cells(tr, [id.slice(0, 8), r.model, r.state, r.position, r.tokens, r.took]);
    tr.dataset.job = id;
    tr.dataset.state = r.state;
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

// Polling fills in the jobs this page does not follow (earlier ones, other tabs' ones) and the
// figures only the server has. A poll answered after an event never moves a row backwards: a job's
// states only go forwards, and an event is never older than the poll that crosses it.
async function refreshJobs() {
  const open = state.recent.filter((id) => !TERMINAL.has((state.rows.get(id) || {}).state));
  await Promise.all(open.map(async (id) => {
    let j;
    try { j = await api("GET", `/v1/jobs/${id}`); }
    catch (err) { if (err.status === 404) row(id).gone = true; return; }
    const r = row(id);
    r.model = j.model || r.model;
    if (RANK[j.state] >= RANK[r.state]) {
      r.state = j.state;
      r.position = j.position;
    }
    if (j.result) r.tokens = j.result.tokens_out;
    if (j.finished_ms && j.submitted_ms) r.took = `${j.finished_ms - j.submitted_ms} ms`;
    if (!TERMINAL.has(r.state) && !state.follows.has(id) && state.follows.size < MAX_FOLLOWED) follow(id);
  }));
  renderJobs();
}

// What a worker runs now: its record, corrected by the events this page has seen since the
// record was written (it is republished within milliseconds of a change, but a fetch can land
// in between). A job that ended is never running again; a job that started after the record
// was written is running there.
function workerJobs(w) {
  const jobs = (w.jobs || (w.current_job ? [w.current_job] : [])).filter((j) => !state.ended.has(j));
  for (const [job, s] of state.startedOn) {
    if (s.worker === w.id && s.ts > w.heartbeat_at * 1000 && !jobs.includes(job)) jobs.push(job);
  }
  return jobs;
}

function renderWorkers() {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren(...state.workers.map((w) => {
    const jobs = workerJobs(w);
    let st = w.state;
    if (st === "idle" || st === "busy") st = jobs.length ? "busy" : "idle";
    const slots = w.slots || 1;
    const shown = st === "loading" || st === "unhealthy" ? st : `${st} ${jobs.length}/${slots}`;
    const job = jobs.length ? jobs[0].slice(0, 8) + (jobs.length > 1 ? ` +${jobs.length - 1}` : "") : "";
    const tr = document.createElement("tr");
    cells(tr, [w.id, w.model, w.backend, shown, w.last_tokens_per_sec ? w.last_tokens_per_sec.toFixed(0) : "", job]);
    tr.dataset.worker = w.id;
    tr.dataset.model = w.model;
    tr.dataset.state = st;
    tr.dataset.used = String(jobs.length);
    tr.dataset.jobs = jobs.join(" ");
    return tr;
  }));
}

async function refreshWorkers() {
  // Answers can arrive out of order: only the latest asked may paint.
  const asked = ++state.workersAsked;
  const data = await api("GET", "/v1/workers");
  if (asked !== state.workersAsked) return;
  state.workers = data.workers;
  renderWorkers();
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

async function boot() {
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

function start() {
  // Listeners once: boot() runs again after a token is given.
  $("job-form").addEventListener("submit", submitJob);
  $("cancel").addEventListener("click", cancelJob);
  $("model").addEventListener("change", updateMode);
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", updateMode);
  $("chat-reset").addEventListener("click", resetChat);
  $("save-token").addEventListener("click", () => {
    state.token = $("token").value.trim();
    sessionStorage.setItem("inferq-token", state.token);
    $("auth").hidden = true;
    boot();
  });
  boot();
}

start();
