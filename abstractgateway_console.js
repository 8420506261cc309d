// AbstractGateway operator console. Plain JavaScript, no build step, no external asset.
// Every action goes through /api/gateway/* with the bearer token the user pasted; the token is
// kept in sessionStorage (this tab only) and never put in a URL.
'use strict';

const API = '/api/gateway';
const TOKEN_KEY = 'abstractgateway.token';
const TERMINAL = new Set(['completed', 'failed', 'cancelled']);
const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || '',
  signedIn: false,
  view: null,
  timers: [],           // intervals of the current view, cleared on navigation
  run: null,            // the run view's live state
  entrypoints: null,    // [{bundle_id, flow_id, workflow_id, name, deprecated}]
  toolMode: null,       // a promise of the gateway's tool mode, for tool approvals
};

// -- small helpers ---------------------------------------------------------------------------------

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined && kid !== false) el.append(kid);
  return el;
}

function newId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);  // works on plain http too (crypto.randomUUID needs a secure context)
  return 'console-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

function enc(s) { return encodeURIComponent(s); }
function short(id) { return id && id.length > 12 ? id.slice(0, 8) + '…' : (id || ''); }

function age(iso) {
  if (!iso) return '';
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return Math.floor(s) + ' s ago';
  if (s < 3600) return Math.floor(s / 60) + ' min ago';
  if (s < 86400) return Math.floor(s / 3600) + ' h ago';
  return Math.floor(s / 86400) + ' d ago';
}

function badge(status, paused) {
  const text = paused && !TERMINAL.has(status) ? status + ' · paused' : status;
  return h('span', {class: 'badge s-' + (paused && !TERMINAL.has(status) ? 'paused' : status), text});
}

function bytes(n) {
  if (n < 1024) return n + ' B';
  if (n < 1048576) return (n / 1024).toFixed(1) + ' KB';
  return (n / 1048576).toFixed(1) + ' MB';
}

function toast(text, bad) {
  const el = $('toast');
  el.textContent = text;
  el.className = 'toast' + (bad ? ' bad' : '');
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, bad ? 8000 : 3500);
}

function setNote(el, text, kind) {
  el.textContent = text;
  el.className = 'note' + (kind ? ' ' + kind : '');
}

function every(ms, fn) { state.timers.push(setInterval(fn, ms)); }

// -- API -------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body, retryAfter) {
    super(body.detail || ('HTTP ' + status));
    this.status = status;
    this.code = body.code || '';
    this.detail = body.detail || '';
    this.retryAfter = retryAfter ? parseInt(retryAfter, 10) : null;
  }
}

async function api(path, opts = {}) {
  const headers = {Authorization: 'Bearer ' + state.token};
  let body;
  if (opts.form) body = opts.form;
  else if (opts.body !== undefined) { headers['Content-Type'] = 'application/json'; body = JSON.stringify(opts.body); }
  Object.assign(headers, opts.headers || {});
  let resp;
  try {
    resp = await fetch(API + path, {method: opts.method || 'GET', headers, body, signal: opts.signal, cache: 'no-store'});
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError(0, {detail: 'Cannot reach the gateway (' + err.message + ')', code: 'network'});
  }
  if (!resp.ok) {
    let data = {};
    try { data = await resp.json(); } catch (e) { /* not JSON */ }
    const err = new ApiError(resp.status, data, resp.headers.get('Retry-After'));
    if (state.signedIn && (resp.status === 401 || err.code === 'auth_lockout')) signOut(explain(err));
    throw err;
  }
  return opts.raw ? resp : resp.json();
}

function explain(err) {
  if (err.status === 401) {
    return 'The gateway did not accept this token (401 Unauthorized). Paste the token it printed on first ' +
      'start, or run `abstractgateway token show` on the gateway machine.';
  }
  if (err.status === 429 && err.code === 'auth_lockout') {
    const s = err.retryAfter || 1;
    return `Too many wrong tokens from this address: the gateway locks it out for ${s} s (Retry-After: ${s}). ` +
      'Each further wrong token doubles the wait, up to a cap, and old mistakes fade. ' +
      'Wait, then sign in with the right token.';
  }
  if (err.status === 429) return `The gateway is busy (${err.detail}); retry in ${err.retryAfter || 1} s.`;
  if (err.code === 'no_token_configured') {
    return 'The gateway has no token configured: run `abstractgateway token rotate` on its machine.';
  }
  if (err.code === 'origin_not_allowed') {
    return 'The gateway refuses this page\'s origin: add it to ABSTRACTGATEWAY_ALLOWED_ORIGINS.';
  }
  if (err.status === 0) return err.detail;
  return `${err.detail || err.message} (${err.status}${err.code ? ' ' + err.code : ''})`;
}

// -- gateway info and sign-in ----------------------------------------------------------------------

async function loadHealth() {
  try {
    const resp = await fetch('/api/health', {cache: 'no-store'});
    const data = await resp.json();
    const runner = data.runner || {};
    const store = data.store || {};
    const lease = runner.lease;
    const problems = [];
    if (store.error) problems.push('store: ' + store.error);
    if (store.write_failure) problems.push('last write failed (' + store.write_failure.code + ', ' + store.write_failure.at + '): ' + store.write_failure.detail);
    $('info-status').textContent = data.status + (problems.length ? ' — ' + problems.join('; ') : '');
    $('info-version').textContent = data.version || '?';
    $('info-backend').textContent = store.backend || '?';
    const leaseText = lease ? ` (lease: ${lease.live ? 'live' : 'expired'}, epoch ${lease.epoch}, held ${Math.round(lease.held_for_s || 0)} s)` : '';
    $('info-runner').textContent = (!runner.enabled
      ? (runner.external_lease_live ? 'in another process' : 'not running (no live runner lease)')
      : (runner.alive ? 'alive' : 'stopped') + (runner.has_lease ? ', holds the lease' : ', waiting for the lease') +
        (runner.last_error ? ' — last error: ' + runner.last_error : '')) + leaseText;
    const dbPath = store.db_path || store.path;
    if (dbPath) $('info-db').textContent = dbPath;
    const pill = $('health-pill');
    pill.textContent = (data.status || 'unknown') + ' · v' + (data.version || '?');
    pill.className = 'pill' + (data.status === 'healthy' ? '' : ' s-failed');
  } catch (err) {
    $('health-pill').textContent = 'gateway unreachable';
    $('info-status').textContent = 'unreachable (' + err.message + ')';
  }
}

async function signIn(token) {
  state.token = token;
  const data = await api('/ping');  // throws ApiError with the reason
  sessionStorage.setItem(TOKEN_KEY, token);
  state.signedIn = true;
  $('info-db').textContent = data.db_path || $('info-db').textContent;
  if (data.backend) $('info-backend').textContent = data.backend;
  $('nav').hidden = false;
  $('signout').hidden = false;
  $('view-signin').hidden = true;
  if (matchMedia('(max-width: 640px)').matches) $('gateway-details').open = false;  // room for the runs on a phone
}

