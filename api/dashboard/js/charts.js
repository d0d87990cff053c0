// Small SVG charts: a time series (mean and max per bucket, with limits) and bars
// against a target. Sizes are viewBox units; the CSS makes them fluid.

import { h, s } from "./dom.js";
import { number, percent, shortTime } from "./format.js";
import { t } from "./i18n.js";

const W = 600;
const H = 170;
const M = { left: 46, right: 12, top: 12, bottom: 24 };
const X_TICKS = 4;
const Y_TICKS = 3;
const HEADROOM = 1.15; // space above the highest value or limit
const DOTS_BELOW = 40; // buckets: fewer than this and each one gets a dot

/**
 * A line chart of one field: `buckets` from the readings endpoint, the window
 * [startMs, endMs), `everyMs` the bucket width, `limits` [{value, label}] drawn as rules
 * (the lowest one always, the others when the data comes near them).
 */
export function seriesChart({ field, unit, buckets, startMs, endMs, everyMs, limits = [] }) {
  const means = buckets.map((b) => [b.time_ms, b.mean[field]]).filter(([, v]) => v != null);
  const maxes = buckets.map((b) => [b.time_ms, b.max[field]]).filter(([, v]) => v != null);
  const title = h("h4", {}, `${t(`field.${field}`)} (${unit})`);
  if (means.length === 0) {
    return h(
      "figure",
      { class: "chart", dataset: { field } },
      title,
      h("p", { class: "muted" }, t("chart.empty")),
    );
  }
  const top = Math.max(...maxes.map(([, v]) => v), ...means.map(([, v]) => v));
  const lowest = Math.min(...limits.map((l) => l.value));
  const shown = limits.filter((l) => l.value === lowest || l.value <= top * HEADROOM);
  const yMax = Math.max(top, ...shown.map((l) => l.value)) * HEADROOM || 1;
  const yMin = Math.min(0, ...means.map(([, v]) => v));
  const x = (ms) => M.left + ((ms - startMs) / (endMs - startMs)) * (W - M.left - M.right);
  const y = (v) => H - M.bottom - ((v - yMin) / (yMax - yMin)) * (H - M.top - M.bottom);
  const path = (points) => linePath(points, everyMs, x, y);
  const svg = s(
    "svg",
    { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": t(`field.${field}`) },
    axes(startMs, endMs, yMin, yMax, x, y),
    shown.map((l) =>
      s(
        "g",
        { class: "limit" },
        s("line", { x1: M.left, x2: W - M.right, y1: y(l.value), y2: y(l.value) }),
        s(
          "text",
          { x: W - M.right - 4, y: y(l.value) - 4, "text-anchor": "end" },
          `${l.label} ${number(l.value)}`,
        ),
      ),
    ),
    s("path", { class: "max", d: path(maxes) }),
    s("path", { class: "mean", d: path(means) }),
    means.length < DOTS_BELOW &&
      means.map(([ms, v]) =>
        s(
          "circle",
          { class: "dot", cx: x(ms + everyMs / 2), cy: y(v), r: 2.5 },
          s("title", {}, `${shortTime(ms, endMs - startMs)} ${number(v, 2)} ${unit}`),
        ),
      ),
  );
  const legend = h(
    "p",
    { class: "chart-legend" },
    h("span", { class: "key mean" }, t("chart.mean")),
    h("span", { class: "key max" }, t("chart.max")),
    h("span", { class: "key limit" }, t("chart.limit")),
  );
  return h("figure", { class: "chart", dataset: { field } }, title, svg, legend);
}

/** An SVG path through `points` (bucket starts), broken where buckets are missing. */
function linePath(points, everyMs, x, y) {
  let d = "";
  let previous = null;
  for (const [ms, value] of points) {
    const gap = previous === null || ms - previous > 2 * everyMs;
    d += `${gap ? "M" : "L"}${x(ms + everyMs / 2).toFixed(1)},${y(value).toFixed(1)}`;
    previous = ms;
  }
  return d;
}

function axes(startMs, endMs, yMin, yMax, x, y) {
  const ticks = [];
  for (let i = 0; i <= X_TICKS; i += 1) {
    const ms = startMs + ((endMs - startMs) * i) / X_TICKS;
    const anchor = i === 0 ? "start" : i === X_TICKS ? "end" : "middle";
    ticks.push(
      s("text", { x: x(ms), y: H - 6, "text-anchor": anchor }, shortTime(ms, endMs - startMs)),
    );
  }
  for (let i = 0; i <= Y_TICKS; i += 1) {
    const value = yMin + ((yMax - yMin) * i) / Y_TICKS;
    ticks.push(
      s("line", { class: "grid", x1: M.left, x2: W - M.right, y1: y(value), y2: y(value) }),
    );
    ticks.push(s("text", { x: M.left - 6, y: y(value) + 4, "text-anchor": "end" }, number(value)));
  }
  return s("g", { class: "axes" }, ticks);
}

const BAR_ROW = 30;
const BAR_LABEL = 170;

/** Horizontal bars of `rows` [{label, share, meets}] (share 0…1 or null) and a target rule. */
export function shareBars(rows, target) {
  const width = W - BAR_LABEL - M.right - 40;
  const x = (share) => BAR_LABEL + Math.min(1, share) * width;
  const top0 = 22; // room for the target's label above the bars
  const height = rows.length * BAR_ROW + top0 + 24;
  return s(
    "svg",
    { viewBox: `0 0 ${W} ${height}`, class: "bars", role: "img" },
    s(
      "g",
      { class: "axes" },
      [0, 0.5, 1].map((share) => [
        s("line", { class: "grid", x1: x(share), x2: x(share), y1: top0 - 4, y2: height - 22 }),
        s("text", { x: x(share), y: height - 8, "text-anchor": "middle" }, percent(share)),
      ]),
    ),
    rows.map((row, i) => {
      const top = i * BAR_ROW + top0;
      return s(
        "g",
        { class: `bar ${row.meets ? "meets" : "short"}`, dataset: { unit: row.unit } },
        s("text", { x: BAR_LABEL - 8, y: top + 15, "text-anchor": "end" }, row.label),
        row.share === null
          ? s("text", { x: BAR_LABEL + 4, y: top + 15, class: "muted" }, "–")
          : [
              s("rect", {
                x: BAR_LABEL,
                y: top,
                width: Math.max(1, x(row.share) - BAR_LABEL),
                height: BAR_ROW - 10,
              }),
              s("text", { x: x(row.share) + 4, y: top + 15 }, percent(row.share)),
            ],
      );
    }),
    s(
      "g",
      { class: "target" },
      s("line", { x1: x(target), x2: x(target), y1: top0 - 6, y2: height - 22 }),
      s(
        "text",
        { x: x(target), y: top0 - 10, "text-anchor": "middle" },
        `${t("progress.targetShort")} ${percent(target)}`,
      ),
    ),
  );
}
