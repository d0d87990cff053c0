// The dashboard's entry: sign-in, the top bar, hash routes to the views, the live stream.

import { announce, clearAnnouncements, setSound, soundOn, unlockAudio } from "./announce.js";
import { apiKey, forgetApiKey, onUnauthenticated, setApiKey } from "./api.js";
import { fill, h } from "./dom.js";
import { LANGS, label, lang, onLangChange, setLang, t } from "./i18n.js";
import * as data from "./store.js";
import { LiveStream } from "./stream.js";
import { casesView } from "./views/cases.js";
import { startTicking } from "./views/countdown.js";
import { mapView } from "./views/map.js";
import { progressView } from "./views/progress.js";

const ROUTES = { map: mapView, cases: casesView, progress: progressView };
const LANG_NAMES = { "zh-CN": "中文", en: "EN" };
const { store } = data;
let current = null; // the view on screen: {name, view}
let stream = null;
let live = false;

function route() {
  const [name, ...params] = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  return ROUTES[name] ? [name, params.map(decodeURIComponent)] : ["map", []];
}

function show() {
  if (!store.me) return loginView();
  current?.view.destroy?.();
  const [name, params] = route();
  renderTopbar(name);
  current = { name, view: ROUTES[name](document.getElementById("view"), params) };
}

function renderTopbar(active) {
  const me = store.me;
  const nav = Object.keys(ROUTES).map((name) =>
    h(
      "a",
      {
        href: `#/${name}`,
        "aria-current": name === active ? "page" : false,
        dataset: { nav: name },
      },
      t(`nav.${name}`),
    ),
  );
  fill(
    document.getElementById("topbar"),
    h("a", { class: "brand", href: "#/map" }, t("app.title")),
    h("nav", {}, nav),
    h(
      "span",
      { id: "live", class: `live${live ? " on" : ""}`, dataset: { live: String(live) } },
      t(live ? "live.on" : "live.off"),
    ),
    h("span", { class: "spacer" }),
    languageSwitch(),
    me && [
      h(
        "button",
        {
          type: "button",
          class: "quiet",
          id: "sound",
          "aria-pressed": String(soundOn()),
          onclick: () => {
            setSound(!soundOn());
            renderTopbar(active);
          },
        },
        t(soundOn() ? "sound.on" : "sound.off"),
      ),
      h(
        "span",
        { class: "who", id: "who", dataset: { role: me.role } },
        `${me.name} · ${label("role", me.role)}${me.unit_code ? ` · ${data.unitName(me.unit_code)}` : ""}`,
      ),
      h(
        "button",
        { type: "button", class: "quiet", id: "logout", onclick: () => signOut() },
        t("logout"),
      ),
    ],
  );
}

function languageSwitch() {
  return h(
    "span",
    { class: "segmented lang", role: "group" },
    LANGS.map((code) =>
      h(
        "button",
        {
          type: "button",
          lang: code,
          class: code === lang() ? "active" : "",
          "aria-pressed": String(code === lang()),
          onclick: () => setLang(code),
        },
        LANG_NAMES[code],
      ),
    ),
  );
}

function setLive(on) {
  live = on;
  const badge = document.getElementById("live");
  if (!badge) return;
  badge.className = `live${on ? " on" : ""}`;
  badge.dataset.live = String(on);
  badge.textContent = t(on ? "live.on" : "live.off");
}

function loginView(problem = "") {
  current?.view.destroy?.();
  current = null;
  fill(
    document.getElementById("topbar"),
    h("span", { class: "brand" }, t("app.title")),
    h("span", { class: "spacer" }),
    languageSwitch(),
  );
  const input = h("input", {
    id: "login-key",
    name: "key",
    type: "password",
    autocomplete: "off",
    required: true,
    spellcheck: "false",
  });
  const error = h("p", { class: "error", id: "login-error", role: "alert" }, problem);
  const form = h(
    "form",
    {
      class: "login",
      onsubmit: async (event) => {
        event.preventDefault();
        unlockAudio(); // a user gesture: the alert chime may play from now on
        setApiKey(input.value.trim());
        await start();
      },
    },
    h("h1", {}, t("login.title")),
    h("label", {}, h("span", {}, t("login.key")), input),
    h("button", { type: "submit", class: "primary" }, t("login.submit")),
    error,
    h("p", { class: "muted" }, t("login.hint")),
  );
  fill(document.getElementById("view"), form);
  input.focus();
}

async function start() {
  stop(); // a second sign-in replaces the first
  try {
    await data.signIn();
    await data.loadRegistry();
    await data.refresh();
  } catch (error) {
    data.reset();
    if (error.status === 401) {
      forgetApiKey();
      return loginView(t("login.refused"));
    }
    return loginView(t("error.generic", { message: error.message }));
  }
  stream = new LiveStream({
    onEvent: (type, payload) => {
      data.applyEvent(type, payload);
      if (type === "alert.raised" && payload.alert?.severity === "critical")
        announce(payload.alert);
    },
    onOpen: () => data.refreshSoon(), // whatever happened while it was not connected
    onStatus: setLive,
    onRefused: expired,
  });
  stream.start();
  show();
}

function stop() {
  stream?.stop();
  stream = null;
  data.reset();
  clearAnnouncements();
  setLive(false);
}

function signOut() {
  stop();
  forgetApiKey();
  loginView();
}

function expired() {
  if (!store.me) return;
  stop();
  forgetApiKey();
  loginView(t("login.expired"));
}

function criticalTitle() {
  const count = [...store.states.values()].filter((state) => state === "critical").length;
  document.title = count ? `(${count}) smartcover` : "smartcover";
}

data.subscribe((what) => {
  criticalTitle();
  current?.view.update(what);
});
data.onRefreshError((error) => console.warn("refresh failed:", error.message));
onUnauthenticated(expired);
onLangChange(() => (store.me ? show() : loginView()));
window.addEventListener("hashchange", show);
document.addEventListener("pointerdown", unlockAudio, { once: true }); // after a reload
startTicking();
if (apiKey()) start();
else loginView();