function signOut(message) {
  state.signedIn = false;
  state.token = '';
  sessionStorage.removeItem(TOKEN_KEY);
  stopView();
  $('nav').hidden = true;
  $('signout').hidden = true;
  $('info-db').textContent = 'shown after sign-in';
  $('gateway-details').open = true;
  for (const v of document.querySelectorAll('.view')) v.hidden = v.id !== 'view-signin';
  const err = $('signin-error');
  err.hidden = !message;
  err.textContent = message || '';
  $('signin-token').value = '';
}

function lockSignIn(seconds) {
  const button = $('signin-button');
  let left = seconds;
  button.disabled = true;
  button.textContent = `Sign in (wait ${left} s)`;
  const timer = setInterval(() => {
    left -= 1;
    if (left > 0) { button.textContent = `Sign in (wait ${left} s)`; return; }
    clearInterval(timer);
    button.disabled = false;
    button.textContent = 'Sign in';
  }, 1000);
}

$('signin-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const err = $('signin-error');
  err.hidden = true;
  try {
    await signIn($('signin-token').value.trim());
    route();
  } catch (e) {
    state.token = '';
    err.textContent = explain(e);
    err.hidden = false;
    if (e.code === 'auth_lockout') lockSignIn(e.retryAfter || 1);
  }
});
$('signout').addEventListener('click', () => signOut(''));

// -- confirmation dialog ---------------------------------------------------------------------------

function confirmAction(text, {reason = false, ok = 'Confirm'} = {}) {
  const dialog = $('confirm-dialog');
  $('confirm-text').textContent = text;
  $('confirm-reason-box').hidden = !reason;
  $('confirm-reason').value = '';
  $('confirm-ok').textContent = ok;
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => {
      resolve(dialog.returnValue === 'ok' ? {reason: $('confirm-reason').value.trim() || null} : null);
    }, {once: true});
    dialog.returnValue = '';
    dialog.showModal();
  });
}

// -- router ----------------------------------------------------------------------------------------

function stopView() {
  for (const t of state.timers) clearInterval(t);
  state.timers = [];
  if (state.run) { state.run.stopped = true; state.run.abort.abort(); state.run = null; }
}

