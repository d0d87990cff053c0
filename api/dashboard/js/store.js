// What the views share: who is signed in, the registry, active alerts and unfinished
// cases. Loaded from the API, patched at once by live events, then re-read to converge.

import { get, getAll } from "./api.js";

export const FINISHED = new Set(["closed", "cancelled"]);
// A case in these states is a problem still on the ground (verified: the fix held).
const UNFIXED = new Set(["open", "dispatched", "acknowledged", "on_site", "resolved"]);
const SEVERITY_RANK = { critical: 0, major: 1, minor: 2 };
// The deadlines a case has met in each state (alerting.cases.MILESTONES).
const MILESTONES = {
  acknowledged: new Set(["acknowledged", "on_site", "resolved", "verified", "closed"]),
  on_site: new Set(["on_site", "resolved", "verified", "closed"]),
  resolved: new Set(["resolved", "verified", "closed"]),
};
export const MILESTONE_ORDER = Object.keys(MILESTONES);
// Map states, most urgent first: a cover shows the first that applies.
export const COVER_STATES = ["critical", "major", "minor", "silent", "case", "normal"];
const REFRESH_DELAY_MS = 250; // a burst of events costs one re-read

export const store = {
  me: null,
  units: new Map(), // code → unit
  covers: [], // in number order
  coverById: new Map(),
  alerts: new Map(), // id → active alert
  cases: new Map(), // id → case not closed or cancelled
  states: new Map(), // cover id → map state
};

const listeners = new Set();
let refreshTimer = null;
let onError = () => {};

/** `fn(what)` after a change: "registry" or "live" (alerts and cases). */
export function subscribe(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

export function onRefreshError(fn) {
  onError = fn;
}

function changed(what) {
  store.states = coverStates();
  for (const fn of listeners) fn(what);
}

export function reset() {
  clearTimeout(refreshTimer);
  Object.assign(store, { me: null, units: new Map(), covers: [], coverById: new Map() });
  Object.assign(store, { alerts: new Map(), cases: new Map(), states: new Map() });
}

export async function signIn() {
  store.me = await get("me");
  return store.me;
}

export async function loadRegistry() {
  // A crew watches its own unit's covers: it sees no other unit's alerts anyway.
  const [units, covers] = await Promise.all([
    getAll("units"),
    getAll("covers", { owner_unit: store.me.unit_code }),
  ]);
  store.units = new Map(units.map((unit) => [unit.code, unit]));
  store.covers = covers;
  store.coverById = new Map(covers.map((cover) => [cover.cover_id, cover]));
  changed("registry");
}

export async function refresh() {
  const [alerts, cases] = await Promise.all([
    getAll("alerts", { active: true }),
    // Unfinished cases come first in the API's order: stop at the first finished one.
    getAll("cases", {}, (item) => FINISHED.has(item.status)),
  ]);
  store.alerts = new Map(alerts.map((alert) => [alert.id, alert]));
  store.cases = new Map(cases.map((item) => [item.id, item]));
  changed("live");
}

export function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => refresh().catch(onError), REFRESH_DELAY_MS);
}

/** A live event applied at once (the re-read that follows confirms it). */
export function applyEvent(type, data) {
  if (type === "alert.raised" && data.alert) store.alerts.set(data.alert.id, data.alert);
  if (type === "alert.cleared" && data.alert) store.alerts.delete(data.alert.id);
  if (type.startsWith("case.") && data.case) {
    const item = { ...data.case, next_deadline_ms: nextDeadline(data.case) };
    if (FINISHED.has(item.status)) store.cases.delete(item.id);
    else store.cases.set(item.id, item);
  }
  changed("live");
  refreshSoon();
}

/** The earliest deadline a case has not met yet (api.cases.next_deadline_ms). */
export function nextDeadline(item) {
  if (FINISHED.has(item.status)) return null;
  for (const milestone of MILESTONE_ORDER) {
    const due = item.deadlines?.[milestone];
    if (due !== undefined && due !== null && !MILESTONES[milestone].has(item.status)) return due;
  }
  return null;
}

export function milestoneMet(item, milestone) {
  return MILESTONES[milestone].has(item.status);
}

/** Urgent first, as the API orders them: severity, then the nearest deadline, then id. */
export function urgentFirst(a, b) {
  const finished = Number(FINISHED.has(a.status)) - Number(FINISHED.has(b.status));
  const severity = (SEVERITY_RANK[a.severity] ?? 3) - (SEVERITY_RANK[b.severity] ?? 3);
  const da = a.next_deadline_ms ?? Infinity;
  const db = b.next_deadline_ms ?? Infinity;
  return finished || severity || (da === db ? 0 : da < db ? -1 : 1) || a.id - b.id;
}

function coverStates() {
  const worst = new Map(); // cover → most urgent state of its alerts
  const rank = (state) => COVER_STATES.indexOf(state);
  for (const alert of store.alerts.values()) {
    const state = alert.kind === "device_silent" ? "silent" : alert.severity;
    const known = worst.get(alert.cover_id);
    if (known === undefined || rank(state) < rank(known)) worst.set(alert.cover_id, state);
  }
  for (const item of store.cases.values()) {
    if (UNFIXED.has(item.status) && !worst.has(item.cover_id)) worst.set(item.cover_id, "case");
  }
  return new Map(
    store.covers.map((cover) => [cover.cover_id, worst.get(cover.cover_id) ?? "normal"]),
  );
}

export const unitName = (code) => store.units.get(code)?.name ?? code ?? "";
export const coverClass = (cover) => cover.kind_code.slice(2);
