// The upload page: plain DOM code over the JSON API (see docs/page.md).
// Every value from a spreadsheet is shown with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const STATUSES = ["sent", "failed", "unknown", "pending", "invalid", "duplicate", "suppressed"];
const DELIVERY = ["delivered", "sent", "undelivered", "failed", "not_found", "ambiguous"];
let canReconcile = false; // the job file has a reporting: section
const PAGE = 50;
let current = null; // the open campaign, as GET /api/campaigns/{id} describes it
let invalidOffset = 0;
let events = null;
// The charts are fetched again while a campaign sends, at most this often (and never more
// often than five times as long as the last fetch took: a big ledger is not read in a loop).
const STORY_EVERY_MS = 2000;
const story = { timer: null, poll: null, loading: false, again: false, next: 0 };

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const options = { method, credentials: "same-origin", headers: {} };
  if (body instanceof FormData) {
    options.body = body;
  } else if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, options);
  let data = null;
  try { data = await response.json(); } catch (_) { data = null; }
  if (response.status === 401 && path !== "/api/session") showLogin();
  if (!response.ok) {
    throw new ApiError((data && data.error) || `${response.status} ${response.statusText}`, response.status);
  }
  return data;
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function plural(n, word) { return `${n} ${word}${n === 1 ? "" : "s"}`; }

function duration(seconds) {
  if (seconds < 90) return `${Math.max(1, Math.round(seconds))} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// --- sign in ----------------------------------------------------------------------------

function showLogin() {
  $("login").hidden = false;
  $("app").hidden = true;
  $("logout").hidden = true;
  $("token").focus();
}

async function signIn(token) {
  await api("POST", "/api/session", { token });
  $("login").hidden = true;
  $("login-error").textContent = "";
  await showApp();
}

async function showApp() {
  await refreshList();
  await loadSuppression().catch(() => {});
  $("app").hidden = false;
  $("login").hidden = true;
  $("logout").hidden = false;
  const wanted = new URLSearchParams(location.hash.slice(1)).get("campaign");
  if (wanted && !current) await openCampaign(wanted).catch(() => {});
}

// --- upload -----------------------------------------------------------------------------

async function upload(file) {
  $("upload-error").textContent = "";
  $("upload-status").textContent = `Uploading ${file.name}…`;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const made = await api("POST", "/api/campaigns", form);
    $("upload-status").textContent = `${made.filename}: ${plural(made.columns.length, "column")}.`;
    await openCampaign(made.id);
  } catch (error) {
    $("upload-status").textContent = "";
    $("upload-error").textContent = error.message;
  } finally {
    $("file").value = "";
  }
}

// --- a campaign ------------------------------------------------------------------------

async function openCampaign(id) {
  closeEvents();
  current = await api("GET", `/api/campaigns/${encodeURIComponent(id)}`);
  history.replaceState(null, "", `#campaign=${encodeURIComponent(id)}`);
  $("campaign-id").textContent = current.id;
  $("mapping-error").textContent = "";
  $("send-error").textContent = "";
  const editable = current.uploaded_here && current.mapping;
  $("mapping-card").hidden = !editable;
  if (editable) renderMapping(current);
  invalidOffset = 0;
  renderCampaign(current);
  if (current.state !== "uploaded") { await loadInvalid(); await loadSuppressedRows(); }
  $("mapping-card").scrollIntoView({ block: "start" });
}

function renderCampaign(c) {
  const validated = c.state !== "uploaded";
  $("validation-card").hidden = !validated;
  $("send-card").hidden = !validated;
  if (validated) renderCounts(c.counts);
  renderSend(c);
  if (validated) loadStory(c.id); else $("charts-card").hidden = true;
  if (c.state === "running") listen(c.id);
}

// --- charts (static/story.js draws them) -----------------------------------------------------