function route() {
  if (!state.signedIn) return;
  stopView();
  const hash = location.hash.replace(/^#\/?/, '') || 'runs';
  const [pathPart, queryPart] = hash.split('?');
  const parts = pathPart.split('/').map(decodeURIComponent);
  const params = new URLSearchParams(queryPart || '');
  const views = {runs: showRuns, run: showRun, bundles: showBundles, start: showStart, schedules: showSchedules,
                 audit: showAudit};
  const name = views[parts[0]] ? parts[0] : 'runs';
  for (const v of document.querySelectorAll('.view')) v.hidden = v.id !== 'view-' + name;
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.getAttribute('href') === '#/' + name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  state.view = name;
  views[name](parts.slice(1), params);
}
window.addEventListener('hashchange', route);

// -- entrypoints (shared by the filters, the start form and the bundle list) -----------------------

async function loadEntrypoints() {
  const data = await api('/bundles?include_deprecated=true');
  state.bundles = data.items;
  state.defaultBundle = data.default_bundle_id;
  state.entrypoints = [];
  for (const b of data.items) {
    for (const e of b.entrypoints) {
      state.entrypoints.push({bundle_id: b.bundle_id, flow_id: e.flow_id, workflow_id: e.workflow_id,
                              name: e.name || e.flow_id, deprecated: e.deprecated});
    }
  }
  return state.entrypoints;
}

// -- runs list -------------------------------------------------------------------------------------

const runsView = {rows: new Map(), cursor: null, filters: {}};

function runsQuery(cursor) {
  const q = new URLSearchParams({limit: '50'});
  for (const [k, v] of Object.entries(runsView.filters)) if (v) q.set(k, v);
  if (cursor) q.set('cursor', cursor);
  return '/runs?' + q;
}

function runRow(item) {
  const tr = h('tr', {'data-run': item.run_id});
  fillRunRow(tr, item);
  return tr;
}

function fillRunRow(tr, item) {
  tr.replaceChildren(
    h('td', {}, badge(item.status, item.paused)),
    h('td', {}, h('a', {href: '#/run/' + enc(item.run_id), title: item.run_id}, h('code', {text: short(item.run_id)}))),
    h('td', {}, h('code', {text: item.workflow_id}), item.parent_run_id ? h('span', {class: 'muted', text: ' (child)'}) : null),
    h('td', {}, h('code', {text: short(item.session_id), title: item.session_id || ''})),
    h('td', {title: item.updated_at || '', text: age(item.updated_at)}),
    h('td', {text: item.ledger_len === undefined ? '' : String(item.ledger_len)}));
  tr.dataset.sig = item.status + '|' + item.updated_at + '|' + item.ledger_len;
}

async function showRuns() {
  const body = $('runs-body');
  body.replaceChildren();
  runsView.rows = new Map();
  runsView.filters = {
    status: $('filter-status').value, workflow_id: $('filter-workflow').value,
    session_id: $('filter-session').value.trim(), root_only: $('filter-root').checked ? 'true' : '',
  };
  fillWorkflowFilter();
  try {
    const page = await api(runsQuery());
    for (const item of page.items) {
      const tr = runRow(item);
      runsView.rows.set(item.run_id, tr);
      body.append(tr);
    }
    runsView.cursor = page.next_cursor;
    $('runs-more').hidden = !page.next_cursor;
    $('runs-empty').hidden = page.items.length > 0;
  } catch (err) { toast(explain(err), true); }
  every(2000, refreshRuns);
}

async function fillWorkflowFilter() {
  const select = $('filter-workflow');
  if (select.options.length > 1) return;
  try {
    for (const e of await loadEntrypoints()) select.append(h('option', {value: e.workflow_id, text: e.workflow_id}));
    select.value = runsView.filters.workflow_id || '';
  } catch (err) { /* the list still works without the bundle filter */ }
}

async function refreshRuns() {
  if (state.view !== 'runs' || document.hidden) return;
  let page;
  try { page = await api(runsQuery()); } catch (err) { return; }
  const body = $('runs-body');
  let anchor = body.firstChild;
  for (const item of page.items) {  // newest first: update rows in place, insert new ones on top
    const tr = runsView.rows.get(item.run_id);
    if (tr) {
      if (tr.dataset.sig !== item.status + '|' + item.updated_at + '|' + item.ledger_len) fillRunRow(tr, item);
      else tr.children[4].textContent = age(item.updated_at);
      if (tr !== anchor) body.insertBefore(tr, anchor); else anchor = anchor.nextSibling;
    } else {
      const row = runRow(item);
      runsView.rows.set(item.run_id, row);
      body.insertBefore(row, anchor);
    }
  }
  // Rows the refreshed page no longer holds (they left the filter or the first page) but that can still
  // change: follow them one by one, so every status on screen stays live.
  const inPage = new Set(page.items.map((i) => i.run_id));
  const stale = [...runsView.rows].filter(([id, tr]) => !inPage.has(id) && !TERMINAL.has(tr.dataset.sig.split('|')[0]));
  await Promise.all(stale.slice(0, 20).map(async ([id, tr]) => {
    try {
      const s = await api('/runs/' + enc(id));
      s.ledger_len = tr.dataset.sig.split('|')[2];
      if (tr.dataset.sig !== s.status + '|' + s.updated_at + '|' + s.ledger_len) fillRunRow(tr, s);
    } catch (err) { /* removed or unreachable: leave the row */ }
  }));
  $('runs-empty').hidden = body.children.length > 0;
}

$('runs-filter').addEventListener('submit', (ev) => { ev.preventDefault(); showRuns(); });
$('runs-more').addEventListener('click', async () => {
  try {
    const page = await api(runsQuery(runsView.cursor));
    for (const item of page.items) {
      if (runsView.rows.has(item.run_id)) continue;
      const tr = runRow(item);
      runsView.rows.set(item.run_id, tr);
      $('runs-body').append(tr);
    }
    runsView.cursor = page.next_cursor;
    $('runs-more').hidden = !page.next_cursor;
  } catch (err) { toast(explain(err), true); }
});

// -- run detail ------------------------------------------------------------------------------------

function showRun(parts) {
  const runId = parts[0];
  const run = {
    id: runId, cursor: 0, records: [], queue: [], stopped: false, abort: new AbortController(),
    summary: null, waitSig: null, scheduleSig: null, refreshing: false, refreshAgain: false, lastRefresh: 0,
  };
  state.run = run;
  $('run-id').textContent = runId;
  $('run-status').replaceChildren();
  $('run-meta').replaceChildren();
  $('ledger').replaceChildren();
  $('ledger-count').textContent = '0 records';
  $('ledger-state').textContent = '';
  $('run-note').textContent = '';
  $('run-wait').hidden = true;
  const sched = $('run-schedule');
  sched.hidden = true;
  sched.parts = null;
  sched.dataset.sig = '';
  sched.replaceChildren();
  $('run-tree').replaceChildren();
  $('run-commands').replaceChildren();
  $('run-artifacts').replaceChildren();
  refreshRun(run);
  streamLedger(run);
  every(3000, () => { if (!document.hidden) refreshRun(run); });
}

// Refresh the summary, commands, tree and artifacts; coalesces bursts (one request set at a time).
async function refreshRun(run) {
  if (run.stopped) return;
  if (run.refreshing) { run.refreshAgain = true; return; }
  run.refreshing = true;
  try {
    const [summary, commands, artifacts] = await Promise.all([
      api('/runs/' + enc(run.id)), api('/runs/' + enc(run.id) + '/commands?limit=50'),
      api('/runs/' + enc(run.id) + '/artifacts?limit=200')]);
    const asking = await descendantAsking(summary);
    if (run.stopped) return;
    run.summary = summary;
    run.asking = asking;
    renderSummary(run, summary);
    renderCommands(commands.items);
    renderArtifacts(run, artifacts.items);
    await renderTree(run, summary);
  } catch (err) {
    if (err.name !== 'AbortError' && !run.stopped) setNote($('run-note'), explain(err), 'bad');
  } finally {
    run.refreshing = false;
    run.lastRefresh = Date.now();
    if (run.refreshAgain && !run.stopped) { run.refreshAgain = false; setTimeout(() => refreshRun(run), 150); }
  }
}

function renderSummary(run, s) {
  $('run-status').replaceChildren(badge(s.status, s.paused));
  const rows = [['Workflow', s.workflow_id], ['Session', s.session_id], ['Current node', s.current_node],
                ['Created', s.created_at], ['Updated', s.updated_at]];
  const meta = [];
  for (const [k, v] of rows) if (v) meta.push(h('dt', {text: k}), h('dd', {}, h('code', {text: v})));
  if (s.parent_run_id) {
    meta.push(h('dt', {text: 'Parent'}), h('dd', {}, h('a', {href: '#/run/' + enc(s.parent_run_id)}, h('code', {text: s.parent_run_id}))));
  }
  if (s.paused) meta.push(h('dt', {text: 'Paused'}), h('dd', {text: (s.paused_at || '') + (s.pause_reason ? ' — ' + s.pause_reason : '')}));
  if (s.error) meta.push(h('dt', {text: 'Error'}), h('dd', {class: 'error', text: s.error}));
  $('run-meta').replaceChildren(...meta);
  const terminal = TERMINAL.has(s.status);
  $('run-pause').disabled = terminal || s.paused;
  $('run-resume').disabled = terminal || !s.paused;
  $('run-cancel').disabled = terminal;
  renderWait(run, s);
  renderSchedule($('run-schedule'), s);
}

function renderCommands(items) {
  const list = $('run-commands');
  if (!items.length) { list.replaceChildren(h('li', {class: 'muted', text: 'No commands sent to this run.'})); return; }
  list.replaceChildren(...items.map((c) => h('li', {},
    h('strong', {text: c.type}),
    h('span', {class: 'badge ' + (c.status === 'applied' ? 's-completed' : c.status === 'failed' ? 's-failed' : 's-running'), text: c.status}),
    c.error ? h('span', {class: 'error', text: c.error}) : null,
    h('span', {class: 'muted', text: c.ts || ''}))));
}

function renderArtifacts(run, items) {
  const list = $('run-artifacts');
  if (!items.length) { list.replaceChildren(h('li', {class: 'muted', text: 'No artifacts.'})); return; }
  list.replaceChildren(...items.map((a) => h('li', {},
    h('a', {href: API + '/runs/' + enc(run.id) + '/artifacts/' + enc(a.artifact_id) + '/content', class: 'download',
            'data-artifact': a.artifact_id, onclick: (ev) => { ev.preventDefault(); download(run.id, a); }},
      'Download ', h('code', {text: a.artifact_id})),
    h('span', {class: 'muted', text: (a.content_type || '') + ' · ' + bytes(a.size_bytes || 0) + ' · ' + (a.created_at || '')}))));
}

// A plain link cannot carry the bearer header: fetch the bytes, then save them from a blob URL.
async function download(runId, artifact) {
  try {
    const resp = await api('/runs/' + enc(runId) + '/artifacts/' + enc(artifact.artifact_id) + '/content', {raw: true});
    const url = URL.createObjectURL(await resp.blob());
    const ext = (artifact.content_type || '').includes('json') ? '.json' : (artifact.content_type || '').startsWith('text/') ? '.txt' : '';
    const link = h('a', {href: url, download: artifact.artifact_id + ext});
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) { toast(explain(err), true); }
}

async function renderTree(run, s) {
  if (!s.session_id) { $('run-tree').replaceChildren(h('p', {class: 'muted', text: 'No session.'})); return; }
  const page = await api('/runs?' + new URLSearchParams({session_id: s.session_id, limit: '500', include_ledger_len: 'false'}));
  const byId = new Map(page.items.map((r) => [r.run_id, r]));
  if (!byId.has(s.run_id)) byId.set(s.run_id, s);
  const children = new Map();
  for (const r of byId.values()) {
    if (!r.parent_run_id) continue;
    if (!children.has(r.parent_run_id)) children.set(r.parent_run_id, []);
    children.get(r.parent_run_id).push(r);
  }
  let root = s;
  const seen = new Set();
  while (root.parent_run_id && byId.has(root.parent_run_id) && !seen.has(root.run_id)) {
    seen.add(root.run_id);
    root = byId.get(root.parent_run_id);
  }
  const node = (r, depth) => {
    const kids = (children.get(r.run_id) || []).sort((a, b) => (a.created_at || '').localeCompare(b.created_at || ''));
    const w = r.waiting;
    const sched = w && w.reason === 'until' && w.until ? ' · next at ' + w.until : w && w.reason ? ' · waiting for ' + w.reason : '';
    return h('li', {class: r.run_id === s.run_id ? 'here' : null},
      h('span', {}, badge(r.status, r.paused), ' ',
        h('a', {href: '#/run/' + enc(r.run_id), title: r.run_id}, h('code', {text: short(r.run_id)})), ' ',
        h('code', {text: r.workflow_id}), h('span', {class: 'muted', text: sched})),
      kids.length && depth < 20 ? h('ul', {}, kids.map((k) => node(k, depth + 1))) : null);
  };
  const tree = h('ul', {class: 'tree'}, node(root, 0));
  $('run-tree').replaceChildren(tree);
  if (!children.size) $('run-tree').append(h('p', {class: 'muted', text: 'No child runs.'}));
}

// -- schedules -------------------------------------------------------------------------------------

function renderSchedule(box, s) {
  if (!s.is_scheduled || !s.schedule) { box.hidden = true; return; }
  const sig = JSON.stringify([s.schedule, s.status, s.paused, s.waiting && s.waiting.until]);
  if (box.dataset.sig === sig) return;
  box.dataset.sig = sig;
  box.hidden = false;
  if (!box.parts || box.parts.runId !== s.run_id) {  // built once: a re-render never clobbers typing
    const input = h('input', {type: 'text', id: 'sched-new-' + s.run_id, value: s.schedule.interval || '', spellcheck: 'false'});
    const note = h('p', {class: 'note', role: 'status', 'aria-live': 'polite'});
    const form = h('form', {class: 'schedule-form', onsubmit: async (ev) => {
      ev.preventDefault();
      await sendCommand(s.run_id, 'update_schedule', {interval: input.value.trim()}, 'Schedule update', note);
    }}, h('label', {for: input.id, text: 'New interval'}), input, h('button', {type: 'submit', text: 'Update schedule'}));
    box.parts = {runId: s.run_id, title: h('h3'), dl: h('dl', {class: 'meta'}), form, note};
    box.replaceChildren(box.parts.title, box.parts.dl, form, note);
  }
  const sc = s.schedule;
  const next = s.waiting && s.waiting.reason === 'until' ? s.waiting.until : null;
  box.parts.title.replaceChildren('Schedule ', h('a', {href: '#/run/' + enc(s.run_id)}, h('code', {text: short(s.run_id)})),
                                  badge(s.status, s.paused));
  box.parts.dl.replaceChildren(
    h('dt', {text: 'Runs'}), h('dd', {}, h('code', {text: sc.target_workflow_id || ''})),
    h('dt', {text: 'Every'}), h('dd', {text: sc.interval || 'once'}),
    h('dt', {text: 'Repeat'}), h('dd', {text: sc.repeat_count ? sc.repeat_count + ' times' : sc.repeat_until ? 'until ' + sc.repeat_until : 'no limit'}),
    h('dt', {text: 'Next run'}), h('dd', {text: TERMINAL.has(s.status) ? 'none (' + s.status + ')' : next || (s.paused ? 'paused' : 'running now')}));
  box.parts.form.hidden = !sc.interval || TERMINAL.has(s.status);
}

async function showSchedules() {
  const list = $('schedule-list');
  list.replaceChildren(h('p', {class: 'muted', text: 'Loading…'}));
  try {
    const page = await api('/runs?' + new URLSearchParams({root_only: 'true', limit: '500', include_ledger_len: 'false'}));
    const scheduled = page.items.filter((r) => (r.workflow_id || '').startsWith('scheduled:')).slice(0, 50);
    const boxes = await Promise.all(scheduled.map(async (r) => {
      const box = h('section', {class: 'card'});
      renderSchedule(box, await api('/runs/' + enc(r.run_id)));
      return box;
    }));
    list.replaceChildren(...(boxes.length ? boxes : [h('p', {class: 'muted', text: 'No schedules yet.'})]));
  } catch (err) { list.replaceChildren(h('p', {class: 'error', text: explain(err)})); }
}

// -- commands --------------------------------------------------------------------------------------

// Append a command, then follow its outcome (pending -> applied | failed with the reason). A command for
// another run (a descendant's question answered from this page) reports in the page's note as well: its
// form goes away as soon as the descendant moves on.
async function sendCommand(runId, type, payload, label, noteEl) {
  const note = noteEl || $('run-note');
  const report = (text, cls) => {
    setNote(note, text, cls);
    if (state.run && runId !== state.run.id && note !== $('run-note')) setNote($('run-note'), text, cls);
  };
  const commandId = newId();
  try {
    await api('/commands', {method: 'POST', body: {command_id: commandId, run_id: runId, type, payload, client_id: 'console'}});
  } catch (err) { report(label + ' refused: ' + explain(err), 'bad'); return null; }
  setNote(note, label + ': sent, waiting for the runner…');
  if (state.run) refreshRun(state.run);
  const deadline = Date.now() + 30000;
  let result = null;
  while (Date.now() < deadline) {
    let outcome;
    try { outcome = await api('/commands/' + enc(commandId)); } catch (err) { report(explain(err), 'bad'); return null; }
    if (outcome.status === 'applied') { report(label + ': applied.', 'good'); result = 'applied'; break; }
    if (outcome.status === 'failed') { report(label + ' failed: ' + (outcome.error || 'no reason given'), 'bad'); break; }
    await new Promise((r) => setTimeout(r, 200));
  }
  if (Date.now() >= deadline) report(label + ': still pending (is the runner running?)', 'bad');
  if (state.run) refreshRun(state.run);
  return result;
}

$('run-pause').addEventListener('click', async () => {
  const ok = await confirmAction('Pause this run (and its child runs)?', {reason: true, ok: 'Pause'});
  if (!ok || !state.run) return;
  const w = state.run.summary && state.run.summary.waiting;
  const applied = await sendCommand(state.run.id, 'pause', ok.reason ? {reason: ok.reason} : {}, 'Pause');
  if (applied && w && w.reason === 'user') {  // the runtime's rule: a question already blocks the run
    setNote($('run-note'), 'Pause: applied. A run waiting for an answer stays as it is: it cannot move until answered.', 'good');
  }
});
$('run-resume').addEventListener('click', () => { if (state.run) sendCommand(state.run.id, 'resume', {}, 'Resume'); });
$('run-cancel').addEventListener('click', async () => {
  const ok = await confirmAction('Cancel this run and its child runs? This cannot be undone.', {reason: true, ok: 'Cancel run'});
  if (ok && state.run) sendCommand(state.run.id, 'cancel', ok.reason ? {reason: ok.reason} : {}, 'Cancel');
});

// -- what the run waits for, and the action that answers it ----------------------------------------

function parseJsonField(text, name) {
  if (!text.trim()) return {};
  try { return JSON.parse(text); } catch (e) { throw new Error(name + ' is not valid JSON: ' + e.message); }
}

// A run waiting on a child run waits, in the end, on whatever the deepest waiting descendant waits for:
// follow the chain down and return that descendant's summary when it asks for something (a question, a
// tool approval, an event, a resume payload), so the operator can answer it from the run they opened.
async function descendantAsking(s) {
  let current = s;
  for (let depth = 0; depth < 8; depth++) {
    const w = current.status === 'waiting' && current.waiting;
    if (!w) return null;
    if (w.reason !== 'subworkflow') return current === s || w.reason === 'until' ? null : current;
    const sub = (w.details || {}).sub_run_id;
    if (!sub) return null;
    try { current = await api('/runs/' + enc(sub)); } catch (err) { return null; }
  }
  return null;
}

function renderWait(run, s) {
  const box = $('run-wait');
  const w = s.waiting;
  if (s.status !== 'waiting' || !w) { box.hidden = true; run.waitSig = null; return; }
  const asking = w.reason === 'subworkflow' ? run.asking : null;
  const aw = asking && asking.waiting;
  const sig = JSON.stringify([w.wait_key, w.reason, s.paused, w.until, asking && asking.run_id, aw && aw.wait_key,
                              asking && asking.paused]);
  if (run.waitSig === sig) return;  // do not clobber an answer being typed
  run.waitSig = sig;
  box.hidden = false;
  const body = $('wait-body');
  if (w.reason === 'subworkflow') {
    const sub = (w.details || {}).sub_run_id;
    const link = (id) => h('a', {href: '#/run/' + enc(id)}, h('code', {text: id}));
    const waitingFor = h('p', {}, 'Waiting for the child run ', sub ? link(sub) : 'to finish', '.');
    if (!asking) {
      body.replaceChildren(waitingFor);
      $('wait-title').textContent = 'Waiting';
      return;
    }
    body.replaceChildren(waitingFor, h('p', {class: 'asking'}, 'Its descendant ', link(asking.run_id), ' needs an answer:'),
      ...waitForm(asking));
    $('wait-title').textContent = waitTitle(aw);
    return;
  }
  body.replaceChildren(...waitForm(s));
  $('wait-title').textContent = waitTitle(w);
}

function waitTitle(w) {
  const details = w.details || {};
  return w.reason === 'user' ? 'Question' :
    details.mode === 'approval_required' ? 'Tool approval' : w.reason === 'event' ? 'Waiting for an event' : 'Waiting';
}

// The form that answers what run `s` waits for (addressed to `s`, whichever page shows it).
function waitForm(s) {
  const w = s.waiting;
  const details = w.details || {};
  const paused = s.paused ? [h('p', {class: 'muted', text: 'The run is paused: resume it before answering.'})] : [];
  if (w.reason === 'user') return [...paused, askForm(s, w)];
  if (details.mode === 'approval_required' && Array.isArray(details.tool_calls)) return [...paused, approvalForm(s, w)];
  if (w.reason === 'event') return [...paused, eventForm(s, w)];
  if (w.reason === 'until') return [h('p', {text: 'Waiting until ' + (w.until || '?') + '.'})];
  return [h('p', {text: 'Waiting (' + w.reason + ')' + (w.wait_key ? ' on ' + w.wait_key : '') + '.'}), resumeForm(s, w)];
}

function askForm(s, w) {
  const note = h('p', {class: 'note', role: 'status', 'aria-live': 'polite'});
  const answer = (text) => sendCommand(s.run_id, 'resume', {wait_key: w.wait_key, payload: {response: text}}, 'Answer', note);
  const area = h('textarea', {id: 'wait-answer', rows: '3'});
  const form = h('form', {id: 'answer-form', onsubmit: (ev) => { ev.preventDefault(); answer(area.value); }},
    h('p', {class: 'prompt', id: 'wait-prompt', text: w.prompt || '(no prompt)'}));
  const choices = Array.isArray(w.choices) ? w.choices : [];
  if (choices.length) {
    form.append(h('div', {class: 'actions', role: 'group', 'aria-label': 'Choices'},
      choices.map((c) => h('button', {type: 'button', class: 'quiet', text: String(c), onclick: () => answer(String(c))}))));
  }
  if (w.allow_free_text !== false || !choices.length) {
    form.append(h('label', {for: 'wait-answer', text: 'Your answer'}), area, h('button', {type: 'submit', text: 'Send answer'}));
  }
  form.append(note);
  return form;
}

function approvalForm(s, w) {
  const calls = w.details.tool_calls;
  const note = h('p', {class: 'note', role: 'status', 'aria-live': 'polite'});
  const results = [];
  const items = calls.map((call, i) => {
    const id = 'tool-result-' + i;
    const area = h('textarea', {id, rows: '2', placeholder: 'the output of running it'});
    results.push(area);
    return h('div', {class: 'toolcall'},
      h('p', {}, h('strong', {text: call.name || 'tool'}), ' ', h('code', {class: 'muted', text: call.call_id || ''})),
      h('pre', {class: 'args', text: JSON.stringify(call.arguments || {}, null, 2)}),
      h('label', {for: id, text: 'Result to return (optional)'}), area);
  });
  const reason = h('input', {type: 'text', id: 'deny-reason'});
  // Named in every answer: the agent reuses this wait key for its next tool step, so a late answer
  // (a second tab, a double click) must not be taken for an answer to calls it never saw.
  const callIds = calls.map((c) => c.runtime_call_id).filter(Boolean);
  const approve = () => {
    const given = results.some((a) => a.value.trim());
    const payload = given
      ? {mode: 'executed', results: calls.map((c, i) => ({call_id: c.call_id, runtime_call_id: c.runtime_call_id,
                                                           name: c.name, success: true, output: results[i].value, error: null}))}
      : {approved: true, runtime_call_ids: callIds};
    sendCommand(s.run_id, 'resume', {wait_key: w.wait_key, payload}, given ? 'Approval with results' : 'Approval', note);
  };
  const deny = () => sendCommand(s.run_id, 'resume', {wait_key: w.wait_key,
    payload: {approved: false, reason: reason.value.trim() || 'Denied by the operator', runtime_call_ids: callIds}},
    'Denial', note);
  // What "Approve" without a result does depends on the gateway's tool mode: only `local` runs tools.
  const mode = h('p', {class: 'muted', id: 'approval-mode'});
  toolMode().then((m) => {
    mode.textContent = m === 'local'
      ? 'Approving without a result lets the gateway run the tool (local tool mode).'
      : 'This gateway runs no tool itself (' + m + ' tool mode): run the call and give its result; '
        + 'approving without one answers the agent with an error.';
  });
  return h('div', {id: 'approval', 'data-run': s.run_id},
    h('p', {text: calls.length === 1 ? 'The run asks to call this tool:' : `The run asks to call ${calls.length} tools:`}),
    items, mode,
    h('label', {for: 'deny-reason', text: 'Reason if denied (optional)'}), reason,
    h('div', {class: 'actions'},
      h('button', {type: 'button', id: 'approve-button', text: 'Approve', onclick: approve}),
      h('button', {type: 'button', id: 'deny-button', class: 'danger', text: 'Deny', onclick: deny})),
    note);
}

// The gateway's tool mode (`passthrough` or `local`), asked once per page.
function toolMode() {
  if (!state.toolMode) {
    state.toolMode = api('/discovery/tools').then((d) => d.tool_mode, () => { state.toolMode = null; return 'passthrough'; });
  }
  return state.toolMode;
}

// An `evt:<scope>:<scope id>:<name>` wait is answered by emitting that event; any other key by a resume.
function eventForm(s, w) {
  const m = /^evt:(session|workflow|run|global):(.*):([^:]+)$/.exec(w.wait_key || '');
  if (!m) return resumeForm(s, w);
  const [, scope, scopeId, name] = m;
  const note = h('p', {class: 'note', role: 'status', 'aria-live': 'polite'});
  const nameInput = h('input', {type: 'text', id: 'emit-name', value: name, spellcheck: 'false'});
  const data = h('textarea', {id: 'emit-payload', rows: '3', text: '{}'});
  const form = h('form', {id: 'emit-form', onsubmit: (ev) => {
    ev.preventDefault();
    let payload;
    try { payload = parseJsonField(data.value, 'Payload'); } catch (e) { setNote(note, e.message, 'bad'); return; }
    const p = {name: nameInput.value.trim(), scope, payload};
    if (scope === 'session') p.session_id = scopeId;
    if (scope === 'workflow') p.workflow_id = scopeId;
    if (scope === 'run') p.run_id = scopeId;
    sendCommand(s.run_id, 'emit_event', p, 'Event', note);
  }},
  h('p', {}, 'Waiting for the event ', h('code', {text: name}), ` (scope ${scope}).`),
  h('label', {for: 'emit-name', text: 'Event name'}), nameInput,
  h('label', {for: 'emit-payload', text: 'Payload (JSON)'}), data,
  h('button', {type: 'submit', text: 'Emit event'}), note);
  return form;
}

function resumeForm(s, w) {
  const note = h('p', {class: 'note', role: 'status', 'aria-live': 'polite'});
  const data = h('textarea', {id: 'resume-payload', rows: '3', text: '{}'});
  return h('form', {id: 'resume-form', onsubmit: (ev) => {
    ev.preventDefault();
    let payload;
    try { payload = parseJsonField(data.value, 'Payload'); } catch (e) { setNote(note, e.message, 'bad'); return; }
    sendCommand(s.run_id, 'resume', {wait_key: w.wait_key, payload}, 'Resume with payload', note);
  }},
  h('p', {}, 'Waiting on the key ', h('code', {text: w.wait_key || '(none)'}), '.'),
  h('label', {for: 'resume-payload', text: 'Payload to resume with (JSON object)'}), data,
  h('button', {type: 'submit', text: 'Resume with payload'}), note);
}

// -- the ledger: SSE over fetch (EventSource cannot send the bearer header) ------------------------

async function streamLedger(run) {
  let retryMs = 2000;
  let drops = 0;
  while (!run.stopped) {
    let ended = false;
    try {
      const headers = {Accept: 'text/event-stream'};
      if (run.cursor > 0) headers['Last-Event-ID'] = String(run.cursor);  // resume with no gap or duplicate
      const resp = await api('/runs/' + enc(run.id) + '/ledger/stream?after=' + run.cursor,
                             {raw: true, headers, signal: run.abort.signal});
      $('ledger-state').textContent = '· live';
      drops = 0;
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      let event = {data: []};
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let start = 0;
        let nl;
        while ((nl = buffer.indexOf('\n', start)) >= 0) {
          let line = buffer.slice(start, nl);
          start = nl + 1;
          if (line.endsWith('\r')) line = line.slice(0, -1);
          if (line === '') {
            if (event.data.length || event.event) ended = onStreamEvent(run, event) || ended;
            event = {data: []};
            continue;
          }
          if (line[0] === ':') continue;  // keep-alive comment
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? '' : line.slice(colon + 1);
          if (val[0] === ' ') val = val.slice(1);
          if (field === 'data') event.data.push(val);
          else if (field === 'event') event.event = val;
          else if (field === 'id') event.id = val;
          else if (field === 'retry' && /^\d+$/.test(val)) retryMs = parseInt(val, 10);
        }
        buffer = buffer.slice(start);
        if (ended) break;
      }
    } catch (err) {
      if (run.stopped || err.name === 'AbortError') return;
      if (err.status && err.status !== 429 && err.status !== 0) {
        $('ledger-state').textContent = '· stream refused: ' + explain(err);
        return;
      }
    }
    if (ended || run.stopped) return;
    drops += 1;
    $('ledger-state').textContent = `· connection lost, reconnecting (attempt ${drops})…`;
    await new Promise((r) => setTimeout(r, drops === 1 ? Math.min(retryMs, 500) : retryMs));
  }
}

