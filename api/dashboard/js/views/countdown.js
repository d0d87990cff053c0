// Countdowns to a case's next deadline, ticking once a second wherever they are shown.

import { serverNow } from "../api.js";
import { h } from "../dom.js";
import { duration } from "../format.js";
import { t } from "../i18n.js";

const TICK_MS = 1000;

/** A countdown element for `item` (a case): "due in 9 min 50 s", or overdue. */
export function countdown(item) {
  const element = h("span", { class: "countdown" });
  if (item.next_deadline_ms === null || item.next_deadline_ms === undefined) {
    element.textContent = t("cases.noDeadline");
    element.classList.add("muted");
    return element;
  }
  element.dataset.deadline = String(item.next_deadline_ms);
  tick(element, serverNow());
  return element;
}

function tick(element, now) {
  const left = Number(element.dataset.deadline) - now;
  element.textContent =
    left >= 0
      ? t("cases.dueIn", { time: duration(left) })
      : t("cases.overdueBy", { time: duration(-left) });
  element.classList.toggle("late", left < 0);
}

export function startTicking() {
  return setInterval(() => {
    const now = serverNow();
    for (const element of document.querySelectorAll(".countdown[data-deadline]"))
      tick(element, now);
  }, TICK_MS);
}