async function loadStory(id) {
  if (story.loading) { story.again = true; return; }
  story.loading = true;
  const began = Date.now();
  try {
    const data = await api("GET", `/api/campaigns/${encodeURIComponent(id)}/story`);
    if (!current || current.id !== id) return;
    $("charts-error").textContent = "";
    $("charts-card").hidden = false;
    drawStory($("charts"), data);
    $("charts").dataset.generatedAt = String(data.generated_at);
  } catch (error) {
    if (current && current.id === id) $("charts-error").textContent = error.message;
  } finally {
    story.loading = false;
    story.next = Date.now() + Math.max(STORY_EVERY_MS, 5 * (Date.now() - began));
    if (story.again) { story.again = false; scheduleStory(id); }
  }
}

function scheduleStory(id) {
  if (story.timer) return;
  story.timer = setTimeout(() => { story.timer = null; loadStory(id); }, Math.max(0, story.next - Date.now()));
}

function renderMapping(c) {
  const source = {
    job: "The mapping comes from the job file; change it below if this file differs.",
    guessed: "The mapping was guessed from the column names and contents: check it below.",
  };
  const total = c.columns_total || c.columns.length;
  const more = total > c.columns.length
    ? ` The file has ${total} columns: the page maps the first ${c.columns.length}; name the others in the job file's mapping.`
    : "";
  $("mapping-source").textContent = (source[c.mapping_source] || "The mapping as last set on this page.") + more;
  const preview = $("preview");
  preview.replaceChildren();
  // The server sends the first rows' first columns only, each cell cut to a few hundred characters.
  const width = Math.max(0, ...c.preview.map((row) => row.cells.length));
  const head = el("tr");
  head.append(el("th", "Row"), ...c.columns.slice(0, width).map((name) => el("th", name)));
  preview.append(el("thead"));
  preview.tHead.append(head);
  const body = el("tbody");
  for (const row of c.preview) {
    const tr = el("tr");
    tr.append(el("td", row.row, "num"), ...row.cells.map((cell) => el("td", cell)));
    body.append(tr);
  }
  preview.append(body);

  const m = c.mapping;
  const params = m.params || {};
  const rows = $("mapping").tBodies[0];
  rows.replaceChildren();
  c.columns.forEach((column, i) => {
    const name = column.trim();
    const paramName = Object.keys(params).find((k) => params[k].trim() === name);
    const role = m.to_phone && m.to_phone.trim() === name ? "phone" : paramName ? "param" : "skip";
    const example = (c.preview.find((r) => (r.cells[i] || "").trim()) || { cells: [] }).cells[i] || "";
    const select = el("select");
    select.dataset.column = column;
    select.setAttribute("aria-label", `use of column ${name}`);
    for (const [value, label] of [["phone", "Phone number (to_phone)"], ["param", "Param"], ["skip", "Not sent"]]) {
      const option = el("option", label);
      option.value = value;
      select.append(option);
    }
    select.value = role;
    const input = el("input");
    input.value = paramName || (role === "skip" ? suggestName(name, i) : "");
    input.placeholder = suggestName(name, i);
    input.setAttribute("aria-label", `param name for column ${name}`);
    input.disabled = role !== "param";
    select.addEventListener("change", () => { onRoleChange(select, input); mappingChanged(); });
    input.addEventListener("input", mappingChanged);
    const tr = el("tr");
    tr.dataset.column = column;
    const cellSelect = el("td");
    cellSelect.append(select);
    const cellInput = el("td");
    cellInput.append(input);
    tr.append(el("td", name, "column"), el("td", example, "muted"), cellSelect, cellInput);
    rows.append(tr);
  });
  $("region").value = m.default_region || "US";
  $("recipient-key").value = (m.recipient_key || ["to_phone"]).join(", ");
  $("require-phone").checked = m.require_phone !== false;
  $("validate-status").textContent = "";
}

function mappingChanged() {
  // What is sent is the mapping last validated: an edit must be validated before a send.
  $("start").disabled = true;
  $("rerun").disabled = true;
  $("validate-status").textContent = "The mapping changed: validate it again before sending.";
}