// Returns true when the stream is over for good (the run is terminal).
function onStreamEvent(run, event) {
  if (event.event === 'done') {  // only ever sent once the run is terminal
    $('ledger-state').textContent = '· complete';
    refreshRun(run);
    return true;
  }
  if (event.event !== 'step') return false;  // server_stopping: the stream ends, we reconnect from our cursor
  const data = JSON.parse(event.data.join('\n'));
  if (data.cursor <= run.cursor) return false;  // already shown
  run.cursor = data.cursor;
  run.records.push(data.record);
  run.queue.push(data.cursor);
  if (!run.frame) run.frame = requestAnimationFrame(() => flushLedger(run));
  return false;
}

// Append the queued records once per frame (at most ROWS_PER_FRAME, so a burst of thousands
// never blocks input for long): the list is only ever appended to, never rebuilt. A row is one
// element with one text node; its JSON is rendered only when it is opened.
const ROWS_PER_FRAME = 2000;
const CHUNK_ROWS = 250;

function flushLedger(run) {
  if (run.frame) { cancelAnimationFrame(run.frame); run.frame = 0; }
  if (!run.queue.length || run.stopped) return;
  const batch = run.queue.length > ROWS_PER_FRAME ? run.queue.splice(0, ROWS_PER_FRAME) : run.queue.splice(0);
  // Rows go into blocks of CHUNK_ROWS; a block off screen is skipped by style and layout
  // (content-visibility), so a long ledger costs about what the visible rows cost.
  const ledger = $('ledger');
  let chunk = ledger.lastElementChild;
  for (const cursor of batch) {
    if (!chunk || chunk.childElementCount >= CHUNK_ROWS) {
      chunk = h('ol', {class: 'chunk', start: String(cursor)});
      ledger.append(chunk);
    }
    const r = run.records[cursor - 1] || {};
    // A record is whatever was stored: text it, whatever its fields hold (one odd record must not stop the rest).
    const effect = String(r.effect && r.effect.type ? r.effect.type : '');
    const when = String(r.ended_at || r.started_at || '');
    const li = document.createElement('li');
    li.className = 'st-' + String(r.status || '').replace(/[^a-z_]/g, '');
    li.dataset.cursor = cursor;
    li.tabIndex = 0;
    li.setAttribute('role', 'button');
    li.setAttribute('aria-expanded', 'false');
    li.textContent = ('#' + cursor).padEnd(7) + ' ' + String(r.node_id || '—').padEnd(14) + ' ' +
      String(r.status || '').padEnd(10) + ' ' + effect.padEnd(16) + ' ' + (when ? when.slice(11, 23) : '');
    chunk.append(li);
  }
  $('ledger-count').textContent = (run.cursor - run.queue.length) + (run.cursor - run.queue.length === 1 ? ' record' : ' records');
  if (run.queue.length) run.frame = requestAnimationFrame(() => flushLedger(run));
  else if (Date.now() - run.lastRefresh > 400) refreshRun(run);  // new records usually mean a new status or wait
}

