// The inbound-servers widget: validation and preview run in WebAssembly (the same policy
// core as the relay), on every keystroke. Saving sends the list to the relay's admin API;
// testing asks the relay to try each server as a delivery would, without saving or sending.

const PRESETS = {
  one: [['mail.mailroutedemo.com', 10]],
  backup: [['mail.mailroutedemo.com', 10], ['backup.mailroutedemo.com', 20]],
  balanced: [['mail.mailroutedemo.com', 10], ['mail2.mailroutedemo.com', 10]],
  'balanced-failover': [['mail.mailroutedemo.com', 10], ['mail2.mailroutedemo.com', 10], ['backup.mailroutedemo.com', 20]],
  eight: [
    ['mail.mailroutedemo.com', 10], ['mail2.mailroutedemo.com', 10], ['mail3.mailroutedemo.com', 10],
    ['backup1.mailroutedemo.com', 20], ['backup2.mailroutedemo.com', 20],
    ['lastresort1.mailroutedemo.com', 30], ['lastresort2.mailroutedemo.com', 30], ['lastresort3.mailroutedemo.com', 30],
  ],
};
const DEFAULT_PREFERENCE = '10';

const root = document.getElementById('inbound-servers');
const rows = document.getElementById('rows');
const template = document.getElementById('row-template');
const previewEl = document.getElementById('preview');
const announce = document.getElementById('announce');
const params = new URLSearchParams(location.search);
const domain = root.dataset.domain || params.get('domain') || '';
const token = new URLSearchParams(location.hash.slice(1)).get('token') || '';
let down = new Set(); // indices of servers marked down in the preview
let lastErrors = '';

function rowEls() { return [...rows.querySelectorAll('[data-testid="server-row"]')]; }

function addRow(host = '', preference = DEFAULT_PREFERENCE, port = '', weight = '') {
  const row = template.content.firstElementChild.cloneNode(true);
  const n = rowEls().length + 1;
  for (const [name, value, label] of [['host', host, `Server ${n} name or IP address`], ['preference', preference, `Server ${n} preference`], ['port', port, `Server ${n} port`], ['weight', weight, `Server ${n} weight`]]) {
    const input = row.querySelector(`input[name="${name}"]`);
    input.value = value;
    input.setAttribute('aria-label', label);
    const err = row.querySelector(`.field-error[data-field="${name}"]`);
    err.id = `err-${crypto.randomUUID()}`;
    input.setAttribute('aria-describedby', err.id);
  }
  row.querySelector('[data-testid="remove-server"]').setAttribute('aria-label', `Remove server ${n}`);
  // A row just added is not wrong yet: its empty host is reported once the user has typed in
  // it or left it (Save stays disabled meanwhile).
  if (!host) row.dataset.fresh = 'true';
  rows.appendChild(row);
  return row;
}

function entries() {
  return rowEls().map((row) => {
    const v = (name) => row.querySelector(`input[name="${name}"]`).value;
    const e = { host: v('host'), preference: v('preference') };
    if (v('port').trim()) e.port = v('port');
    if (v('weight').trim()) e.weight = v('weight');
    return e;
  });
}

function showProblems(problems) {
  for (const row of rowEls()) {
    for (const el of row.querySelectorAll('.field-error')) { el.hidden = true; el.textContent = ''; el.classList.remove('warning'); }
    for (const input of row.querySelectorAll('input')) input.removeAttribute('aria-invalid');
  }
  const listLevel = [];
  const shown = [];
  for (const p of problems) {
    const row = p.index == null ? null : rowEls()[p.index];
    if (!row) { listLevel.push(p); shown.push(p); continue; }
    const field = p.field === 'servers' ? 'host' : p.field;
    if (row.dataset.fresh && field === 'host') continue;
    shown.push(p);
    const el = row.querySelector(`.field-error[data-field="${field}"]`);
    el.hidden = false;
    el.textContent = el.textContent ? `${el.textContent} ${p.message}` : p.message;
    if (p.severity === 'warning') el.classList.add('warning');
    else row.querySelector(`input[name="${field}"]`).setAttribute('aria-invalid', 'true');
    if (field === 'port' || field === 'weight') row.querySelector('details').open = true;
  }
  const shownErrors = shown.filter((p) => p.severity === 'error');
  const errors = shownErrors.map((p) => p.message).join(' ');
  if (errors && errors !== lastErrors) announce.textContent = `${shownErrors.length} problem(s): ${errors}`;
  lastErrors = errors;
  const invalid = problems.some((p) => p.severity === 'error');
  document.getElementById('save').disabled = invalid;
  document.getElementById('test').disabled = invalid;
  return listLevel;
}

