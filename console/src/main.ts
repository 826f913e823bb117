// The mkts web console: catalog, SQL, candle chart (with live appends) and server status, all through
// the JSON endpoints under /api/ (docs/console.md). Built by `npm run build` into src/console/assets/.
import {
  CandlestickSeries, HistogramSeries, createChart,
  type CandlestickData, type HistogramData, type IChartApi, type ISeriesApi, type UTCTimestamp,
} from "lightweight-charts";

interface Column { name: string; type: string }
interface TableResult { columns: Column[]; rows: unknown[][] }
interface Bucket {
  key: string; symbol: string; timeframe: string; attribute_group: string; variable_length: boolean;
  columns: Column[]; ohlc: boolean; rows: number; years: number[]; first_epoch: number | null;
  last_epoch: number | null; size_bytes: number;
}
type Bar = CandlestickData<UTCTimestamp>;

/** What the page shows, for people and for tests (`window.mktsConsole`). */
const state = {
  buckets: [] as Bucket[],
  selected: null as string | null,
  chartKey: null as string | null,
  chartBars: 0,
  lastBar: null as Bar | null,
  liveEvents: 0,
  sqlRows: 0,
};
(window as unknown as { mktsConsole: typeof state }).mktsConsole = state;

const $ = <T extends HTMLElement = HTMLElement>(id: string): T => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`missing #${id}`);
  return el as T;
};

function el<K extends keyof HTMLElementTagNameMap>(tag: K, text?: string, cls?: string): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

class ApiError extends Error {
  constructor(public status: number, public code: string, message: string) { super(message); }
}

/** Call an /api/ endpoint; a JSON error body becomes an ApiError with its message. */
async function api<T>(path: string, init?: RequestInit): Promise<T> {
  const r = await fetch(path, { credentials: "same-origin", ...init });
  const text = await r.text();
  let body: unknown = null;
  try { body = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  if (!r.ok) {
    const e = (body as { error?: { code: string; message: string } } | null)?.error;
    throw new ApiError(r.status, e?.code ?? "http_error", e?.message ?? `${r.status} ${r.statusText}: ${text}`);
  }
  return body as T;
}

function showError(e: unknown): void {
  const box = $("error");
  if (e === null) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false;
  box.textContent = e instanceof ApiError ? `${e.status} ${e.code}: ${e.message}` : String(e);
}

function fmtTime(epoch: number | null): string {
  return epoch === null ? "—" : new Date(epoch * 1000).toISOString().replace(".000Z", "Z");
}

function fmtBytes(n: number | null | undefined): string {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n, u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u]}`;
}

/** `3d 4h`, `2h 5m`, `4m 12s`, `9s`. */
function fmtDuration(secs: number): string {
  const s = Math.floor(secs), d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

function fillFacts(dl: HTMLElement, facts: [string, string][]): void {
  dl.replaceChildren(...facts.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
}

/** A result table: header of column names (type in the tooltip), one row per result row. */
function fillTable(table: HTMLElement, t: TableResult): void {
  const head = el("tr");
  for (const c of t.columns) { const th = el("th", c.name); th.title = c.type; head.append(th); }
  const rows = t.rows.map((r) => {
    const tr = el("tr");
    r.forEach((v) => {
      const text = v === null ? "null" : String(v);
      tr.append(el("td", text, typeof v === "number" ? undefined : "text"));
    });
    return tr;
  });
  table.replaceChildren(el("thead"), el("tbody"));
  table.firstElementChild!.append(head);
  table.lastElementChild!.append(...rows);
}

// ---- tabs and routing (#/catalog/KEY, #/sql, #/chart/KEY, #/status)

const TABS = ["catalog", "sql", "chart", "status"] as const;
type Tab = (typeof TABS)[number];

function route(): void {
  const [tab, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  const t: Tab = (TABS as readonly string[]).includes(tab) ? (tab as Tab) : "catalog";
  const key = rest.length === 3 ? rest.map(decodeURIComponent).join("/") : null;
  for (const name of TABS) $(`tab-${name}`).hidden = name !== t;
  document.querySelectorAll<HTMLAnchorElement>("header nav a").forEach((a) => a.classList.toggle("active", a.dataset.tab === t));
  showError(null);
  if (t === "catalog" && key) void selectBucket(key);
  if (t === "chart") { fillChartKeys(); if (key) { $<HTMLSelectElement>("chart-key").value = key; void drawChart(); } }
  if (t === "status") void loadStatus();
}

const keyPath = (key: string) => key.split("/").map(encodeURIComponent).join("/");

// ---- catalog

async function loadBuckets(): Promise<void> {
  try {
    const r = await api<{ buckets: Bucket[] }>("/api/buckets");
    state.buckets = r.buckets;
    renderBucketList();
    fillChartKeys();
  } catch (e) { showError(e); }
}

function renderBucketList(): void {
  const f = $<HTMLInputElement>("bucket-filter").value.trim().toLowerCase();
  const items = state.buckets.filter((b) => b.key.toLowerCase().includes(f)).map((b) => {
    const li = el("li");
    li.dataset.key = b.key;
    li.append(el("span", b.key), el("span", b.rows.toLocaleString("en-US"), "n"));
    li.classList.toggle("selected", b.key === state.selected);
    li.onclick = () => { location.hash = `#/catalog/${keyPath(b.key)}`; };
    return li;
  });
  $("bucket-list").replaceChildren(...items);
}

