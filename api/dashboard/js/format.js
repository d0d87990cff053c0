// Numbers, times and durations in the current language.

import { lang, t } from "./i18n.js";

const SECOND = 1000;
const UNITS = [
  ["d", 86_400_000],
  ["h", 3_600_000],
  ["m", 60_000],
  ["s", SECOND],
];

/** "2小时5分" / "2 h 5 min": the two largest non-zero units of `ms`. */
export function duration(ms) {
  let rest = Math.max(0, Math.round(Math.abs(ms) / SECOND) * SECOND);
  const parts = [];
  for (const [unit, size] of UNITS) {
    const n = Math.floor(rest / size);
    rest -= n * size;
    if (n > 0 || (unit === "s" && parts.length === 0)) parts.push(t(`duration.${unit}`, { n }));
    if (parts.length === 2) break;
  }
  return parts.join(t("duration.sep"));
}

export function dateTime(ms) {
  if (ms === null || ms === undefined) return "";
  return new Intl.DateTimeFormat(lang(), {
    year: "numeric",
    month: "2-digit",
    day: "2-digit",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
    hour12: false,
  }).format(new Date(ms));
}

export function shortTime(ms, spanMs) {
  const options =
    spanMs > 86_400_000
      ? { month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit" }
      : { hour: "2-digit", minute: "2-digit" };
  return new Intl.DateTimeFormat(lang(), { ...options, hour12: false }).format(new Date(ms));
}

export function number(value, digits = 1) {
  if (value === null || value === undefined) return "–";
  return new Intl.NumberFormat(lang(), { maximumFractionDigits: digits }).format(value);
}

/** 0.4166 → "41.7%" (the same rounding as the tests' expectations). */
export function percent(share) {
  if (share === null || share === undefined) return "–";
  return `${(share * 100).toFixed(1)}%`;
}
