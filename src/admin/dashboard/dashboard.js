// sluice dashboard: polls the admin API once a second and draws what the
// pools do. Everything it shows comes from /api/v1/status and
// /api/v1/timeline, with the bearer token kept in this tab's
// sessionStorage (never in a URL sent to the server).
'use strict';

const KEY = 'sluice-admin-token';
// The charts show the last 5 minutes, or less while there is less.
const WINDOW_MS = 5 * 60 * 1000;
const MIN_WINDOW_MS = 60 * 1000;
const KEPT = 600;
const COLORS = ['#2e90fa', '#f79009', '#12b76a', '#9e77ed', '#f04438', '#0ba5ec', '#ee46bc', '#667085'];

const view = {
  token: null,
  next: null,
  samples: [],
  status: null,
  timer: null,
  // "pool/backend/action" awaiting its confirmation.
  confirming: null,
  // A message per backend after an action.
  notes: {},
  colors: {},
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k === 'style') Object.assign(e.style, v);
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
}

class AuthError extends Error {}

async function api(path, options) {
  const response = await fetch(path, {
    ...options,
    headers: { Authorization: 'Bearer ' + view.token, 'Content-Type': 'application/json' },
    cache: 'no-store',
  });
  if (response.status === 401) throw new AuthError('wrong token');
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) throw new Error((body && body.error) || ('HTTP ' + response.status));
  return body;
}

function showLogin(message) {
  stop();
  $('pools').replaceChildren();
  $('logout').hidden = true;
  $('error').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  $('token').focus();
}

function stop() {
  if (view.timer) clearInterval(view.timer);
  view.timer = null;
}

function start() {
  $('login').hidden = true;
  $('logout').hidden = false;
  view.next = null;
  view.samples = [];
  tick();
  view.timer = setInterval(tick, 1000);
}

async function tick() {
  try {
    const since = view.next === null ? '' : '?since=' + view.next;
    const [status, timeline] = await Promise.all([
      api('/api/v1/status'),
      api('/api/v1/timeline' + since),
    ]);
    view.status = status;
    view.next = timeline.next;
    view.interval = timeline.interval_ms;
    view.samples.push(...timeline.samples);
    if (view.samples.length > KEPT) view.samples.splice(0, view.samples.length - KEPT);
    $('error').hidden = true;
    render();
  } catch (e) {
    if (e instanceof AuthError) {
      sessionStorage.removeItem(KEY);
      view.token = null;
      showLogin('Wrong token: the admin API refused it. Enter the token again.');
    } else {
      $('error').hidden = false;
      $('error').textContent = 'Cannot reach the admin API: ' + e.message + ' (retrying every second)';
    }
  }
}

function colorOf(name) {
  if (!(name in view.colors)) {
    view.colors[name] = COLORS[Object.keys(view.colors).length % COLORS.length];
  }
  return view.colors[name];
}