async function selectBucket(key: string): Promise<void> {
  state.selected = key;
  renderBucketList();
  $("bucket-title").textContent = key;
  try {
    const b = await api<Bucket>(`/api/buckets/${keyPath(key)}`);
    fillFacts($("bucket-facts"), [
      ["Rows", b.rows.toLocaleString("en-US")],
      ["Years", b.years.join(", ") || "—"],
      ["First", fmtTime(b.first_epoch)],
      ["Last", fmtTime(b.last_epoch)],
      ["Size on disk", fmtBytes(b.size_bytes)],
      ["Records", b.variable_length ? "variable length (ticks)" : "fixed timeframe"],
    ]);
    fillTable($("bucket-columns"), { columns: [{ name: "Column", type: "" }, { name: "Type", type: "" }],
      rows: [["Epoch", "timestamp (s)"], ...b.columns.map((c) => [c.name, c.type])] });
    const rows = await api<TableResult>(`/api/query?key=${encodeURIComponent(key)}&limit=50`);
    rows.rows.reverse();
    fillTable($("bucket-rows"), rows);
    $<HTMLButtonElement>("open-chart").disabled = !b.ohlc;
    $("catalog-hint").hidden = true;
    $("bucket-detail").hidden = false;
    $("bucket-detail").dataset.key = key;
  } catch (e) { $("bucket-detail").hidden = true; showError(e); }
}

// ---- SQL

async function runSql(): Promise<void> {
  const btn = $<HTMLButtonElement>("sql-run");
  btn.disabled = true;
  $("sql-info").textContent = "running…";
  showError(null);
  try {
    const limit = Number($<HTMLInputElement>("sql-limit").value) || 1000;
    const r = await api<TableResult & { row_count: number; truncated: boolean; elapsed_ms: number }>("/api/sql", {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ sql: $<HTMLTextAreaElement>("sql-text").value, limit }),
    });
    fillTable($("sql-result"), r);
    state.sqlRows = r.row_count;
    $("sql-info").textContent = `${r.row_count} row${r.row_count === 1 ? "" : "s"}${r.truncated ? ` (first ${limit}; more not read)` : ""} in ${r.elapsed_ms.toFixed(1)} ms`;
  } catch (e) {
    $("sql-result").replaceChildren();
    $("sql-info").textContent = "";
    showError(e);
  } finally { btn.disabled = false; }
}

// ---- chart

let chart: IChartApi | null = null;
let candles: ISeriesApi<"Candlestick"> | null = null;
let volume: ISeriesApi<"Histogram"> | null = null;
let live: EventSource | null = null;