// A param name for a column the server's guess left out: the same steps as the server's
// web_guess.param_name. Whether a name is usable is the server's answer (PUT .../mapping
// says why not), one rule for the page and the job file.
function suggestName(column, index) {
  const text = column.normalize("NFKD").replace(/[\u0300-\u036f]/g, "").toLowerCase();
  const name = text.replace(/[^0-9a-z]+/g, "_").replace(/^_+|_+$/g, "");
  if (!name) return `column_${index + 1}`;
  return /^[0-9]/.test(name) || name === "to_phone" ? `c_${name}` : name;
}

function onRoleChange(select, input) {
  input.disabled = select.value !== "param";
  if (select.value === "param" && !input.value.trim()) input.value = input.placeholder;
  if (select.value !== "phone") return;
  // One phone column: the one chosen last wins, the former one becomes a param.
  for (const other of $("mapping").querySelectorAll("select")) {
    if (other !== select && other.value === "phone") {
      other.value = "param";
      const input = other.closest("tr").querySelector("input");
      input.disabled = false;
      if (!input.value.trim()) input.value = input.placeholder;
    }
  }
}

function collectMapping() {
  const mapping = {
    to_phone: null,
    default_region: $("region").value.trim() || "US",
    require_phone: $("require-phone").checked,
    params: {},
    constants: (current.mapping && current.mapping.constants) || {},
    recipient_key: $("recipient-key").value.split(",").map((k) => k.trim()).filter(Boolean),
  };
  for (const tr of $("mapping").tBodies[0].rows) {
    const role = tr.querySelector("select").value;
    const column = tr.dataset.column.trim();
    if (role === "phone") mapping.to_phone = column;
    if (role === "param") {
      const name = tr.querySelector("input").value.trim();
      if (!name) throw new Error(`Give the column "${column}" a param name, or choose "Not sent".`);
      if (mapping.params[name]) throw new Error(`Two columns send the param "${name}".`);
      mapping.params[name] = column;
    }
  }
  return mapping;
}

async function validate() {
  $("mapping-error").textContent = "";
  let mapping;
  try { mapping = collectMapping(); } catch (error) { $("mapping-error").textContent = error.message; return; }
  $("validate").disabled = true;
  $("validate-status").textContent = "Validating…";
  try {
    const summary = await api("PUT", `/api/campaigns/${encodeURIComponent(current.id)}/mapping`, mapping);
    current = { ...current, ...summary, mapping };
    invalidOffset = 0;
    renderCampaign(current);
    renderInvalid(summary.invalid);
    renderNotes(summary.notes || []);
    await loadSuppressedRows();
    $("validate-status").textContent = "Validated.";
    $("validation-card").scrollIntoView({ block: "start" });
    refreshList();
  } catch (error) {
    $("validate-status").textContent = "";
    $("mapping-error").textContent = error.message;
  } finally {
    $("validate").disabled = false;
  }
}

// Send windows and the suppression list, as `campaign validate` says them.
function renderNotes(notes) {
  const list = $("validation-notes");
  list.replaceChildren(...notes.map((note) => el("li", note)));
  list.hidden = notes.length === 0;
}

function renderCounts(counts) {
  const duplicates = (counts && counts.duplicate) || 0;
  $("duplicates-note").hidden = duplicates === 0;
  $("duplicates-note").textContent = `${plural(duplicates, "row")} repeat${duplicates === 1 ? "s" : ""} an earlier row's recipient`
    + " and will not be sent a second time (the results CSV names the earlier row).";
  const box = $("counts");
  box.replaceChildren();
  for (const status of STATUSES) {
    const n = (counts && counts[status]) || 0;
    const badge = el("div", null, `count ${status}${n ? "" : " zero"}`);
    badge.dataset.status = status;
    badge.append(el("strong", n), el("span", status));
    box.append(badge);
  }
}

async function loadInvalid() {
  const page = await api("GET", `/api/campaigns/${encodeURIComponent(current.id)}/rows?status=invalid&offset=${invalidOffset}&limit=${PAGE}`);
  renderInvalid(page);
}