function toggleRecord(li) {
  if (!li || !li.dataset.cursor || !state.run) return;
  const open = li.getAttribute('aria-expanded') === 'true';
  li.setAttribute('aria-expanded', open ? 'false' : 'true');
  if (open) { li.querySelector('pre').remove(); return; }
  li.append(h('pre', {text: JSON.stringify(state.run.records[parseInt(li.dataset.cursor, 10) - 1], null, 2)}));
}

$('ledger').addEventListener('click', (ev) => {
  if (ev.target.closest('pre')) return;  // selecting text in an open record does not close it
  toggleRecord(ev.target.closest('li[data-cursor]'));
});
$('ledger').addEventListener('keydown', (ev) => {
  if ((ev.key === 'Enter' || ev.key === ' ') && ev.target.matches('#ledger li[data-cursor]')) { ev.preventDefault(); toggleRecord(ev.target); }
});

// -- bundles ---------------------------------------------------------------------------------------

async function showBundles() {
  const list = $('bundle-list');
  try {
    await loadEntrypoints();
  } catch (err) { list.replaceChildren(h('p', {class: 'error', text: explain(err)})); return; }
  list.replaceChildren(...(state.bundles.length ? state.bundles.map(bundleCard)
    : [h('p', {class: 'muted', text: 'No bundles yet: upload a .flow file.'})]));
}