function fillChartKeys(): void {
  const sel = $<HTMLSelectElement>("chart-key");
  const keep = sel.value || state.chartKey || "";
  const opts = state.buckets.filter((b) => b.ohlc).map((b) => { const o = el("option", b.key); o.value = b.key; return o; });
  sel.replaceChildren(...opts);
  if (keep && state.buckets.some((b) => b.key === keep && b.ohlc)) sel.value = keep;
}

function ensureChart(): void {
  if (chart) return;
  const box = $("chart");
  chart = createChart(box, {
    autoSize: true,
    layout: { background: { color: "#ffffff" }, textColor: "#1d2330", attributionLogo: true },
    grid: { vertLines: { color: "#eef0f3" }, horzLines: { color: "#eef0f3" } },
    timeScale: { timeVisible: true, secondsVisible: false },
  });
  candles = chart.addSeries(CandlestickSeries, { upColor: "#26a69a", downColor: "#ef5350", borderVisible: false, wickUpColor: "#26a69a", wickDownColor: "#ef5350" });
  candles.priceScale().applyOptions({ scaleMargins: { top: 0.08, bottom: 0.25 } }); // candles above the volume band
  volume = chart.addSeries(HistogramSeries, { priceScaleId: "volume", priceFormat: { type: "volume" }, color: "#b0bec5" });
  chart.priceScale("volume").applyOptions({ scaleMargins: { top: 0.8, bottom: 0 } });
}

/** Bars (and volumes, when the rows have a Volume column) of a result table. */
function toBars(t: TableResult): { bars: Bar[]; vols: HistogramData<UTCTimestamp>[] } {
  const ix = (n: string) => t.columns.findIndex((c) => c.name === n);
  const [e, o, h, l, c, v] = ["Epoch", "Open", "High", "Low", "Close", "Volume"].map(ix);
  if ([e, o, h, l, c].some((i) => i < 0)) throw new Error("the rows have no Epoch/Open/High/Low/Close columns");
  const bars: Bar[] = [], vols: HistogramData<UTCTimestamp>[] = [];
  for (const r of t.rows) {
    const time = Math.floor(Date.parse(String(r[e])) / 1000) as UTCTimestamp;
    const bar = { time, open: Number(r[o]), high: Number(r[h]), low: Number(r[l]), close: Number(r[c]) };
    bars.push(bar);
    if (v >= 0) vols.push({ time, value: Number(r[v]), color: bar.close >= bar.open ? "#a5d6a7" : "#ef9a9a" });
  }
  return { bars, vols };
}

function setBarCount(): void {
  $("chart").dataset.bars = String(state.chartBars);
  $("chart-info").textContent = `${state.chartBars} bars${state.lastBar ? `, last close ${state.lastBar.close}` : ""}${live ? ", live" : ""}`;
}

async function drawChart(): Promise<void> {
  const key = $<HTMLSelectElement>("chart-key").value;
  if (!key) { showError("no OHLC bucket to chart (one with Open, High, Low and Close columns)"); return; }
  showError(null);
  const q = new URLSearchParams({ key, limit: $<HTMLInputElement>("chart-limit").value || "5000" });
  const start = $<HTMLInputElement>("chart-start").value.trim(), end = $<HTMLInputElement>("chart-end").value.trim();
  if (start) q.set("start", start);
  if (end) q.set("end", end);
  try {
    const t = await api<TableResult>(`/api/query?${q}`);
    const { bars, vols } = toBars(t);
    ensureChart();
    candles!.setData(bars.map((b) => ({ ...b })));
    volume!.setData(vols);
    chart!.timeScale().fitContent();
    state.chartKey = key;
    state.chartBars = bars.length;
    state.lastBar = bars.length ? bars[bars.length - 1] : null;
    setBarCount();
    if ($<HTMLInputElement>("chart-live").checked) startLive(key); else stopLive();
  } catch (e) { showError(e); }
}