// A page of rows from GET /rows: row number, the reason, then the row's cells.
function fillRowsTable(table, page, why) {
  table.replaceChildren();
  const head = el("tr");
  head.append(el("th", "Row"), el("th", why), ...page.columns.map((c) => el("th", c)));
  table.append(el("thead"));
  table.tHead.append(head);
  const body = el("tbody");
  for (const row of page.rows) {
    const tr = el("tr");
    tr.append(el("td", row.row, "num"), el("td", row.error, "reason"), ...row.cells.map((c) => el("td", c)));
    body.append(tr);
  }
  table.append(body);
}

function renderInvalid(page) {
  $("invalid-block").hidden = !page || page.total === 0;
  if (!page || page.total === 0) return;
  fillRowsTable($("invalid"), page, "Why it cannot be sent");
  const last = Math.min(page.offset + page.rows.length, page.total);
  $("invalid-page").textContent = `rows ${page.offset + 1}–${last} of ${page.total}`;
  $("invalid-prev").disabled = page.offset === 0;
  $("invalid-next").disabled = last >= page.total;
}

// --- sending ---------------------------------------------------------------------------

function renderSend(c) {
  const running = c.state === "running";
  const here = running && c.progress;
  const failed = (c.counts && c.counts.failed) || 0;
  const eta = c.to_send / Math.max(c.rate, 1e-9);
  const start = $("start");
  start.textContent = c.resumable
    ? `Continue: send the remaining ${plural(c.to_send, "recipient")}`
    : `Send to ${plural(c.to_send, "recipient")} at ${c.rate} per second (about ${duration(eta)})`;
  start.disabled = running;
  start.hidden = running || c.to_send === 0;
  $("stop").hidden = !here;
  $("rerun").hidden = running || failed === 0;
  $("rerun").disabled = false;
  $("rerun").textContent = `Rerun the ${plural(failed, "failed row")}`;
  const download = $("download");
  download.hidden = !c.has_results;
  download.href = `/api/campaigns/${encodeURIComponent(c.id)}/results.csv`;
  download.setAttribute("download", `${c.id}-results.csv`);
  $("send-state").textContent = stateLine(c) + (c.uploaded_here ? ""
    : " Started with `campaign run`: it continues here with the rows and mapping in its ledger.");
  $("send-state").dataset.state = c.state;
  $("reconcile").hidden = !canReconcile || c.state !== "done";
  renderDelivery(c.delivery);
  $("progress-block").hidden = !here;
  if (c.error) $("send-error").textContent = c.error;
  if (here) renderProgress(c.progress);
}

function deliveryLine(delivery) {
  const known = DELIVERY.filter((k) => delivery && delivery[k]);
  const other = Object.keys(delivery || {}).filter((k) => !DELIVERY.includes(k) && delivery[k]);
  return [...known, ...other].map((k) => `${delivery[k]} ${k.replace("_", " ")}`).join(" · ");
}

function renderDelivery(delivery) {
  const line = deliveryLine(delivery);
  $("delivery").hidden = !line;
  $("delivery").textContent = line ? `Delivery reports: ${line}.` : "";
}

async function checkDelivery() {
  $("send-error").textContent = "";
  const button = $("reconcile");
  button.disabled = true;
  button.textContent = "Checking delivery…";
  try {
    const state = await api("POST", `/api/campaigns/${encodeURIComponent(current.id)}/reconcile`);
    current = { ...current, ...state };
    renderCounts(current.counts);
    renderSend(current);
    if (!state.complete) $("send-error").textContent = state.message;
    refreshList();
  } catch (error) {
    $("send-error").textContent = error.message;
  } finally {
    button.disabled = false;
    button.textContent = "Check delivery";
  }
}

