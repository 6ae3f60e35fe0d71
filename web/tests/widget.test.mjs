// End-to-end tests of the inbound-servers widget in real headless Chromium, served by the
// real relay (admin API), with smtp-sink instances as the customer's servers.
// Run by the README's test command after `web/build.sh` and `cargo build --release`.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, readFileSync, readdirSync, mkdirSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import net from 'node:net';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const repo = join(here, '..', '..');
const shots = join(repo, 'tests', 'output');
mkdirSync(shots, { recursive: true });
const TOKEN = 'test-token-0123456789abcdef';
const procs = [];
let browser, page, relayAdmin, relaySmtp, work, sinks;

function freePort(host) {
  return new Promise((resolve) => {
    const srv = net.createServer().listen(0, host, () => { const { port } = srv.address(); srv.close(() => resolve(port)); });
  });
}

async function waitFor(what, cond, ms = 30000) {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

function listening(host, port) {
  return new Promise((resolve) => {
    const s = net.connect(port, host, () => { s.destroy(); resolve(true); });
    s.on('error', () => resolve(false));
  });
}

async function startSink(ip) {
  const port = await freePort(ip);
  const dir = mkdtempSync(join(tmpdir(), 'sink-'));
  chmodSync(dir, 0o777);
  const p = spawn('smtp-sink', ['-u', 'nobody', '-d', `${dir}/%H%M%S.`, `${ip}:${port}`, '64'], { stdio: 'ignore' });
  procs.push(p);
  await waitFor(`smtp-sink on ${ip}:${port}`, () => listening(ip, port));
  return { ip, port, count: () => readdirSync(dir).length };
}

before(async () => {
  work = mkdtempSync(join(tmpdir(), 'widget-'));
  sinks = [await startSink('127.0.1.60'), await startSink('127.0.1.61')];
  relaySmtp = await freePort('127.0.0.1');
  const adminPort = await freePort('127.0.0.1');
  relayAdmin = `127.0.0.1:${adminPort}`;
  writeFileSync(join(work, 'relay.toml'), `# widget test relay
[relay]
hostname = "relay.test"
listen = ["127.0.0.1:${relaySmtp}"]
queue = "queue"
admin_listen = "${relayAdmin}"
admin_token = "${TOKEN}"
web_root = "${join(repo, 'web')}"

[[domain]]
name = "customer.test"
[[domain.server]]
host = "${sinks[0].ip}"
port = ${sinks[0].port}
preference = 10
`);
  const relay = spawn(join(repo, 'target', 'release', 'mxrelay'), ['run', join(work, 'relay.toml')], { stdio: ['ignore', 'ignore', 'pipe'] });
  procs.push(relay);
  let log = '';
  relay.stderr.on('data', (d) => { log += d; });
  await waitFor('relay ready', () => log.includes('mxrelay ready'));
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  page = await browser.newPage({ viewport: { width: 1000, height: 1100 } });
  page.on('pageerror', (e) => { throw e; });
  await page.goto(`http://${relayAdmin}/?domain=customer.test#token=${TOKEN}`);
  await page.waitForFunction(() => window.mxrelayWidget?.ready === true);
});

after(async () => {
  await browser?.close();
  for (const p of procs) p.kill('SIGKILL');
});

const rows = () => page.getByTestId('server-row');

async function typeServers(list) {
  // Start clean: remove every row, then add and type each server like a user.
  while (await rows().count() > 0) await rows().first().getByTestId('remove-server').click();
  for (const [host, pref] of list) {
    await page.getByTestId('add-server').click();
    const row = rows().last();
    await row.getByTestId('server-host').fill(host);
    await row.getByTestId('server-preference').fill(String(pref));
  }
}

const EIGHT = [
  ['mail.mailroutedemo.com', 10], ['mail2.mailroutedemo.com', 10], ['mail3.mailroutedemo.com', 10],
  ['backup1.mailroutedemo.com', 20], ['backup2.mailroutedemo.com', 20],
  ['lastresort1.mailroutedemo.com', 30], ['lastresort2.mailroutedemo.com', 30], ['lastresort3.mailroutedemo.com', 30],
];

test('the page loads the domain\'s current list from the relay', async () => {
  await assert.equal(await rows().count(), 1);
  assert.equal(await rows().first().getByTestId('server-host').inputValue(), sinks[0].ip);
});

test('the seed\'s 8-server example shows 3 tiers and a 33/33/33 split', async () => {
  await typeServers(EIGHT);
  const tiers = page.getByTestId('preview-tier');
  assert.equal(await tiers.count(), 3);
  assert.deepEqual(await tiers.evaluateAll((els) => els.map((e) => e.dataset.preference)), ['10', '20', '30']);
  assert.deepEqual(await tiers.first().getByTestId('preview-share').allTextContents(), ['33%', '33%', '33%']);
  assert.deepEqual(await tiers.nth(1).getByTestId('preview-share').allTextContents(), ['0%', '0%']);
  assert.equal(await page.getByTestId('field-error').filter({ visible: true }).count(), 0);
  await page.screenshot({ path: join(shots, 'widget-eight-servers.png'), fullPage: true });
});

test('a bad preference and a bad host are explained next to their fields', async () => {
  await typeServers(EIGHT);
  await rows().nth(1).getByTestId('server-preference').fill('ten');
  await rows().nth(2).getByTestId('server-host').fill('999.1.1.1');
  const prefError = rows().nth(1).locator('[data-testid="field-error"][data-field="preference"]');
  const hostError = rows().nth(2).locator('[data-testid="field-error"][data-field="host"]');
  assert.match(await prefError.textContent(), /"ten" is not a whole number; use 0 to 65535/);
  assert.match(await hostError.textContent(), /looks like an IPv4 address but is not one/);
  assert.equal(await rows().nth(1).getByTestId('server-preference').getAttribute('aria-invalid'), 'true');
  assert.match(await page.locator('#announce').textContent(), /problem/);
  assert.equal(await page.getByTestId('save').isDisabled(), true);
  await page.screenshot({ path: join(shots, 'widget-errors.png'), fullPage: true });
  // Fixing them clears the errors.
  await rows().nth(1).getByTestId('server-preference').fill('10');
  await rows().nth(2).getByTestId('server-host').fill('mail3.mailroutedemo.com');
  assert.equal(await page.getByTestId('field-error').filter({ visible: true }).count(), 0);
});

test('a row just added is not marked wrong until the user leaves it empty', async () => {
  await typeServers(EIGHT);
  await page.getByTestId('add-server').click();
  const added = rows().last();
  const hostError = added.locator('[data-testid="field-error"][data-field="host"]');
  assert.equal(await hostError.isVisible(), false);
  assert.equal(await added.getByTestId('server-host').getAttribute('aria-invalid'), null);
  // Nothing is saved or tested with an empty host meanwhile.
  assert.equal(await page.getByTestId('save').isDisabled(), true);
  assert.equal(await page.locator('#test').isDisabled(), true);
  // Leaving it empty reports it.
  await rows().first().getByTestId('server-host').focus();
  assert.match(await hostError.textContent(), /host is empty/);
  assert.equal(await added.getByTestId('server-host').getAttribute('aria-invalid'), 'true');
  await added.getByTestId('remove-server').click();
  assert.equal(await page.getByTestId('save').isDisabled(), false);
});

test('marking the first tier down moves mail to the second, then to the queue', async () => {
  await page.getByRole('button', { name: '8 servers in 3 tiers' }).click();
  const tiers = page.getByTestId('preview-tier');
  for (let i = 0; i < 3; i++) await tiers.first().getByTestId('toggle-down').nth(i).click();
  assert.deepEqual(await tiers.first().getByTestId('preview-share').allTextContents(), ['0%', '0%', '0%']);
  assert.deepEqual(await tiers.nth(1).getByTestId('preview-share').allTextContents(), ['50%', '50%']);
  await page.screenshot({ path: join(shots, 'widget-first-tier-down.png'), fullPage: true });
  for (const t of [1, 2]) {
    const n = await tiers.nth(t).getByTestId('toggle-down').count();
    for (let i = 0; i < n; i++) await tiers.nth(t).getByTestId('toggle-down').nth(i).click();
  }
  assert.match(await page.getByTestId('preview-queued').textContent(), /queued and retry/);
});

test('the browser module gives the golden vectors\' plans', async () => {
  // Seeds are u64: quote them before JSON.parse so none is rounded to a float.
  const text = readFileSync(join(repo, 'tests', 'golden', 'vectors.json'), 'utf8').replace(/"seed": (\d+)/g, '"seed": "$1"');
  const vectors = JSON.parse(text);
  const mismatches = await page.evaluate(async (vectors) => {
    const wasm = await import('./pkg/mxrelay_policy_web.js');
    const bad = [];
    let checked = 0;
    for (const c of vectors.plans) {
      for (const v of c.plans) {
        const got = JSON.parse(wasm.plan(JSON.stringify(c.servers), BigInt(v.seed), v.attempt, BigInt(v.now_ms), JSON.stringify(v.down)));
        if (JSON.stringify(got) !== JSON.stringify(v.expect)) bad.push({ case: c.name, seed: v.seed, got, want: v.expect });
        checked++;
      }
    }
    for (const c of vectors.validation) {
      const got = JSON.parse(wasm.validate(JSON.stringify(c.servers))).map((p) => ({ index: p.index, field: p.field, code: p.code, severity: p.severity }));
      if (JSON.stringify(got) !== JSON.stringify(c.expect)) bad.push({ case: c.name, got, want: c.expect });
      checked++;
    }
    return { bad, checked };
  }, vectors);
  assert.ok(mismatches.checked > 100, `only ${mismatches.checked} vectors checked`);
  assert.deepEqual(mismatches.bad, []);
});

test('validation + preview of 64 servers per keystroke (figure for the README)', async () => {
  const ms = await page.evaluate(() => {
    const list = Array.from({ length: 64 }, (_, i) => ({ host: `mx${i}.example.com`, preference: String(10 * (1 + (i % 8))) }));
    const json = JSON.stringify(list);
    const times = [];
    for (let i = 0; i < 200; i++) {
      const t0 = performance.now();
      window.mxrelayWidget.preview(json, '[]');
      times.push(performance.now() - t0);
    }
    times.sort((a, b) => a - b);
    return { median: times[100], p99: times[198] };
  });
  console.log(`# figure: validation + preview, 64 servers: median ${ms.median.toFixed(3)} ms, p99 ${ms.p99.toFixed(3)} ms`);
  assert.ok(Number.isFinite(ms.median));
});

test('testing the entered servers shows what each one says, and saves and sends nothing', async () => {
  const config = readFileSync(join(work, 'relay.toml'), 'utf8');
  // The second sink, and an address where nothing listens.
  await typeServers([[sinks[1].ip, 10], ['127.0.1.62', 20]]);
  await rows().first().locator('details summary').click();
  await rows().first().getByTestId('server-port').fill(String(sinks[1].port));
  await page.getByTestId('test-servers').click();
  await waitFor('test results', async () => (await page.getByTestId('test-result').count()) === 2);
  const results = page.getByTestId('test-result');
  assert.equal(await results.nth(0).getAttribute('data-result'), 'accepts');
  assert.match(await results.nth(0).textContent(), new RegExp(`Accepts your mail:${sinks[1].ip}:${sinks[1].port}RCPT: 250`));
  assert.equal(await results.nth(1).getAttribute('data-result'), 'failed');
  assert.match(await results.nth(1).textContent(), /Cannot be used:127\.0\.1\.62:25.*refused/);
  assert.match(await page.locator('#test-summary').textContent(), /Not every server accepts mail for postmaster@customer\.test/);
  await page.screenshot({ path: join(shots, 'widget-tested.png'), fullPage: true });
  assert.equal(readFileSync(join(work, 'relay.toml'), 'utf8'), config, 'testing saves nothing');
  assert.equal(sinks[1].count(), 0, 'testing sends no mail');
});

test('saving through the relay changes where mail goes', async () => {
  const api = (path, init = {}) => fetch(`http://${relayAdmin}${path}`, { ...init, headers: { authorization: `Bearer ${TOKEN}`, ...(init.headers || {}) } });
  // Without the token nothing is readable or writable.
  assert.equal((await fetch(`http://${relayAdmin}/api/domains`)).status, 401);
  assert.equal((await fetch(`http://${relayAdmin}/api/domains/customer.test/servers`, { method: 'PUT', body: '[]' })).status, 401);
  // An invalid list is refused with the widget's messages, and nothing changes.
  const bad = await api('/api/domains/customer.test/servers', { method: 'PUT', body: JSON.stringify([{ host: '999.1.1.1', preference: 'ten' }]) });
  assert.equal(bad.status, 422);
  const body = await bad.json();
  assert.deepEqual(body.problems.map((p) => p.code), ['ip-literal', 'not-a-number']);

  // The user enters the second sink as the only server and saves.
  await typeServers([[sinks[1].ip, 10]]);
  await rows().first().locator('details summary').click();
  await rows().first().getByTestId('server-port').fill(String(sinks[1].port));
  await page.getByTestId('save').click();
  await waitFor('saved', async () => /Saved/.test(await page.locator('#save-status').textContent()));
  await page.screenshot({ path: join(shots, 'widget-saved.png'), fullPage: true });
  const now = await (await api('/api/domains/customer.test/servers')).json();
  assert.deepEqual(now, [{ host: sinks[1].ip, port: sinks[1].port, preference: 10, weight: 1 }]);
  assert.match(readFileSync(join(work, 'relay.toml'), 'utf8'), new RegExp(`port = ${sinks[1].port}`));

  // Mail follows the saved list.
  const swaks = spawnSync('swaks', ['--server', `127.0.0.1:${relaySmtp}`, '--from', 'a@src.test', '--to', 'user@customer.test', '--timeout', '10']);
  assert.equal(swaks.status, 0, swaks.stdout?.toString());
  await waitFor('mail at the saved server', () => sinks[1].count() === 1);
  assert.equal(sinks[0].count(), 0);
});

// A page of its own for one test: `prepare` runs before the page loads (routes), `use` after;
// `errors` collects what the page throws.
async function onPage({ width = 1000, height = 900, token = TOKEN, prepare = async () => {}, ready = true }, use) {
  const p = await browser.newPage({ viewport: { width, height } });
  const errors = [];
  p.on('pageerror', (e) => errors.push(e.message));
  try {
    await prepare(p);
    await p.goto(`http://${relayAdmin}/?domain=customer.test#token=${token}`);
    if (ready) await p.waitForFunction(() => window.mxrelayWidget?.ready === true);
    await use(p, errors);
  } finally {
    await p.close();
  }
}

test('a page whose WebAssembly module is missing says so and offers no form', async () => {
  const missing = (p) => p.route('**/pkg/**', (route) => route.fulfill({ status: 404, body: 'no such file' }));
  await onPage({ height: 700, prepare: missing, ready: false }, async (broken, errors) => {
    const failed = broken.getByTestId('load-error');
    await failed.waitFor({ state: 'visible' });
    const text = await failed.textContent();
    assert.match(text, /WebAssembly module \(pkg\/mxrelay_policy_web_bg\.wasm\) did not load/);
    assert.match(text, /build it with web\/build\.sh/);
    assert.equal(await broken.locator('#servers-form').isVisible(), false, 'no form that cannot check what is typed');
    assert.equal(await broken.locator('.presets').isVisible(), false);
    assert.equal(errors.length, 1, `the failed import is reported once: ${errors}`);
    await broken.screenshot({ path: join(shots, 'widget-module-missing.png'), fullPage: true });
  });
});

test('on a phone the rows and the preview fit the screen, with room to type a name', async () => {
  await onPage({ width: 390, height: 844 }, async (phone) => {
    await phone.click('[data-preset="eight"]');
    await phone.getByTestId('preview-tier').first().waitFor();
    const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    assert.equal(overflow, 0, 'nothing wider than the screen');
    const host = await phone.getByTestId('server-host').first().boundingBox();
    assert.ok(host.width >= 300, `the name field is ${host.width}px wide`);
    // Every control of every row and of the preview is on the screen.
    for (const selector of ['[data-testid="remove-server"]', '[data-testid="server-preference"]', '.flow-row button']) {
      const right = await phone.locator(selector).evaluateAll((els) => Math.max(...els.map((e) => e.getBoundingClientRect().right)));
      assert.ok(right <= 390, `${selector} reaches ${right}px`);
    }
    await phone.screenshot({ path: join(shots, 'widget-phone.png'), fullPage: true });
  });
});

test('a save that cannot reach the relay says so and nothing is saved', async () => {
  await onPage({}, async (cut, errors) => {
    const before = readFileSync(join(work, 'relay.toml'), 'utf8');
    await cut.route('**/api/domains/*/servers', (route) => (route.request().method() === 'PUT' ? route.abort('connectionrefused') : route.continue()));
    await cut.getByTestId('server-host').first().fill('mail.customer.test');
    await cut.getByTestId('save').click();
    await waitFor('the failed save reported', async () => /could not be reached/.test(await cut.locator('#save-status').textContent()));
    assert.match(await cut.locator('#save-status').textContent(), /nothing was saved/);
    assert.equal(await cut.locator('#save-status').getAttribute('class'), 'bad');
    assert.deepEqual(errors, [], 'no unhandled error in the page');
    assert.equal(readFileSync(join(work, 'relay.toml'), 'utf8'), before);
  });
});

test('a page that cannot load the current list says why instead of showing an empty domain', async () => {
  await onPage({ height: 700, token: 'not-the-token-0123456789' }, async (stranger) => {
    const status = await stranger.locator('#save-status').textContent();
    assert.match(status, /current servers of customer\.test could not be loaded \(missing or wrong bearer token\)/);
    assert.equal(await stranger.locator('#save-status').getAttribute('class'), 'bad');
  });
});