function startLive(key: string): void {
  stopLive();
  const box = $("chart");
  const es = new EventSource(`/api/live?key=${encodeURIComponent(key)}`);
  live = es;
  es.addEventListener("subscribed", () => { box.dataset.live = "on"; setBarCount(); });
  es.addEventListener("append", (ev) => {
    const msg = JSON.parse((ev as MessageEvent).data) as TableResult & { key: string };
    if (msg.key !== state.chartKey || !candles || !volume) return;
    const { bars, vols } = toBars(msg);
    bars.forEach((b, i) => {
      const last = state.lastBar;
      if (last && b.time < last.time) return; // an older bar rewritten: shown on the next Draw
      if (!last || b.time > last.time) state.chartBars++;
      candles!.update({ ...b }); // the chart keeps (and annotates) what it is given
      if (vols[i]) volume!.update(vols[i]);
      state.lastBar = b;
    });
    state.liveEvents++;
    setBarCount();
  });
  es.addEventListener("error", (ev) => {
    const data = (ev as MessageEvent).data;
    box.dataset.live = "reconnecting";
    if (data) showError(JSON.parse(data).error?.message ?? data);
  });
}

function stopLive(): void {
  if (live) { live.close(); live = null; }
  $("chart").dataset.live = "off";
}

// ---- status

async function loadStatus(): Promise<void> {
  try {
    const s = await api<{
      version: string; git_hash: string; uptime: string; uptime_seconds: number; ready: boolean;
      health: { writable: boolean; halted: string | null; damaged: { key: string; reason: string }[]; checkpoint_error: string | null };
      policy: Record<string, boolean>; metrics: Record<string, number | null>;
      plugins: Record<string, unknown>[]; replication: unknown;
    }>("/api/status");
    $("server-line").textContent = `mkts ${s.version} · up ${fmtDuration(s.uptime_seconds)}`;
    const problems = [s.health.halted, s.health.checkpoint_error, ...s.health.damaged.map((d) => `${d.key}: ${d.reason}`)].filter(Boolean);
    fillFacts($("status-facts"), [
      ["Version", s.version + (s.git_hash ? ` (${s.git_hash})` : "")],
      ["Uptime", `${fmtDuration(s.uptime_seconds)} (${s.uptime})`],
      ["Ready", String(s.ready)],
      ["Writable", String(s.health.writable)],
      ["Health", problems.length ? problems.join("; ") : "ok"],
      ["Policy", Object.entries(s.policy).map(([k, v]) => `${k}: ${v}`).join(", ")],
    ]);
    fillTable($("status-metrics"), { columns: [{ name: "Metric", type: "" }, { name: "Value", type: "" }],
      rows: Object.entries(s.metrics).map(([k, v]) => [k, k.endsWith("_bytes") ? fmtBytes(v) : v]) });
    const cols = ["entry", "kind", "module", "role", "up", "fired", "errors", "dropped", "queued", "restarts"];
    fillTable($("status-plugins"), { columns: cols.map((name) => ({ name, type: "" })), rows: s.plugins.map((p) => cols.map((c) => p[c] ?? null)) });
    $("status-no-plugins").hidden = s.plugins.length > 0;
    $("status-replication").textContent = JSON.stringify(s.replication, null, 2);
  } catch (e) { showError(e); }
}

// ---- wiring

$("bucket-filter").addEventListener("input", renderBucketList);
$("refresh-buckets").addEventListener("click", () => void loadBuckets());
$("sql-run").addEventListener("click", () => void runSql());
$("sql-text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); void runSql(); } });
$("chart-form").addEventListener("submit", (e) => { e.preventDefault(); void drawChart(); });
$("chart-live").addEventListener("change", () => {
  if ($<HTMLInputElement>("chart-live").checked && state.chartKey) startLive(state.chartKey); else stopLive();
  setBarCount();
});
$("open-chart").addEventListener("click", () => { if (state.selected) location.hash = `#/chart/${keyPath(state.selected)}`; });
$("open-sql").addEventListener("click", () => {
  if (!state.selected) return;
  $<HTMLTextAreaElement>("sql-text").value = `SELECT * FROM "${state.selected}" ORDER BY "Epoch" DESC LIMIT 100`;
  location.hash = "#/sql";
});
window.addEventListener("hashchange", route);
setInterval(() => { if (!$("tab-status").hidden) void loadStatus(); }, 5000);

void loadBuckets().then(route);
void loadStatus();