function stateLine(c) {
  const counts = c.counts || {};
  const sent = counts.sent || 0;
  switch (c.state) {
    case "uploaded": return "Validate the mapping first.";
    case "validated": return c.to_send ? `Ready: ${plural(c.to_send, "recipient")} to send.` : "Nothing to send.";
    case "running": return c.progress ? "Sending…" : "Sending from another process (campaign run)…";
    case "done": return `Done: ${sent} sent` + (counts.failed ? `, ${counts.failed} failed` : "")
      + (counts.unknown ? `, ${counts.unknown} unknown (may have arrived)` : "") + ".";
    default: return `Stopped before the end (${c.last_run}): ${sent} sent so far; continue to send the rest.`;
  }
}

function renderProgress(p) {
  if (p.phase !== "sending") {
    $("progress-text").textContent = p.stopping ? "Stopping…" : "Preparing…";
    return;
  }
  const by = p.by_state || {};
  const share = p.total ? p.done / p.total : 1;
  $("bar-fill").style.width = `${Math.round(share * 100)}%`;
  $("progress-text").textContent = `${p.done} of ${p.total} done · sent ${by.sent || 0} · failed ${by.failed || 0}`
    + ` · unknown ${by.unknown || 0} · ${p.rate}/s` + (p.stopping ? " · stopping…" : "");
}

async function start(onlyFailed) {
  $("send-error").textContent = "";
  try {
    const state = await api("POST", `/api/campaigns/${encodeURIComponent(current.id)}/start`, { only_failed: onlyFailed });
    current = { ...current, ...state };
    renderCampaign(current);
    refreshList();
  } catch (error) {
    $("send-error").textContent = error.message;
  }
}

// --- a test send: one row to the operator's own phone -------------------------------------

const TEST_PHONE_KEY = "campaign.testPhone"; // remembered for the browser session
const TEST_POLL_MS = 1500;

async function sendTest() {
  const id = current.id;
  const phone = $("test-phone").value.trim();
  sessionStorage.setItem(TEST_PHONE_KEY, phone);
  const body = { to: phone.split(/[,;]+/).map((p) => p.trim()).filter(Boolean) };
  const row = $("test-row").value.trim();
  if (row) body.row = Number(row);
  $("test-error").textContent = "";
  $("test-message").hidden = true;
  $("test-params").hidden = true;
  $("test-answer").textContent = "Sending the test…";
  const button = $("test-send");
  button.disabled = true;
  try {
    let view = await api("POST", `/api/campaigns/${encodeURIComponent(id)}/test`, body);
    renderTest(view);
    while (view.waiting && current && current.id === id) {
      await new Promise((done) => setTimeout(done, TEST_POLL_MS));
      view = await api("GET", `/api/campaigns/${encodeURIComponent(id)}/test`);
      renderTest(view);
    }
  } catch (error) {
    $("test-answer").textContent = "";
    $("test-error").textContent = error.message;
  } finally {
    button.disabled = false;
  }
}

function renderTest(view) {
  const params = Object.entries(view.params || {}).map(([k, v]) => `${k}: ${v}`).join(" · ");
  $("test-params").hidden = false;
  $("test-params").textContent = `Row ${view.row}, params sent: ${params || "none"}`;
  const answers = (view.requests || []).map((r) => `${r.to}: ${r.state}`
    + (r.state === "sent" ? ` (HTTP ${r.http_status})` : ` (${r.error || "not sent"})`));
  $("test-answer").textContent = answers.join(" · ")
    + (view.waiting ? " · waiting for the delivery report (up to 2 minutes)…" : "");
  const got = (view.requests || []).find((r) => r.message || r.sms_status);
  const message = $("test-message");
  if (got) {
    const status = got.sms_status + (got.sms_status_response ? `: ${got.sms_status_response}` : "");
    message.textContent = `This is what row ${view.row} produces: ${got.message || "(no text)"} (${status})`;
    message.hidden = false;
  } else if (!view.waiting) {
    message.textContent = view.note ? `Sent: ${view.note}.` : "No delivery report came for the test: read the message on the phone.";
    message.hidden = !(view.requests || []).some((r) => r.state === "sent");
  }
  if (view.error) $("test-error").textContent = view.error;
}