function render() {
  const s = view.status;
  const cfg = s.config;
  $('generation').textContent = cfg ? 'config generation ' + cfg.generation : '';
  $('processes').textContent = s.processes
    .map((p) => 'pid ' + p.pid + ' ' + p.role + ' (' + p.websockets + ' WebSockets)')
    .join(', ');
  $('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
  const main = $('pools');
  const seen = new Set();
  for (const pool of s.pools) {
    seen.add(pool.name);
    let section = main.querySelector('section[data-pool="' + CSS.escape(pool.name) + '"]');
    if (!section) {
      section = poolSection(pool.name);
      main.append(section);
    }
    renderPool(section, pool);
  }
  for (const section of main.querySelectorAll('section.pool')) {
    if (!seen.has(section.dataset.pool)) section.remove();
  }
}

function poolSection(name) {
  const chart = (kind, title) => el('div', { class: 'chart ' + kind },
    el('h3', {}, title),
    el('canvas', { 'data-chart': kind, 'data-samples': '0', 'data-last': '{}' }),
    el('div', { class: 'legend' }));
  return el('section', { class: 'pool', 'data-pool': name },
    el('h2', {}, name, ' ', el('small', {})),
    el('div', { class: 'charts' },
      chart('ws', 'WebSockets per backend, up to the last 5 minutes (marks: state changes)'),
      chart('http', 'HTTP requests in flight')),
    el('table', {}, el('thead', {}, el('tr', {},
      ...['backend', 'state', 'WebSockets', 'HTTP', 'drain', ''].map((h) => el('th', {}, h)))),
    el('tbody', {})),
    el('div', { class: 'activity' }));
}

function poolSamples(name) {
  const out = [];
  for (const sample of view.samples) {
    const pool = sample.pools.find((p) => p.name === name);
    if (pool) out.push({ at: sample.at_ms, pool });
  }
  return out;
}

function renderPool(section, pool) {
  section.querySelector('h2 small').textContent =
    pool.algorithm + ', ' + pool.connections + ' connections';
  const samples = poolSamples(pool.name);
  const names = pool.backends.map((b) => b.name);
  drawChart(section.querySelector('canvas[data-chart="ws"]'), samples, names, (b) => b.connections.ws, true);
  drawChart(section.querySelector('canvas[data-chart="http"]'), samples, names, (b) => b.connections.http, false);
  for (const legend of section.querySelectorAll('.legend')) {
    legend.replaceChildren(...names.map((n) => el('span', {}, el('i', { style: { background: colorOf(n) } }), n)));
  }
  const body = section.querySelector('tbody');
  body.replaceChildren(...pool.backends.map((b) => backendRow(pool.name, b)));
  section.querySelector('.activity').replaceChildren(...activity(pool, samples));
}

function backendRow(pool, b) {
  const key = pool + '/' + b.name;
  let drain = '';
  if (b.drain) {
    const left = Math.max(0, b.drain.window_ms - b.drain.elapsed_ms) / 1000;
    const remaining = Math.max(0, b.drain.planned - b.drain.closed);
    drain = b.drain.closed + ' closed, ' + remaining + ' remaining, ' + left.toFixed(0) + ' s of the window left';
  }
  const inRotation = ['up', 'slow_start', 'down'].includes(b.state);
  const action = inRotation ? 'drain' : 'undrain';
  const actions = el('td', { class: 'actions' });
  if (!b.removed) {
    if (view.confirming === key + '/' + action) {
      actions.append(
        el('span', {}, (action === 'drain' ? 'Drain ' : 'Put back ') + b.name + '? '),
        el('button', { type: 'button', class: 'danger', 'data-confirm': key, onclick: () => act(pool, b.name, action) }, 'Confirm'),
        ' ',
        el('button', { type: 'button', 'data-cancel': key, onclick: () => { view.confirming = null; render(); } }, 'Cancel'));
    } else {
      actions.append(el('button', {
        type: 'button',
        'data-action': action,
        'data-backend': key,
        onclick: () => { view.confirming = key + '/' + action; render(); },
      }, action === 'drain' ? 'Drain' : 'Undrain'));
    }
  }
  if (view.notes[key]) actions.append(el('span', { class: 'note' }, view.notes[key]));
  return el('tr', { 'data-backend': key },
    el('td', {}, el('i', { class: 'swatch', style: { background: colorOf(b.name) } }), b.name),
    el('td', {}, el('span', { class: 'state ' + b.state, 'data-field': 'state' }, b.state.replace('_', ' ') + (b.healthy ? '' : ' (unhealthy)'))),
    el('td', { class: 'num', 'data-field': 'ws' }, String(b.connections.ws)),
    el('td', { class: 'num', 'data-field': 'http' }, String(b.connections.http)),
    el('td', { 'data-field': 'drain' }, drain),
    actions);
}

async function act(pool, backend, action) {
  const key = pool + '/' + backend;
  view.confirming = null;
  try {
    await api('/api/v1/pools/' + encodeURIComponent(pool) + '/backends/' + encodeURIComponent(backend) + '/' + action,
      { method: 'POST', body: '{}' });
    view.notes[key] = action === 'drain' ? 'drain started' : 'back in rotation';
  } catch (e) {
    if (e instanceof AuthError) return showLogin('Wrong token: the admin API refused it. Enter the token again.');
    view.notes[key] = action + ' failed: ' + e.message;
  }
  setTimeout(() => { delete view.notes[key]; }, 5000);
  tick();
}

// Rebalance and admission, from the status and from how the counters
// moved over the samples.
function activity(pool, samples) {
  const out = [];
  const rb = pool.rebalance;
  if (rb && rb.enabled) {
    const interval = rb.interval_ms;
    const last = rb.last;
    let plan = 'no decision yet';
    if (last) {
      plan = last.note;
      if (last.shed) plan += '; shedding ' + last.shed.closing + ' of ' + last.shed.planned + ' from ' + last.shed.backend;
      if (last.outliers.length) plan += '; over its share: ' + last.outliers.join(', ');
      plan += ' (' + Math.round(last.ago_ms / 1000) + ' s ago)';
    }
    out.push(el('div', { 'data-field': 'rebalance' }, el('b', {}, 'Rebalance: '), plan));
    const sheds = perInterval(samples, interval, (p) => p.backends.reduce((n, b) => n + b.rebalance_shed, 0));
    out.push(el('div', { 'data-field': 'sheds' }, el('b', {}, 'Shed per ' + interval / 1000 + ' s interval: '),
      sheds.length ? sheds.join(', ') : 'none yet'));
  } else {
    out.push(el('div', {}, el('b', {}, 'Rebalance: '), 'off'));
  }
  const rejected = samples.length ? samples[samples.length - 1].pool.admission_rejected - samples[0].pool.admission_rejected : 0;
  const waiting = samples.length ? samples[samples.length - 1].pool.admission_waiting : 0;
  out.push(el('div', { 'data-field': 'admission' }, el('b', {}, 'Admission: '),
    waiting + ' queued now, ' + rejected + ' refused in the last ' + Math.round(span(samples) / 1000) + ' s'));
  const drained = samples.length ? samples[samples.length - 1].pool.backends.reduce((n, b) => n + b.drain_closed, 0) -
    samples[0].pool.backends.reduce((n, b) => n + b.drain_closed, 0) : 0;
  out.push(el('div', { 'data-field': 'drained' }, el('b', {}, 'Closed by drains: '), drained + ' in the same time'));
  return out;
}

function span(samples) {
  return samples.length > 1 ? samples[samples.length - 1].at - samples[0].at : 0;
}

// How much `count` grew in each of the last few intervals of `ms`.
function perInterval(samples, ms, count) {
  if (samples.length < 2) return [];
  const end = samples[samples.length - 1].at;
  const out = [];
  for (let k = 4; k >= 0; k--) {
    const from = end - (k + 1) * ms;
    const to = end - k * ms;
    const inside = samples.filter((s) => s.at > from && s.at <= to);
    const before = samples.filter((s) => s.at <= from);
    if (!inside.length || !before.length) continue;
    out.push(count(inside[inside.length - 1].pool) - count(before[before.length - 1].pool));
  }
  return out;
}

function drawChart(canvas, samples, names, value, marks) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth * ratio;
  const h = canvas.clientHeight * ratio;
  if (canvas.width !== w || canvas.height !== h) {
    canvas.width = w;
    canvas.height = h;
  }
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, w, h);
  const end = samples.length ? samples[samples.length - 1].at : Date.now();
  const first = samples.length ? samples[0].at : end;
  const windowMs = Math.min(WINDOW_MS, Math.max(MIN_WINDOW_MS, end - first));
  const startAt = end - windowMs;
  const shown = samples.filter((s) => s.at >= startAt);
  let max = 1;
  for (const s of shown) for (const b of s.pool.backends) max = Math.max(max, value(b));
  max = Math.ceil(max * 1.15);
  const pad = { l: 44 * ratio, r: 8 * ratio, t: 8 * ratio, b: 20 * ratio };
  const x = (t) => pad.l + (w - pad.l - pad.r) * (t - startAt) / windowMs;
  const y = (v) => h - pad.b - (h - pad.t - pad.b) * v / max;
  ctx.font = (11 * ratio) + 'px system-ui, sans-serif';
  ctx.fillStyle = '#667085';
  ctx.strokeStyle = '#eef1f5';
  ctx.lineWidth = ratio;
  for (let i = 0; i <= 4; i++) {
    const v = Math.round(max * i / 4);
    ctx.beginPath();
    ctx.moveTo(pad.l, y(v));
    ctx.lineTo(w - pad.r, y(v));
    ctx.stroke();
    ctx.fillText(String(v), 4 * ratio, y(v) + 4 * ratio);
  }
  for (let m = 0; m <= 5; m++) {
    const ago = windowMs * (5 - m) / 5 / 1000;
    const label = m === 5 ? 'now' : ago >= 60 ? '-' + (ago / 60).toFixed(ago % 60 ? 1 : 0) + ' min' : '-' + Math.round(ago) + ' s';
    ctx.fillText(label, x(end - ago * 1000) - 14 * ratio, h - 5 * ratio);
  }
  if (marks) {
    // A vertical mark where a backend's state changed, its label on the
    // first row where it does not overlap another.
    const rows = [];
    for (let i = 1; i < shown.length; i++) {
      for (const b of shown[i].pool.backends) {
        const before = shown[i - 1].pool.backends.find((o) => o.name === b.name);
        if (!before || before.state === b.state) continue;
        const at = x(shown[i].at);
        ctx.strokeStyle = colorOf(b.name);
        ctx.setLineDash([4 * ratio, 3 * ratio]);
        ctx.beginPath();
        ctx.moveTo(at, pad.t);
        ctx.lineTo(at, h - pad.b);
        ctx.stroke();
        ctx.setLineDash([]);
        const label = b.name + ' ' + b.state.replace('_', ' ');
        const width = ctx.measureText(label).width;
        const left = at + 3 * ratio + width > w - pad.r ? at - 3 * ratio - width : at + 3 * ratio;
        let row = rows.findIndex((end) => end < left);
        if (row < 0) { rows.push(0); row = rows.length - 1; }
        rows[row] = left + width + 4 * ratio;
        ctx.fillStyle = colorOf(b.name);
        ctx.fillText(label, left, pad.t + (10 + 12 * row) * ratio);
      }
    }
  }
  const last = {};
  for (const name of names) {
    ctx.strokeStyle = colorOf(name);
    ctx.lineWidth = 2 * ratio;
    ctx.beginPath();
    let started = false;
    for (const s of shown) {
      const b = s.pool.backends.find((o) => o.name === name);
      if (!b) { started = false; continue; }
      if (started) ctx.lineTo(x(s.at), y(value(b)));
      else ctx.moveTo(x(s.at), y(value(b)));
      started = true;
      last[name] = value(b);
    }
    ctx.stroke();
  }
  canvas.dataset.samples = String(shown.length);
  canvas.dataset.last = JSON.stringify(last);
}

$('login').addEventListener('submit', (event) => {
  event.preventDefault();
  view.token = $('token').value.trim();
  $('token').value = '';
  sessionStorage.setItem(KEY, view.token);
  start();
});

$('logout').addEventListener('click', () => {
  sessionStorage.removeItem(KEY);
  view.token = null;
  showLogin('');
});

// `sluice demo` opens the page with the token in the fragment, which the
// browser never sends: keep it for this tab and take it out of the address.
if (location.hash.startsWith('#token=')) {
  sessionStorage.setItem(KEY, decodeURIComponent(location.hash.slice(7)));
  history.replaceState(null, '', location.pathname);
}
view.token = sessionStorage.getItem(KEY);
if (view.token) start();
else showLogin('');
