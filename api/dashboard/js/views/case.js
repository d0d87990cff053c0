// A case's detail: facts, deadlines, the timeline, its alerts, and the moves the key's
// role allows (a crew: acknowledge, on site, resolved, on its own unit's cases).

import { get, post } from "../api.js";
import { fill, h } from "../dom.js";
import { dateTime, number } from "../format.js";
import { label, t } from "../i18n.js";
import { MILESTONE_ORDER, milestoneMet, refreshSoon, store, unitName } from "../store.js";
import { countdown } from "./countdown.js";

const CREW_MOVES = new Set(["acknowledged", "on_site", "resolved"]);

/** Where this key may move `item` (the API answers 403 to the rest anyway). */
export function movesFor(item) {
  const { role, unit_code: unit } = store.me;
  if (role === "viewer") return [];
  if (role === "crew")
    return item.allowed_transitions.filter((to) => CREW_MOVES.has(to) && item.unit_code === unit);
  return item.allowed_transitions;
}

export function caseDetail(panel, caseId) {
  let shown = null; // the case as last read, to know when a live event changes it
  let message = null;

  const load = async () => {
    try {
      shown = await get(`cases/${caseId}`);
      render();
    } catch (error) {
      fill(
        panel,
        closeLink(),
        h("p", { class: "error" }, t("error.generic", { message: error.message })),
      );
    }
  };

  const move = async (to, note, buttons) => {
    if (to === "cancelled" && !note.trim()) {
      message = { error: true, text: t("case.reasonNeeded") };
      return render();
    }
    for (const button of buttons) button.disabled = true;
    try {
      await post(`cases/${caseId}/transitions`, { to, note });
      message = { error: false, text: t("case.moved", { status: label("status", to) }) };
      refreshSoon();
      await load();
    } catch (error) {
      message = { error: true, text: t("error.generic", { message: error.message }) };
      for (const button of buttons) button.disabled = false;
      render();
    }
  };

  const render = () => fill(panel, ...detail(shown, message, move));
  fill(panel, closeLink(), h("p", { class: "muted" }, t("loading")));
  load();
  return {
    update(what) {
      if (what !== "live" || !shown) return;
      const live = store.cases.get(caseId);
      // Only a change of this case re-reads it (the timeline is not in the event).
      if (live && JSON.stringify(live.state_times) !== JSON.stringify(shown.state_times)) {
        load();
      } else if (live && (live.overdue !== shown.overdue || live.severity !== shown.severity)) {
        load();
      }
    },
  };
}

function closeLink() {
  return h(
    "a",
    { href: "#/cases", class: "close", "aria-label": t("close"), title: t("close") },
    "×",
  );
}

function detail(item, message, move) {
  return [
    h(
      "header",
      { class: "panel-head" },
      h("h2", {}, t("case.title", { id: item.id })),
      h("span", { class: `badge sev-${item.severity}` }, label("severity", item.severity)),
      h(
        "span",
        { class: "badge status", dataset: { status: item.status } },
        label("status", item.status),
      ),
      item.overdue ? h("span", { class: "badge overdue" }, t("cases.overdue")) : null,
      closeLink(),
    ),
    h(
      "dl",
      { class: "facts" },
      h("dt", {}, t("case.cover")),
      h("dd", {}, h("a", { href: `#/map/${item.cover_id}` }, item.cover_id)),
      h("dt", {}, t("case.unit")),
      h("dd", {}, unitName(item.unit_code)),
      h("dt", {}, t("case.road")),
      h("dd", {}, item.road ?? ""),
      h("dt", {}, t("case.kinds")),
      h("dd", {}, item.kinds.map((kind) => label("kind", kind)).join("、")),
      h("dt", {}, t("case.opened")),
      h("dd", {}, dateTime(item.opened_ms)),
      item.reopened
        ? [h("dt", {}, ""), h("dd", {}, t("case.reopened", { n: item.reopened }))]
        : null,
      item.escalated.length
        ? [
            h("dt", {}, ""),
            h(
              "dd",
              {},
              t("case.escalated", {
                items: item.escalated.map((m) => label("milestone", m)).join("、"),
              }),
            ),
          ]
        : null,
    ),
    deadlines(item),
    actions(item, message, move),
    timeline(item),
    alertList(item),
  ];
}

function deadlines(item) {
  const rows = MILESTONE_ORDER.filter((m) => item.deadlines[m] !== undefined).map((milestone) => {
    const met = milestoneMet(item, milestone);
    const at = item.state_times[milestone];
    return h(
      "li",
      { class: met ? "met" : "", dataset: { milestone } },
      h("b", {}, label("milestone", milestone)),
      ` ${dateTime(item.deadlines[milestone])}`,
      met ? h("span", { class: "muted" }, ` · ${t("case.met")} ${at ? dateTime(at) : ""}`) : null,
    );
  });
  return h(
    "section",
    {},
    h("h3", {}, t("case.deadlines")),
    h("div", {}, countdown(item)),
    h("ul", { class: "plain deadlines" }, rows),
  );
}

function actions(item, message, move) {
  const moves = movesFor(item);
  const note = h("textarea", {
    id: "case-note",
    name: "note",
    rows: 2,
    maxlength: 2000,
    placeholder: t("case.notePlaceholder"),
  });
  const feedback = message
    ? h("p", { class: message.error ? "error" : "ok", role: "status" }, message.text)
    : null;
  if (moves.length === 0) {
    const terminal = item.allowed_transitions.length === 0;
    return h(
      "section",
      { class: "actions" },
      feedback,
      terminal ? null : h("p", { class: "muted" }, t("case.readOnly")),
    );
  }
  const buttons = moves.map((to) =>
    h(
      "button",
      {
        type: "button",
        class: to === "cancelled" ? "danger" : "primary",
        dataset: { to },
        onclick: () => move(to, note.value, buttons),
      },
      label("to", to),
    ),
  );
  return h(
    "section",
    { class: "actions" },
    h("h3", {}, t("case.actions")),
    h("label", { class: "note" }, h("span", {}, t("case.note")), note),
    h("div", { class: "buttons" }, buttons),
    feedback,
  );
}

function timeline(item) {
  const actor = (name) => (name.startsWith("system") ? label("timeline", name) : name);
  return h(
    "section",
    {},
    h("h3", {}, t("case.timeline")),
    h(
      "ol",
      { class: "timeline" },
      item.timeline.map((event) =>
        h(
          "li",
          { dataset: { action: event.action, to: event.to_status ?? "" } },
          h("time", {}, dateTime(event.at_ms)),
          h(
            "b",
            {},
            event.action === "transition"
              ? label("status", event.to_status)
              : label("action", event.action),
          ),
          h("span", { class: "actor" }, actor(event.actor)),
          event.note ? h("q", {}, event.note) : null,
        ),
      ),
    ),
  );
}

function alertList(item) {
  return h(
    "section",
    {},
    h("h3", {}, t("case.alerts")),
    h(
      "ul",
      { class: "plain" },
      item.alerts.map((alert) =>
        h(
          "li",
          { dataset: { alertId: alert.id } },
          h("span", { class: `badge sev-${alert.severity}` }, label("severity", alert.severity)),
          h("b", {}, label("kind", alert.kind)),
          alert.value !== null ? ` ${number(alert.value, 2)}` : "",
          h(
            "span",
            { class: "muted" },
            ` ${dateTime(alert.raised_ms)} · ${label("alertStatus", alert.status)}`,
          ),
        ),
      ),
    ),
  );
}