function listen(id) {
  closeEvents();
  events = new EventSource(`/api/campaigns/${encodeURIComponent(id)}/events`);
  // Also between events: answers recorded after the last change of the counts still show.
  story.poll = setInterval(() => scheduleStory(id), STORY_EVERY_MS);
  events.addEventListener("progress", (e) => {
    if (!current || current.id !== id) return;
    $("progress-block").hidden = false;
    renderProgress(JSON.parse(e.data));
    scheduleStory(id);
  });
  events.addEventListener("state", async (e) => {
    const state = JSON.parse(e.data);
    if (!current || current.id !== id) return;
    current = { ...current, ...state };
    if (state.state === "running") { renderSend(current); scheduleStory(id); return; }
    closeEvents();
    renderCounts(current.counts);
    renderSend(current);
    loadStory(id);
    refreshList();
  });
  events.onerror = () => { if (events && events.readyState === EventSource.CLOSED) closeEvents(); };
}

function closeEvents() {
  if (events) events.close();
  events = null;
  clearInterval(story.poll);
}

// --- past campaigns ----------------------------------------------------------------------

async function refreshList() {
  const data = await api("GET", "/api/campaigns");
  $("job-line").textContent = `Job ${data.job} · ${data.rate} messages per second · ${data.concurrency} at once`;
  canReconcile = Boolean(data.reporting);
  const table = $("campaigns");
  table.replaceChildren();
  $("no-campaigns").hidden = data.campaigns.length > 0;
  if (!data.campaigns.length) return;
  const head = el("tr");
  head.append(...["Campaign", "File", "Uploaded", "State", "Counts", ""].map((h) => el("th", h)));
  table.append(el("thead"));
  table.tHead.append(head);
  const body = el("tbody");
  for (const c of data.campaigns) {
    const tr = el("tr");
    tr.dataset.id = c.id;
    const when = c.created_at ? new Date(c.created_at * 1000).toLocaleString() : "";
    const sends = STATUSES.filter((s) => c.counts[s]).map((s) => `${c.counts[s]} ${s}`).join(" · ");
    const delivery = deliveryLine(c.delivery);
    const counts = delivery ? `${sends} — delivery: ${delivery}` : sends;
    const open = el("button", "Open");
    open.addEventListener("click", () => openCampaign(c.id).catch((error) => { $("upload-error").textContent = error.message; }));
    const action = el("td");
    action.append(open);
    tr.append(el("td", c.id, "mono"), el("td", c.filename || "(campaign run)"), el("td", when),
      el("td", c.state + (c.resumable ? " · resumable" : ""), `state-${c.state}`), el("td", counts || "—"), action);
    body.append(tr);
  }
  table.append(body);
}

// --- suppression ---------------------------------------------------------------------------

async function loadSuppressedRows() {
  const page = await api("GET", `/api/campaigns/${encodeURIComponent(current.id)}/rows?status=suppressed&offset=0&limit=${PAGE}`);
  $("suppressed-block").hidden = page.total === 0;
  const table = $("suppressed-rows");
  table.replaceChildren();
  if (page.total === 0) return;
  fillRowsTable(table, page, "Why it is not sent");
  $("suppressed-page").textContent = page.total > page.rows.length
    ? `the first ${page.rows.length} of ${page.total} (all are in the results CSV)` : "";
}

async function loadSuppression() {
  const list = await api("GET", "/api/suppression");
  $("suppression-count").textContent = `${plural(list.count, "number")} on the list.`;
  showAvaamo(list.avaamo);
  const table = $("suppression");
  table.replaceChildren();
  const head = el("tr");
  head.append(el("th", "Phone"), el("th", "Reason"), el("th", "Source"), el("th", "Added (UTC)"));
  table.append(el("thead"));
  table.tHead.append(head);
  const body = el("tbody");
  for (const entry of list.entries.slice(0, 200)) {
    const tr = el("tr");
    tr.append(el("td", entry.phone), el("td", entry.reason, "reason"), el("td", entry.source), el("td", entry.added_at));
    body.append(tr);
  }
  table.append(body);
}