function bundleCard(b) {
  const all = b.entrypoints.length > 0 && b.entrypoints.every((e) => e.deprecated);
  const deprecate = async (flowId, label) => {
    const ok = await confirmAction(`Deprecate ${label}? New runs are refused until it is undeprecated; running ones go on.`,
                                   {reason: true, ok: 'Deprecate'});
    if (!ok) return;
    await bundleAction(() => api('/bundles/' + enc(b.bundle_id) + '/deprecate', {method: 'POST', body: {flow_id: flowId, reason: ok.reason}}),
                       label + ' deprecated.');
  };
  const undeprecate = async (flowId, label) => {
    const ok = await confirmAction(`Undeprecate ${label}? It can be started again.`, {ok: 'Undeprecate'});
    if (!ok) return;
    await bundleAction(() => api('/bundles/' + enc(b.bundle_id) + '/undeprecate', {method: 'POST', body: {flow_id: flowId}}),
                       label + ' undeprecated.');
  };
  const remove = async () => {
    const ok = await confirmAction(`Remove the uploaded bundle ${b.bundle_ref}? Runs already started keep their records.`,
                                   {ok: 'Remove'});
    if (!ok) return;
    await bundleAction(() => api('/bundles/' + enc(b.bundle_id) + '?bundle_version=' + enc(b.bundle_version), {method: 'DELETE'}),
                       b.bundle_ref + ' removed.');
  };
  return h('section', {class: 'card bundle', 'data-bundle': b.bundle_id},
    h('h3', {}, h('code', {text: b.bundle_ref}), h('span', {class: 'muted', text: b.origin === 'upload' ? 'uploaded' : 'from the flows dir'}),
      b.bundle_id === state.defaultBundle ? h('span', {class: 'badge', text: 'default'}) : null),
    b.needs && b.needs.length ? h('p', {}, 'Needs: ', h('code', {text: b.needs.join(', ')})) : null,
    b.load_error ? h('p', {class: 'error', text: 'Load error: ' + b.load_error}) : null,
    b.entrypoints.map((e) => h('div', {class: 'entry'},
      h('div', {class: 'grow'}, h('strong', {text: e.name || e.flow_id}), ' ', h('code', {class: 'muted', text: e.workflow_id}),
        e.description ? h('div', {class: 'muted', text: e.description}) : null,
        e.deprecated ? h('div', {}, h('span', {class: 'badge s-failed', text: 'deprecated'}),
                                    h('span', {class: 'muted', text: ' ' + (e.deprecated_reason || '') + ' ' + (e.deprecated_at || '')})) : null),
      e.deprecated ? null : h('a', {href: '#/start/' + enc(b.bundle_id) + '/' + enc(e.flow_id), class: 'start-link'}, 'Start'),
      e.deprecated
        ? h('button', {type: 'button', class: 'small quiet', text: 'Undeprecate', onclick: () => undeprecate(e.flow_id, e.workflow_id)})
        : h('button', {type: 'button', class: 'small quiet', text: 'Deprecate', onclick: () => deprecate(e.flow_id, e.workflow_id)}))),
    h('div', {class: 'actions'},
      all ? h('button', {type: 'button', class: 'small quiet', text: 'Undeprecate bundle', onclick: () => undeprecate('*', b.bundle_id)})
          : h('button', {type: 'button', class: 'small quiet', text: 'Deprecate bundle', onclick: () => deprecate('*', b.bundle_id)}),
      b.origin === 'upload' ? h('button', {type: 'button', class: 'small danger', text: 'Remove', onclick: remove}) : null));
}

