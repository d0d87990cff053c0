// Announcing a new critical alert: a banner at the top and a short two-tone chime.

import { fill, h } from "./dom.js";
import { label, t } from "./i18n.js";
import { store } from "./store.js";

const SOUND_ITEM = "smartcover.sound";
const TONES = [
  [880, 0],
  [660, 0.18],
]; // Hz, start (s): a falling two-tone, distinct from a phone's notification
const TONE_S = 0.16;
const VOLUME = 0.25;
let audio = null;

export const soundOn = () => localStorage.getItem(SOUND_ITEM) !== "off";

export function setSound(on) {
  localStorage.setItem(SOUND_ITEM, on ? "on" : "off");
  if (on) unlockAudio();
}

/** Browsers start audio only after a user gesture: call this from one (the sign-in). */
export function unlockAudio() {
  audio ??= new AudioContext();
  if (audio.state === "suspended") audio.resume();
}

export function chime() {
  if (!soundOn()) return;
  unlockAudio();
  const start = audio.currentTime;
  for (const [frequency, offset] of TONES) {
    const oscillator = audio.createOscillator();
    const gain = audio.createGain();
    oscillator.type = "triangle";
    oscillator.frequency.value = frequency;
    gain.gain.setValueAtTime(0.0001, start + offset);
    gain.gain.exponentialRampToValueAtTime(VOLUME, start + offset + 0.02);
    gain.gain.exponentialRampToValueAtTime(0.0001, start + offset + TONE_S);
    oscillator.connect(gain).connect(audio.destination);
    oscillator.start(start + offset);
    oscillator.stop(start + offset + TONE_S);
  }
}

/** Shows the banner for `alert` (newest on top, older ones kept below) and chimes. */
export function announce(alert) {
  const banner = document.getElementById("banner");
  const cover = store.coverById.get(alert.cover_id);
  const text = t("banner.critical", {
    kind: label("kind", alert.kind),
    cover: alert.cover_id,
    road: cover?.road ?? "",
  });
  const item = h(
    "div",
    { class: "announcement", dataset: { alertId: alert.id, coverId: alert.cover_id } },
    h("span", { class: "announcement-text" }, text),
    h("a", { href: `#/map/${alert.cover_id}`, class: "button" }, t("banner.open")),
    h("button", { type: "button", onclick: () => dismiss(item) }, t("banner.dismiss")),
  );
  banner.prepend(item);
  banner.hidden = false;
  chime();
}

function dismiss(item) {
  const banner = item.parentElement;
  item.remove();
  if (banner && banner.childElementCount === 0) banner.hidden = true;
}

export function clearAnnouncements() {
  const banner = document.getElementById("banner");
  fill(banner);
  banner.hidden = true;
}