const TIER_TITLES = ['Tried first', 'If all of these are down', 'Then, if those are down too'];

function renderPreview(result, listLevel) {
  previewEl.replaceChildren();
  for (const p of listLevel) {
    const el = document.createElement('p');
    el.className = 'field-error';
    el.dataset.testid = 'field-error';
    el.textContent = p.message;
    previewEl.append(el);
  }
  result.tiers.forEach((tier, t) => {
    const box = document.createElement('section');
    box.className = 'tier';
    box.dataset.testid = 'preview-tier';
    box.dataset.preference = tier.preference;
    const h = document.createElement('h3');
    h.innerHTML = `${TIER_TITLES[Math.min(t, 2)]} <span class="pref">· preference ${tier.preference}</span>`;
    box.append(h);
    for (const s of tier.servers) {
      const line = document.createElement('div');
      line.className = `flow-row${s.down ? ' down' : ''}`;
      const addr = document.createElement('span');
      addr.className = 'addr';
      addr.textContent = s.address;
      const bar = document.createElement('div');
      bar.className = 'bar';
      bar.innerHTML = `<span style="width:${s.receives.toFixed(1)}%"></span>`;
      bar.setAttribute('role', 'img');
      bar.setAttribute('aria-label', `receives ${Math.round(s.receives)}% of all mail`);
      const share = document.createElement('span');
      share.className = 'share';
      share.dataset.testid = 'preview-share';
      share.title = `${s.share.toFixed(1)}% of this tier's mail while the tier is up; now receives ${s.receives.toFixed(1)}% of all mail`;
      share.textContent = `${Math.round(s.receives)}%`;
      const toggle = document.createElement('button');
      toggle.type = 'button';
      toggle.dataset.testid = 'toggle-down';
      toggle.setAttribute('aria-pressed', String(s.down));
      toggle.setAttribute('aria-label', `${s.down ? 'Mark up' : 'Mark down'}: ${s.address}`);
      toggle.textContent = s.down ? 'Mark up' : 'Mark down';
      toggle.addEventListener('click', () => { s.down ? down.delete(s.index) : down.add(s.index); refresh(); });
      line.append(addr, bar, share, toggle);
      box.append(line);
    }
    previewEl.append(box);
  });
  if (result.tiers.length && result.queued > 0) {
    const q = document.createElement('p');
    q.className = 'queued';
    q.dataset.testid = 'preview-queued';
    q.textContent = result.queued >= 99.95
      ? 'Every server is down: we keep your mail queued and retry, and deliver it as soon as a server answers.'
      : `${Math.round(result.queued)}% of mail finds every server down: it is queued and retried.`;
    previewEl.append(q);
  }
}

function refresh() {
  // Results of an earlier test describe a list that has changed.
  document.getElementById('test-results').hidden = true;
  const list = entries();
  down = new Set([...down].filter((i) => i < list.length));
  const json = JSON.stringify(list);
  const result = JSON.parse(preview(json, JSON.stringify([...down])));
  const listLevel = showProblems(result.problems);
  renderPreview(result, listLevel);
}

function load(list) {
  rows.replaceChildren();
  down.clear();
  for (const [host, pref, port, weight] of list) addRow(host, String(pref), port ?? '', weight ?? '');
  refresh();
}

// The relay's admin API for this domain, with the token from the page's address.
function api(path, init = {}) {
  const headers = { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) };
  return fetch(`/api/domains/${encodeURIComponent(domain)}${path}`, { ...init, headers });
}

async function save(event) {
  event.preventDefault();
  const status = document.getElementById('save-status');
  if (!domain) { status.className = 'bad'; status.textContent = 'No domain given (?domain=...): nothing to save to.'; return; }
  status.className = ''; status.textContent = 'Saving…';
  const res = await api('/servers', { method: 'PUT', body: JSON.stringify(entries()) }).catch(() => null);
  if (!res) { status.className = 'bad'; status.textContent = 'The relay could not be reached: nothing was saved. Try again.'; return; }
  if (res.ok) { status.className = 'ok'; status.textContent = 'Saved. New mail follows this list.'; return; }
  const body = await res.json().catch(() => ({}));
  if (res.status === 422 && Array.isArray(body.problems)) showProblems(body.problems);
  status.className = 'bad';
  status.textContent = body.error || `Not saved (HTTP ${res.status}).`;
}

const VERDICT = { accepts: 'Accepts your mail', defers: 'Asks to try later', refuses: 'Refuses your mail', failed: 'Cannot be used' };

