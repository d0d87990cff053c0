// Progress: per unit for a month, the stats endpoint as a table and as bars against the
// 40 % target; the three ledgers to download.

import { download, get } from "../api.js";
import { shareBars } from "../charts.js";
import { fill, h } from "../dom.js";
import { duration, percent } from "../format.js";
import { lang, t } from "../i18n.js";

const LEDGERS = ["census", "problems", "acceptance"];
const FORMATS = ["xlsx", "csv"];
let month = ""; // "" until the API says which month is current (in the district's zone)

export function progressView(root) {
  const table = h("div", { class: "table-wrap" });
  const chart = h("figure", { class: "chart bars-chart" });
  const ledgers = h("section", { class: "ledgers" });
  const picker = h("input", {
    type: "month",
    name: "month",
    value: month,
    onchange: (e) => load(e.target.value),
  });
  const target = h("span", { class: "muted" });
  fill(
    root,
    h(
      "section",
      { class: "view progress-view" },
      h("h2", {}, t("progress.title")),
      h(
        "div",
        { class: "filters" },
        h("label", {}, h("span", {}, t("progress.month")), picker),
        target,
      ),
      table,
      chart,
      ledgers,
    ),
  );

  async function load(wanted) {
    try {
      const stats = await get("stats/units", { month: wanted || undefined });
      month = stats.month;
      picker.value = stats.month;
      target.textContent = t("progress.target", { share: percent(stats.target_share) });
      fill(table, statsTable(stats));
      fill(
        chart,
        h("figcaption", {}, t("progress.chart")),
        shareBars(stats.units.map(bar), stats.target_share),
      );
      renderLedgers(ledgers, stats.month);
    } catch (error) {
      fill(table, h("p", { class: "error" }, t("error.generic", { message: error.message })));
    }
  }
  load(month);
  return { update() {}, destroy() {} };
}

function bar(unit) {
  return {
    unit: unit.unit_code,
    label: unit.unit_name,
    share: unit.remediated_share,
    meets: unit.meets_target,
  };
}

const COLUMNS = [
  ["rank", "progress.rank", (v) => (v === null ? "–" : String(v))],
  ["unit_name", "progress.unit", (v) => v],
  ["covers", "progress.covers", String],
  ["problem_covers", "progress.problemCovers", String],
  ["remediated_covers", "progress.remediated", String],
  ["remediated_share", "progress.share", percent],
  ["meets_target", "progress.meets", (v) => (v === null ? "–" : t(v ? "yes" : "no"))],
  ["median_ack_s", "progress.medianAck", (v) => (v === null ? "–" : duration(v * 1000))],
  ["median_resolve_s", "progress.medianResolve", (v) => (v === null ? "–" : duration(v * 1000))],
  ["overdue_cases", "progress.overdue", String],
];

function statsTable(stats) {
  return h(
    "table",
    { class: "stats" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        COLUMNS.map(([, key]) => h("th", { scope: "col" }, t(key))),
      ),
    ),
    h(
      "tbody",
      {},
      stats.units.map((unit) =>
        h(
          "tr",
          { dataset: { unit: unit.unit_code }, class: unit.meets_target === false ? "short" : "" },
          COLUMNS.map(([field, key, show]) =>
            h(
              "td",
              { dataset: { field, value: JSON.stringify(unit[field]) }, "data-label": t(key) },
              show(unit[field]),
            ),
          ),
        ),
      ),
    ),
  );
}

function renderLedgers(section, chosen) {
  const [year, monthNo] = chosen.split("-").map(Number);
  const last = new Date(Date.UTC(year, monthNo, 0)).getUTCDate(); // day 0 of next month
  const period = { from: `${chosen}-01`, to: `${chosen}-${String(last).padStart(2, "0")}` };
  const status = h("p", { class: "muted", role: "status" });
  const link = (ledger, format) =>
    h(
      "button",
      {
        type: "button",
        dataset: { ledger, format },
        onclick: async () => {
          const params = {
            format,
            lang: lang() === "en" ? "en" : "zh",
            ...(ledger === "census" ? {} : period),
          };
          try {
            const { blob, name } = await download(`ledgers/${ledger}`, params);
            save(blob, name);
            status.textContent = t("ledger.saved", { name });
          } catch (error) {
            status.textContent = t("error.generic", { message: error.message });
          }
        },
      },
      format.toUpperCase(),
    );
  fill(
    section,
    h("h3", {}, t("progress.ledgers")),
    h("p", { class: "muted" }, t("progress.ledgerPeriod")),
    h(
      "ul",
      { class: "plain ledger-list" },
      LEDGERS.map((ledger) =>
        h(
          "li",
          {},
          h("span", {}, t(`ledger.${ledger}`)),
          FORMATS.map((format) => link(ledger, format)),
        ),
      ),
    ),
    status,
  );
}

function save(blob, name) {
  const url = URL.createObjectURL(blob);
  const anchor = h("a", { href: url, download: name });
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000); // after the download has started
}
