// A cover's card: its registry record, device, latest reading, charts over a chosen
// range (downsampled by the API), its alerts and cases. Re-read when its state moves.

import { get } from "../api.js";
import { seriesChart } from "../charts.js";
import { fill, h } from "../dom.js";
import { dateTime, number } from "../format.js";
import { label, t } from "../i18n.js";
import { coverClass, store, unitName } from "../store.js";

// Chart ranges and the bucket width that cuts each into about 120 points.
const RANGES = {
  "1h": [3_600_000, "30s"],
  "6h": [21_600_000, "3m"],
  "24h": [86_400_000, "12m"],
  "7d": [604_800_000, "2h"],
  "30d": [2_592_000_000, "6h"],
};
const EVERY_MS = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
const FIELDS = [
  ["tilt_deg", "°"],
  ["displacement_mm", "mm"],
  ["water_level_cm", "cm"],
  ["battery_v", "V"],
  ["rssi_dbm", "dBm"],
  ["temperature_c", "°C"],
];
const CHARTED = ["tilt_deg", "displacement_mm", "water_level_cm"];
const LISTED = 20; // alerts and cases shown on a card
let range = "24h"; // kept while the page lives

export function coverCard(panel, coverId) {
  const sections = {
    latest: h("section", { class: "card-latest" }),
    charts: h("section", { class: "card-charts" }),
    alerts: h("section", { class: "card-alerts" }),
    cases: h("section", { class: "card-cases" }),
  };
  const head = h("header", { class: "panel-head" });
  const record = h("section", { class: "card-record" });
  // What is happening first; the registry's record, for reference, last.
  fill(panel, head, sections.latest, sections.charts, sections.alerts, sections.cases, record);
  let cover = store.coverById.get(coverId);
  let signature = stateSignature(coverId);

  const renderHead = () => {
    const state = store.states.get(coverId) ?? "normal";
    const where = cover && [
      cover.road,
      unitName(cover.owner_unit),
      label("class", coverClass(cover)),
    ];
    fill(
      head,
      h("h2", {}, t("cover.title", { id: coverId })),
      h("span", { class: `badge s-${state}`, dataset: { state } }, label("state", state)),
      where && h("p", { class: "muted subtitle" }, where.join(" · ")),
      h("a", { href: "#/map", class: "close", "aria-label": t("close"), title: t("close") }, "×"),
    );
  };
  const reload = () => {
    renderHead();
    guarded(sections.latest, () => latest(sections.latest, coverId));
    guarded(sections.charts, () => charts(sections.charts, cover));
    guarded(sections.alerts, () => alerts(sections.alerts, coverId));
    guarded(sections.cases, () => cases(sections.cases, coverId));
  };
  (async () => {
    renderHead();
    await guarded(record, async () => {
      cover ??= await get(`covers/${coverId}`);
      reload();
      await renderRecord(record, cover);
    });
  })();
  return {
    update() {
      const now = stateSignature(coverId);
      if (now !== signature && cover) {
        signature = now;
        reload();
      }
    },
    destroy() {},
  };
}

/** What the live events change about a cover: when it changes, the card is re-read. */
function stateSignature(coverId) {
  const alertIds = [...store.alerts.values()]
    .filter((a) => a.cover_id === coverId)
    .map((a) => a.id);
  const caseStates = [...store.cases.values()]
    .filter((c) => c.cover_id === coverId)
    .map((c) => `${c.id}:${c.status}`);
  return JSON.stringify([store.states.get(coverId), alertIds, caseStates]);
}

async function guarded(section, work) {
  try {
    await work();
  } catch (error) {
    if (error.status === 404) fill(section, h("p", { class: "error" }, t("cover.notFound")));
    else fill(section, h("p", { class: "error" }, t("error.generic", { message: error.message })));
  }
}

function facts(rows) {
  return h(
    "dl",
    { class: "facts" },
    rows
      .filter(([, value]) => value !== null && value !== undefined && value !== "")
      .map(([name, value]) => [h("dt", {}, name), h("dd", {}, value)]),
  );
}

async function renderRecord(section, cover) {
  const yesNo = (value) => t(value ? "yes" : "no");
  const rows = [
    [t("cover.kind"), `${cover.kind_code} ${label("class", coverClass(cover))}`],
    [t("cover.owner"), unitName(cover.owner_unit)],
    [t("cover.maintainer"), cover.maintainer_unit && unitName(cover.maintainer_unit)],
    [t("cover.road"), cover.road],
    [t("cover.grid"), cover.grid],
    [t("cover.position"), `${cover.lon.toFixed(6)}, ${cover.lat.toFixed(6)}`],
    [t("cover.depth"), cover.depth_cm && `${number(cover.depth_cm)} cm`],
    [t("cover.material"), cover.material],
    [t("cover.installed"), cover.installed_on],
    [t("cover.floodProne"), yesNo(cover.flood_prone)],
    [t("cover.antiFall"), yesNo(cover.anti_fall)],
    [t("cover.state"), label("coverState", cover.state)],
    [t("cover.device"), cover.device_id ?? t("cover.noDevice")],
  ];
  if (cover.device_id) {
    const device = await get(`devices/${encodeURIComponent(cover.device_id)}`);
    rows.push([t("device.model"), device.model]);
    rows.push([t("device.interval"), `${device.report_interval_s} s`]);
  }
  fill(section, h("h3", {}, t("cover.record")), facts(rows));
}