// One line per address: the verdict, then the server's own reply (text only: it is the
// server's, so never markup).
function renderTest(report) {
  const list = document.getElementById('test-list');
  list.replaceChildren();
  for (const server of report.servers) {
    const lines = server.lookup_error ? [{ result: 'failed', reply: server.lookup_error }] : server.addresses;
    for (const a of lines) {
      const li = document.createElement('li');
      li.dataset.testid = 'test-result';
      li.dataset.result = a.result;
      const verdict = document.createElement('span');
      verdict.className = 'verdict';
      verdict.textContent = `${VERDICT[a.result]}:`;
      const where = a.address && a.address !== server.server ? ` (${a.address})` : '';
      const reply = document.createElement('span');
      reply.className = 'reply';
      reply.textContent = a.reply;
      li.append(verdict, `${server.server}${where}`, reply);
      list.appendChild(li);
    }
  }
  document.getElementById('test-summary').textContent = report.passed
    ? `Every server accepts mail for ${report.rcpt}.`
    : `Not every server accepts mail for ${report.rcpt}. Mail would skip the ones marked here.`;
  document.getElementById('test-results').hidden = false;
}

async function testServers() {
  const status = document.getElementById('save-status');
  if (!domain) { status.className = 'bad'; status.textContent = 'No domain given (?domain=...): nothing to test for.'; return; }
  status.className = ''; status.textContent = 'Testing…';
  const res = await api('/test', { method: 'POST', body: JSON.stringify({ servers: entries() }) }).catch(() => null);
  const body = await res?.json().catch(() => ({}));
  if (!res?.ok) {
    if (res?.status === 422 && Array.isArray(body.problems)) showProblems(body.problems);
    status.className = 'bad';
    status.textContent = body?.error || (res ? `Not tested (HTTP ${res.status}).` : 'The relay could not be reached.');
    return;
  }
  renderTest(body);
  status.className = body.passed ? 'ok' : 'bad';
  status.textContent = body.passed ? 'Tested: every server accepts.' : 'Tested: see below.';
}

// The policy core in WebAssembly. Without it nothing can be checked or previewed, so the page
// says what is missing instead of showing a form that does nothing.
let validate, preview;
try {
  const core = await import('./pkg/mxrelay_policy_web.js');
  await core.default();
  ({ validate, preview } = core);
} catch (e) {
  const failed = document.getElementById('load-error');
  failed.textContent = `This page cannot check server lists: its WebAssembly module (pkg/mxrelay_policy_web_bg.wasm) did not load (${e.message}). Whoever runs this page: build it with web/build.sh.`;
  failed.hidden = false;
  for (const el of root.querySelectorAll('form, .presets, .preview')) el.hidden = true;
  throw e;
}
rows.addEventListener('input', (e) => {
  if (e.target.name === 'host') delete e.target.closest('[data-testid="server-row"]').dataset.fresh;
  refresh();
});
rows.addEventListener('focusout', (e) => {
  const row = e.target.closest('[data-testid="server-row"]');
  if (e.target.name !== 'host' || !row?.dataset.fresh) return;
  delete row.dataset.fresh;
  refresh();
});
rows.addEventListener('click', (e) => {
  const remove = e.target.closest('[data-testid="remove-server"]');
  if (!remove) return;
  const row = remove.closest('[data-testid="server-row"]');
  const next = row.nextElementSibling || row.previousElementSibling;
  row.remove();
  down.clear();
  refresh();
  (next?.querySelector('input') || document.getElementById('add')).focus();
});
document.getElementById('add').addEventListener('click', () => { addRow().querySelector('input').focus(); refresh(); });
document.getElementById('servers-form').addEventListener('submit', save);
document.getElementById('test').addEventListener('click', testServers);
for (const b of document.querySelectorAll('[data-preset]')) b.addEventListener('click', () => load(PRESETS[b.dataset.preset]));

// Start from the domain's current list when the relay serves the page, else one empty row.
// When it cannot be read, the page says so: an empty form would look like a domain without servers.
let initial = null;
let notLoaded = '';
if (domain && location.protocol.startsWith('http')) {
  const res = await api('/servers').catch(() => null);
  if (res?.ok) {
    initial = (await res.json()).map((s) => [s.host, s.preference, s.port === 25 ? '' : String(s.port), s.weight === 1 ? '' : String(s.weight)]);
  } else {
    const body = res ? await res.json().catch(() => ({})) : {};
    const why = body.error || (res ? `HTTP ${res.status}` : 'the relay could not be reached');
    notLoaded = `The current servers of ${domain} could not be loaded (${why}); saving would replace them.`;
  }
}
load(initial ?? [['', DEFAULT_PREFERENCE]]);
if (notLoaded) {
  const status = document.getElementById('save-status');
  status.className = 'bad';
  status.textContent = notLoaded;
}
window.mxrelayWidget = { ready: true, validate, preview };