// Avaamo's own opt-outs (people who replied STOP): when the list last read them, how many.
function showAvaamo(avaamo) {
  $("avaamo-sync-block").hidden = !avaamo || !avaamo.enabled;
  if (!avaamo) return;
  const when = avaamo.synced_at ? `last synced from Avaamo ${avaamo.synced_at}` : "not synced from Avaamo yet";
  $("avaamo-synced").textContent = `${plural(avaamo.count, "number")} from Avaamo's opt-outs; ${when}.`;
}

async function syncAvaamo() {
  $("suppression-error").textContent = "";
  $("avaamo-sync-status").textContent = "Reading Avaamo's opt-outs…";
  try {
    const done = await api("POST", "/api/suppression/sync", {});
    const unread = done.unread ? `; not read whole: ${done.problems.join("; ")}` : "";
    $("avaamo-sync-status").textContent =
      `Added ${done.added}, removed ${done.removed}, ${done.unchanged} unchanged, ${done.skipped} unusable entries skipped${unread}.`;
    await loadSuppression();
  } catch (error) {
    $("avaamo-sync-status").textContent = "";
    $("suppression-error").textContent = error.message;
  }
}

async function changeSuppression(method) {
  $("suppression-error").textContent = "";
  const phones = $("suppress-phones").value.split(/[\n,;]+/).map((p) => p.trim()).filter(Boolean);
  if (!phones.length) { $("suppression-error").textContent = "Type one or more phone numbers."; return; }
  try {
    const done = await api(method, "/api/suppression", { phones, reason: $("suppress-reason").value });
    $("suppression-status").textContent = method === "POST"
      ? `Added ${done.added}; ${done.already} already on the list.`
      : `Removed ${done.removed}; ${done.not_listed} were not on the list.`;
    $("suppress-phones").value = "";
    await loadSuppression();
  } catch (error) {
    $("suppression-error").textContent = error.message;
  }
}

// --- wiring --------------------------------------------------------------------------------

function wire() {
  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try { await signIn($("token").value); $("token").value = ""; } catch (error) { $("login-error").textContent = error.message; }
  });
  $("logout").addEventListener("click", async () => { await api("DELETE", "/api/session").catch(() => {}); location.hash = ""; location.reload(); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", () => { if ($("file").files.length) upload($("file").files[0]); });
  for (const id of ["region", "recipient-key", "require-phone"]) $(id).addEventListener("change", mappingChanged);
  $("validate").addEventListener("click", validate);
  $("start").addEventListener("click", () => start(false));
  $("rerun").addEventListener("click", () => start(true));
  $("reconcile").addEventListener("click", checkDelivery);
  $("test-send").addEventListener("click", sendTest);
  $("test-phone").value = sessionStorage.getItem(TEST_PHONE_KEY) || "";
  $("stop").addEventListener("click", async () => {
    try { await api("POST", `/api/campaigns/${encodeURIComponent(current.id)}/stop`); } catch (error) { $("send-error").textContent = error.message; }
  });
  $("suppress-add").addEventListener("click", () => changeSuppression("POST"));
  $("suppress-remove").addEventListener("click", () => changeSuppression("DELETE"));
  $("avaamo-sync").addEventListener("click", syncAvaamo);
  $("invalid-prev").addEventListener("click", () => { invalidOffset = Math.max(0, invalidOffset - PAGE); loadInvalid(); });
  $("invalid-next").addEventListener("click", () => { invalidOffset += PAGE; loadInvalid(); });
}

async function boot() {
  wire();
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token) {
    history.replaceState(null, "", location.pathname); // keep the token out of the address bar
    try { await signIn(token); return; } catch (_) { /* fall through to the form */ }
  }
  try { await showApp(); } catch (error) {
    if (error.status !== 401) { showLogin(); $("login-error").textContent = error.message; }
  }
}

document.addEventListener("DOMContentLoaded", boot);