async function bundleAction(call, done) {
  try { await call(); toast(done); } catch (err) { toast(explain(err), true); }
  state.entrypoints = null;
  $('filter-workflow').length = 1;
  if (state.view === 'bundles') showBundles();
}

async function upload(file) {
  const note = $('upload-note');
  if (!file) return;
  setNote(note, 'Uploading ' + file.name + '…');
  const form = new FormData();
  form.append('file', file, file.name);
  form.append('overwrite', $('upload-overwrite').checked ? 'true' : 'false');
  try {
    const data = await api('/bundles/upload', {method: 'POST', form});
    setNote(note, `Uploaded ${data.bundle_ref} (${data.entrypoints.length} entrypoint${data.entrypoints.length === 1 ? '' : 's'})` +
                  (data.gateway_reload_error ? ' — reload failed: ' + data.gateway_reload_error : '.'), 'good');
  } catch (err) {
    setNote(note, 'Upload refused: ' + explain(err) + (err.code === 'bundle_exists' ? ' Tick “replace” to overwrite it.' : ''), 'bad');
  }
  $('upload-file').value = '';
  state.entrypoints = null;
  $('filter-workflow').length = 1;
  if (state.view === 'bundles') showBundles();
}

$('upload-file').addEventListener('change', (ev) => upload(ev.target.files[0]));
const dropTarget = $('upload-form');
dropTarget.addEventListener('submit', (ev) => ev.preventDefault());
dropTarget.addEventListener('dragover', (ev) => { ev.preventDefault(); dropTarget.classList.add('over'); });
dropTarget.addEventListener('dragleave', () => dropTarget.classList.remove('over'));
dropTarget.addEventListener('drop', (ev) => {
  ev.preventDefault();
  dropTarget.classList.remove('over');
  upload(ev.dataTransfer.files[0]);
});

// -- start form, generated from the entrypoint's input pins ----------------------------------------

