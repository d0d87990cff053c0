// The cases board: urgent first, each with a countdown to its next deadline; the chosen
// case's detail beside it (on a phone, instead of it).

import { get, serverNow } from "../api.js";
import { fill, h } from "../dom.js";
import { label, t } from "../i18n.js";
import { FINISHED, store, unitName, urgentFirst } from "../store.js";
import { countdown } from "./countdown.js";
import { caseDetail } from "./case.js";

const FINISHED_SHOWN = 50; // of each finished status, newest first

// Kept across visits and language switches.
const filters = { unit: "", overdue: false, finished: false };

export function casesView(root, params) {
  const caseId = params[0] ? Number(params[0]) : null;
  const list = h("div", { class: "case-list" });
  const bar = h("div", { class: "filters" });
  const main = h("div", { class: "main" }, h("h2", {}, t("cases.title")), bar, list);
  const panel = h("aside", { class: "panel", id: "case-panel" });
  fill(
    root,
    h(
      "section",
      { class: "view cases-view" },
      h("div", { class: `split${caseId ? " has-panel" : ""}` }, main, panel),
    ),
  );
  let finished = [];

  // A case closed since `finished` was read may still be in it: one card per case.
  const render = () => {
    const items = new Map([...finished, ...store.cases.values()].map((item) => [item.id, item]));
    renderList(list, [...items.values()], caseId);
  };
  const loadFinished = async () => {
    finished = [];
    if (filters.finished) {
      const pages = await Promise.all(
        [...FINISHED].map((status) => get("cases", { status, limit: FINISHED_SHOWN })),
      );
      finished = pages.flatMap((page) => page.items);
    }
    render();
  };
  renderFilters(bar, () => loadFinished().catch(() => render()));
  const detail = caseId ? caseDetail(panel, caseId) : null;
  panel.hidden = !detail;
  loadFinished().catch(() => render());
  return {
    update(what) {
      // Finished cases are not in the store: re-read them when something moved.
      if (what === "live") (filters.finished ? loadFinished() : Promise.resolve()).catch(render);
      if (what === "live") render();
      detail?.update(what);
    },
    destroy() {},
  };
}

function renderFilters(bar, reload) {
  const units = [...store.units.values()].filter(
    (unit) => !store.me.unit_code || unit.code === store.me.unit_code,
  );
  const check = (name, text) =>
    h(
      "label",
      { class: "check" },
      h("input", {
        type: "checkbox",
        name,
        checked: filters[name],
        onchange: (event) => {
          filters[name] = event.target.checked;
          reload();
        },
      }),
      text,
    );
  fill(
    bar,
    store.me.unit_code
      ? null
      : h(
          "label",
          {},
          h("span", {}, t("filter.unit")),
          h(
            "select",
            {
              name: "unit",
              onchange: (event) => {
                filters.unit = event.target.value;
                reload();
              },
            },
            h("option", { value: "" }, t("all")),
            units.map((unit) =>
              h("option", { value: unit.code, selected: filters.unit === unit.code }, unit.name),
            ),
          ),
        ),
    check("overdue", t("cases.overdueOnly")),
    check("finished", t("cases.finished")),
  );
}

function renderList(list, items, selected) {
  const shown = items
    .filter((item) => !filters.unit || item.unit_code === filters.unit)
    .filter(
      (item) =>
        !filters.overdue || item.overdue || (item.next_deadline_ms ?? Infinity) < serverNow(),
    )
    .sort(urgentFirst);
  if (shown.length === 0) return fill(list, h("p", { class: "muted" }, t("cases.empty")));
  fill(
    list,
    shown.map((item) => {
      const cover = store.coverById.get(item.cover_id);
      return h(
        "a",
        {
          href: `#/cases/${item.id}`,
          class: `case-card sev-${item.severity}${item.overdue ? " overdue" : ""}${item.id === selected ? " selected" : ""}`,
          dataset: { caseId: item.id, status: item.status },
        },
        h(
          "div",
          { class: "case-head" },
          h("span", { class: `badge sev-${item.severity}` }, label("severity", item.severity)),
          h("b", {}, `#${item.id}`),
          h("span", { class: "status" }, label("status", item.status)),
          item.overdue ? h("span", { class: "badge overdue" }, t("cases.overdue")) : null,
        ),
        h(
          "div",
          { class: "case-where" },
          `${item.cover_id} · ${item.road ?? cover?.road ?? ""} · ${unitName(item.unit_code)}`,
        ),
        h("div", { class: "case-kinds" }, item.kinds.map((kind) => label("kind", kind)).join("、")),
        countdown(item),
      );
    }),
  );
}