async function latest(section, coverId) {
  // The last 24 h first; a quiet sensor's last reading is found through daily buckets.
  let series = await get(`covers/${coverId}/readings`);
  if (series.points.length === 0) {
    const end = new Date();
    const start = new Date(end - 30 * 86_400_000);
    const days = await get(`covers/${coverId}/readings`, {
      start: start.toISOString(),
      end: end.toISOString(),
      every: "1d",
    });
    const last = days.buckets.at(-1);
    if (last) {
      const dayStart = new Date(last.time_ms).toISOString();
      const dayEnd = new Date(last.time_ms + 86_400_000).toISOString();
      series = await get(`covers/${coverId}/readings`, { start: dayStart, end: dayEnd });
    }
  }
  const point = series.points.at(-1);
  if (!point)
    return fill(
      section,
      h("h3", {}, t("cover.latest")),
      h("p", { class: "muted" }, t("cover.noReadings")),
    );
  const rows = [[t("field.time"), dateTime(point.time_ms)]];
  for (const [field, unit] of FIELDS) {
    if (point[field] !== null && point[field] !== undefined)
      rows.push([t(`field.${field}`), `${number(point[field], 2)} ${unit}`]);
  }
  fill(section, h("h3", {}, t("cover.latest")), facts(rows));
}

function limitsOf(cover) {
  const over = cover.thresholds ?? {};
  const water =
    over.water_limit_cm ?? (cover.depth_cm ? cover.depth_cm - (over.water_margin_cm ?? 30) : null);
  return {
    tilt_deg: [
      { value: over.tilt_warn_deg ?? 10, label: label("kind", "cover_tilted") },
      { value: over.tilt_open_deg ?? 45, label: label("kind", "cover_open") },
    ],
    displacement_mm: [
      { value: over.displacement_raise_mm ?? 20, label: label("kind", "cover_displaced") },
    ],
    water_level_cm: water === null ? [] : [{ value: water, label: label("kind", "water_high") }],
  };
}

async function charts(section, cover) {
  const [spanMs, every] = RANGES[range];
  const everyMs = Number(every.slice(0, -1)) * EVERY_MS[every.at(-1)];
  const endMs = Math.ceil(Date.now() / everyMs) * everyMs;
  const startMs = endMs - spanMs;
  const buttons = h(
    "div",
    { class: "segmented", role: "group" },
    Object.keys(RANGES).map((name) =>
      h(
        "button",
        {
          type: "button",
          class: name === range ? "active" : "",
          "aria-pressed": String(name === range),
          dataset: { range: name },
          onclick: () => {
            range = name;
            guarded(section, () => charts(section, cover));
          },
        },
        t(`range.${name}`),
      ),
    ),
  );
  fill(section, h("h3", {}, t("cover.charts")), buttons, h("p", { class: "muted" }, t("loading")));
  const series = await get(`covers/${cover.cover_id}/readings`, {
    start: new Date(startMs).toISOString(),
    end: new Date(endMs).toISOString(),
    every,
  });
  const limits = limitsOf(cover);
  const units = Object.fromEntries(FIELDS);
  fill(
    section,
    h("h3", {}, t("cover.charts")),
    buttons,
    CHARTED.map((field) =>
      seriesChart({
        field,
        unit: units[field],
        buckets: series.buckets,
        startMs,
        endMs,
        everyMs,
        limits: limits[field],
      }),
    ),
  );
}

async function alerts(section, coverId) {
  const page = await get("alerts", { cover_id: coverId, limit: LISTED });
  const list = page.items.map((alert) =>
    h(
      "li",
      {
        class: `alert-item sev-${alert.severity} ${alert.status}`,
        dataset: { alertId: alert.id, kind: alert.kind },
      },
      h("span", { class: `badge sev-${alert.severity}` }, label("severity", alert.severity)),
      h("b", {}, label("kind", alert.kind)),
      alert.value !== null ? ` ${number(alert.value, 2)}` : "",
      h(
        "span",
        { class: "muted" },
        ` ${dateTime(alert.raised_ms)} · ${label("alertStatus", alert.status)}`,
      ),
    ),
  );
  fill(
    section,
    h("h3", {}, t("cover.alerts")),
    list.length ? h("ul", { class: "plain" }, list) : h("p", { class: "muted" }, t("none")),
  );
}

async function cases(section, coverId) {
  const page = await get("cases", { cover_id: coverId, limit: LISTED });
  const list = page.items.map((item) =>
    h(
      "li",
      {},
      h(
        "a",
        {
          href: `#/cases/${item.id}`,
          class: "case-link",
          dataset: { caseId: item.id, status: item.status },
        },
        h("span", { class: `badge sev-${item.severity}` }, label("severity", item.severity)),
        ` #${item.id} · ${label("status", item.status)} · ${dateTime(item.opened_ms)}`,
      ),
    ),
  );
  fill(
    section,
    h("h3", {}, t("cover.cases")),
    list.length ? h("ul", { class: "plain" }, list) : h("p", { class: "muted" }, t("none")),
  );
}