async function showStart(parts, params) {
  const select = $('start-entry');
  $('start-error').hidden = true;
  $('start-timetable').checked = params.get('timetable') === '1';
  $('start-schedule').hidden = !$('start-timetable').checked;
  syncStartButton();
  try {
    const entries = (state.entrypoints || await loadEntrypoints()).filter((e) => !e.deprecated);
    select.replaceChildren(...entries.map((e) => h('option', {value: e.bundle_id + '\n' + e.flow_id, text: `${e.name} (${e.workflow_id})`})));
    if (parts.length >= 2) select.value = parts[0] + '\n' + parts[1];
    else if (state.defaultBundle) {
      const first = entries.find((e) => e.bundle_id === state.defaultBundle);
      if (first) select.value = first.bundle_id + '\n' + first.flow_id;
    }
    if (!entries.length) $('start-inputs').replaceChildren(h('legend', {text: 'Inputs'}), h('p', {class: 'muted', text: 'Upload a bundle first.'}));
    else await loadStartInputs();
  } catch (err) { showStartError(explain(err)); }
}

let startInputsSeq = 0;

async function loadStartInputs() {
  const seq = ++startInputsSeq;
  // The last form's fields go at once: typed into while this entrypoint's load is out, their text would be
  // lost when the new fields replace them (or, worse, a run would start without it). Nothing to submit meanwhile.
  $('start-inputs').replaceChildren(h('legend', {text: 'Inputs'}), h('p', {class: 'muted', text: 'Loading the inputs…'}));
  $('start-submit').disabled = true;
  const [bundleId, flowId] = $('start-entry').value.split('\n');
  const bundle = await api('/bundles/' + enc(bundleId));
  if (seq !== startInputsSeq) return;  // the entrypoint changed meanwhile: the later load wins
  const entry = bundle.entrypoints.find((e) => e.flow_id === flowId) || {inputs: []};
  $('start-desc').textContent = entry.description || '';
  const fields = (entry.inputs || []).map(pinField);
  $('start-inputs').replaceChildren(h('legend', {text: 'Inputs'}),
    ...(fields.length ? fields : [h('p', {class: 'muted', text: 'This entrypoint takes no input.'})]));
  $('start-submit').disabled = false;
}

function pinField(pin) {
  const id = 'pin-' + pin.id;
  const type = (pin.type || 'string').toLowerCase();
  const label = h('label', {for: id}, (pin.label || pin.id) + ' ', h('span', {class: 'muted', text: type}));
  const dflt = pin.default;
  let input;
  if (type === 'boolean') {
    input = h('input', {type: 'checkbox', id, checked: !!dflt});
    return h('div', {class: 'pin', 'data-pin': pin.id, 'data-type': type}, h('label', {class: 'check', for: id}, input, ' ' + (pin.label || pin.id)));
  }
  if (type === 'number' || type === 'integer' || type === 'int' || type === 'float') {
    input = h('input', {type: 'number', id, step: type === 'integer' || type === 'int' ? '1' : 'any', value: dflt === undefined ? '' : String(dflt)});
  } else if (type === 'string' || type === 'text') {
    const text = dflt === undefined || dflt === null ? '' : String(dflt);
    input = text.length > 60 || text.includes('\n') ? h('textarea', {id, rows: '3', text}) : h('input', {type: 'text', id, value: text});
  } else {  // object, array, any: JSON
    input = h('textarea', {id, rows: '3', text: dflt === undefined ? '' : JSON.stringify(dflt, null, 2), placeholder: 'JSON'});
  }
  return h('div', {class: 'pin', 'data-pin': pin.id, 'data-type': type}, label, input);
}

function readPins() {
  const data = {};
  for (const div of document.querySelectorAll('#start-inputs .pin')) {
    const name = div.dataset.pin;
    const type = div.dataset.type;
    const input = div.querySelector('input, textarea');
    if (type === 'boolean') { data[name] = input.checked; continue; }
    const raw = input.value;
    if (raw.trim() === '') continue;
    if (input.type === 'number') data[name] = Number(raw);
    else if (type === 'string' || type === 'text') data[name] = raw;
    else {
      try { data[name] = JSON.parse(raw); } catch (e) {
        if (type === 'any') data[name] = raw;
        else throw new Error(`Input '${name}' must be JSON (${e.message}).`);
      }
    }
  }
  return data;
}

function showStartError(text) { const el = $('start-error'); el.textContent = text; el.hidden = !text; }
function syncStartButton() { $('start-submit').textContent = $('start-timetable').checked ? 'Create schedule' : 'Start run'; }

$('start-entry').addEventListener('change', () => loadStartInputs().catch((err) => showStartError(explain(err))));
$('start-timetable').addEventListener('change', () => { $('start-schedule').hidden = !$('start-timetable').checked; syncStartButton(); });
$('start-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  showStartError('');
  const [bundleId, flowId] = $('start-entry').value.split('\n');
  let input;
  try { input = readPins(); } catch (err) { showStartError(err.message); return; }
  const body = {bundle_id: bundleId, flow_id: flowId, input_data: input, session_id: $('start-session').value.trim() || null};
  const button = $('start-submit');
  button.disabled = true;
  try {
    let data;
    if ($('start-timetable').checked) {
      const count = $('sched-count').value;
      Object.assign(body, {interval: $('sched-interval').value.trim() || null, start_at: $('sched-start').value.trim() || null,
                           repeat_count: count ? parseInt(count, 10) : null, repeat_until: $('sched-until').value.trim() || null,
                           share_context: $('sched-share').checked});
      data = await api('/runs/schedule', {method: 'POST', body});
    } else {
      data = await api('/runs/start', {method: 'POST', body});
    }
    location.hash = '#/run/' + enc(data.run_id);
  } catch (err) { showStartError(explain(err)); } finally { button.disabled = false; }
});

// -- audit -----------------------------------------------------------------------------------------

async function showAudit() {
  await loadAudit();
  every(5000, () => { if (!document.hidden) loadAudit(); });
}

async function loadAudit() {
  try {
    const data = await api('/audit/tail?limit=100');
    $('audit-body').replaceChildren(...data.items.map((r) => h('tr', {},
      h('td', {title: r.ts, text: (r.ts || '').replace('T', ' ').slice(0, 19)}),
      h('td', {}, h('code', {text: r.method + ' ' + r.path})),
      h('td', {}, h('span', {class: 'badge ' + (r.status < 400 ? 's-completed' : 's-failed'), text: String(r.status)})),
      h('td', {text: r.client_ip || ''}),
      h('td', {}, h('code', {text: r.token_fp || '—'})),
      h('td', {text: r.duration_ms === undefined ? '' : String(r.duration_ms)}))));
  } catch (err) { toast(explain(err), true); }
}
$('audit-refresh').addEventListener('click', loadAudit);

// -- start-up --------------------------------------------------------------------------------------

async function boot() {
  loadHealth();  // fills the gateway card when it answers; the form is usable before that
  setInterval(() => { if (!document.hidden) loadHealth(); }, 15000);
  if (state.token) {
    try { await signIn(state.token); } catch (err) { signOut(explain(err)); }
  }
  if (state.signedIn) route();
  else $('signin-token').focus();
  window.consoleReadyAt = performance.now();  // interactive: tests and the benchmark wait for this
  document.body.dataset.ready = '1';
}
boot();
