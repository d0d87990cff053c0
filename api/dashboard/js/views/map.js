// The map: the registry's roads drawn through their covers (no tiles), each cover a dot
// coloured by its state; filters by unit, kind and state; a click opens the cover's card.

import { fill, h, s } from "../dom.js";
import { label, t } from "../i18n.js";
import { COVER_STATES, coverClass, store, unitName } from "../store.js";
import { coverCard } from "./cover.js";

const SIZE = 1000; // the longer side of the drawing, in viewBox units
const PAD = 40;
const DOT_R = 7;
const LABEL_PX = 13;
const ZOOM_STEP = 1.5;
const MAX_ZOOM = 40;
const DRAG_PX = 4; // a pointer moving further than this pans instead of clicking

// Kept across visits and language switches.
const filters = { unit: "", kind: "", state: "" };
let view = null; // the zoomed viewBox [x, y, w, h], null: everything

export function mapView(root, params) {
  const coverId = params[0] ?? null;
  const panel = h("aside", { class: "panel", id: "cover-panel" });
  const main = h("div", { class: "main map-main" });
  const split = h("div", { class: `split${coverId ? " has-panel" : ""}` }, main, panel);
  fill(root, h("section", { class: "view map-view" }, split));
  if (store.me.unit_code) filters.unit = store.me.unit_code;
  const drawing = new MapDrawing(main, coverId);
  const card = coverId ? coverCard(panel, coverId) : null;
  if (!coverId) panel.hidden = true;
  return {
    update(what) {
      if (what === "registry") drawing.build();
      else drawing.paint();
      card?.update(what);
    },
    destroy() {
      card?.destroy();
    },
  };
}

class MapDrawing {
  constructor(main, selected) {
    this.main = main;
    this.selected = selected;
    this.build();
  }

  build() {
    const covers = store.covers;
    this.projection = project(covers);
    const { box } = this.projection;
    this.full = box;
    this.svg = s("svg", {
      class: "map",
      viewBox: (view ?? box).join(" "),
      role: "group",
      "aria-label": t("nav.map"),
    });
    this.roads = s("g", { class: "roads" }, this.drawRoads(covers));
    this.dots = new Map();
    const dots = s("g", { class: "covers" });
    for (const cover of covers) {
      const [cx, cy] = this.projection.at(cover.lon, cover.lat);
      const dot = s(
        "circle",
        {
          class: "cover",
          cx: cx.toFixed(1),
          cy: cy.toFixed(1),
          r: DOT_R,
          tabindex: 0,
          role: "button",
          dataset: { coverId: cover.cover_id },
        },
        s("title"),
      );
      this.dots.set(cover.cover_id, dot);
      dots.append(dot);
    }
    this.svg.append(this.roads, dots);
    this.filterBar = h("div", { class: "filters" });
    this.legend = h("div", { class: "legend" });
    const tools = h(
      "div",
      { class: "map-tools" },
      h(
        "button",
        { type: "button", title: t("map.zoomIn"), onclick: () => this.zoom(1 / ZOOM_STEP) },
        "+",
      ),
      h(
        "button",
        { type: "button", title: t("map.zoomOut"), onclick: () => this.zoom(ZOOM_STEP) },
        "−",
      ),
      h(
        "button",
        { type: "button", title: t("map.reset"), onclick: () => this.setView(null) },
        "⟲",
      ),
    );
    this.count = h("p", { class: "muted map-count" });
    fill(
      this.main,
      this.filterBar,
      this.legend,
      h("div", { class: "map-wrap" }, this.svg, tools),
      this.count,
    );
    this.renderFilters();
    new PanZoom(this.svg, this);
    this.svg.addEventListener("keydown", (event) => {
      const id = event.target.dataset?.coverId;
      if (id && (event.key === "Enter" || event.key === " ")) openCover(id);
    });
    this.scaleMarks();
    this.paint();
  }

  drawRoads(covers) {
    const byRoad = new Map();
    for (const cover of covers) {
      if (!byRoad.has(cover.road)) byRoad.set(cover.road, []);
      byRoad.get(cover.road).push(this.projection.at(cover.lon, cover.lat));
    }
    const roads = [];
    for (const [name, points] of byRoad) {
      // A road runs along its longer extent: order its covers that way.
      const spread = (i) =>
        Math.max(...points.map((p) => p[i])) - Math.min(...points.map((p) => p[i]));
      const axis = spread(0) >= spread(1) ? 0 : 1;
      points.sort((a, b) => a[axis] - b[axis]);
      const [x, y] = points[0];
      roads.push(
        s(
          "g",
          { class: "road", dataset: { road: name } },
          s("polyline", {
            points: points.map((p) => p.map((v) => v.toFixed(1)).join(",")).join(" "),
          }),
          s("text", { x, y: y - 14, "text-anchor": "middle" }, name),
        ),
      );
    }
    return roads;
  }

  renderFilters() {
    const locked = Boolean(store.me.unit_code);
    const owners = [...new Set(store.covers.map((c) => c.owner_unit))].sort();
    const kinds = [...new Set(store.covers.map(coverClass))].sort();
    const select = (name, options, text) =>
      h(
        "label",
        {},
        h("span", {}, t(`filter.${name}`)),
        h(
          "select",
          {
            name,
            disabled: name === "unit" && locked,
            onchange: (event) => {
              filters[name] = event.target.value;
              this.paint();
            },
          },
          h("option", { value: "" }, t("all")),
          options.map((value) =>
            h("option", { value, selected: filters[name] === value }, text(value)),
          ),
        ),
      );
    fill(
      this.filterBar,
      select("unit", owners, unitName),
      select("kind", kinds, (code) => label("class", code)),
      select("state", COVER_STATES, (state) => label("state", state)),
    );
  }

  visible(cover, ignoreState = false) {
    return (
      (!filters.unit || cover.owner_unit === filters.unit) &&
      (!filters.kind || coverClass(cover) === filters.kind) &&
      (ignoreState || !filters.state || store.states.get(cover.cover_id) === filters.state)
    );
  }

  /** Colours, visibility and the legend's counts from the store's current states. */
  paint() {
    const counts = Object.fromEntries(COVER_STATES.map((state) => [state, 0]));
    let shown = 0;
    for (const cover of store.covers) {
      const dot = this.dots.get(cover.cover_id);
      const state = store.states.get(cover.cover_id) ?? "normal";
      if (this.visible(cover, true)) counts[state] += 1;
      const visible = this.visible(cover);
      shown += Number(visible);
      dot.dataset.state = state;
      dot.setAttribute(
        "class",
        `cover s-${state}${cover.cover_id === this.selected ? " selected" : ""}`,
      );
      dot.style.display = visible ? "" : "none";
      dot.firstChild.textContent = `${cover.cover_id} · ${cover.road} · ${label("state", state)}`;
    }
    // Urgent dots are drawn last, on top of the others (normal ones stay where they are).
    const rank = (dot) => COVER_STATES.indexOf(dot.dataset.state);
    const raised = [...this.dots.values()].filter((dot) => dot.dataset.state !== "normal");
    for (const dot of raised.sort((a, b) => rank(b) - rank(a))) dot.parentNode.append(dot);
    fill(
      this.legend,
      COVER_STATES.map((state) =>
        h(
          "button",
          {
            type: "button",
            class: `legend-item${filters.state === state ? " active" : ""}`,
            dataset: { state },
            "aria-pressed": String(filters.state === state),
            onclick: () => {
              filters.state = filters.state === state ? "" : state;
              this.renderFilters();
              this.paint();
            },
          },
          h("span", { class: `swatch s-${state}` }),
          label("state", state),
          h("b", {}, String(counts[state])),
        ),
      ),
    );
    this.count.textContent = t("map.shown", { shown, total: store.covers.length });
  }

  zoom(factor, [cx, cy] = this.centre()) {
    const [x, y, w, hgt] = view ?? this.full;
    const nw = Math.min(this.full[2] * 1.5, Math.max(this.full[2] / MAX_ZOOM, w * factor));
    const k = nw / w;
    this.setView([cx - (cx - x) * k, cy - (cy - y) * k, w * k, hgt * k]);
  }

  centre() {
    const [x, y, w, hgt] = view ?? this.full;
    return [x + w / 2, y + hgt / 2];
  }

  setView(box) {
    view = box;
    this.svg.setAttribute("viewBox", (box ?? this.full).join(" "));
    this.scaleMarks();
  }

  /** Dots and labels grow less than the zoom, so that a close look separates them. */
  scaleMarks() {
    const k = ((view ?? this.full)[2] / this.full[2]) ** 0.7;
    for (const dot of this.dots.values()) dot.setAttribute("r", (DOT_R * k).toFixed(2));
    this.roads.setAttribute("font-size", (LABEL_PX * 1.6 * k).toFixed(1));
  }
}

function openCover(coverId) {
  location.hash = `#/map/${coverId}`;
}

/** An equirectangular projection of the covers' extent onto a SIZE-wide drawing. */
function project(covers) {
  const lats = covers.map((c) => c.lat);
  const lons = covers.map((c) => c.lon);
  const mid = lats.length ? (Math.min(...lats) + Math.max(...lats)) / 2 : 0;
  const k = Math.cos((mid * Math.PI) / 180); // a degree of longitude is shorter up north
  const minX = lons.length ? Math.min(...lons) * k : 0;
  const minY = lats.length ? -Math.max(...lats) : 0;
  const width = lons.length ? Math.max(...lons) * k - minX : 0;
  const height = lats.length ? -Math.min(...lats) - minY : 0;
  const scale = SIZE / Math.max(width, height, 1e-4);
  return {
    at: (lon, lat) => [(lon * k - minX) * scale + PAD, (-lat - minY) * scale + PAD],
    box: [0, 0, width * scale + 2 * PAD, height * scale + 2 * PAD],
  };
}

/** Wheel and pinch zoom, drag to pan; a click that did not drag opens a cover. */
class PanZoom {
  constructor(svg, drawing) {
    this.svg = svg;
    this.drawing = drawing;
    this.pointers = new Map();
    svg.addEventListener("wheel", (e) => this.wheel(e), { passive: false });
    svg.addEventListener("pointerdown", (e) => this.down(e));
    svg.addEventListener("pointermove", (e) => this.move(e));
    svg.addEventListener("pointerup", (e) => this.up(e));
    svg.addEventListener("pointercancel", (e) => this.pointers.delete(e.pointerId));
  }

  point(event) {
    const ctm = this.svg.getScreenCTM().inverse();
    const p = new DOMPoint(event.clientX, event.clientY).matrixTransform(ctm);
    return [p.x, p.y];
  }

  wheel(event) {
    event.preventDefault();
    this.drawing.zoom(Math.exp(event.deltaY * 0.0015), this.point(event));
  }

  down(event) {
    this.pointers.set(event.pointerId, {
      x: event.clientX,
      y: event.clientY,
      start: [event.clientX, event.clientY],
    });
    this.moved = this.pointers.size > 1;
  }

  move(event) {
    const pointer = this.pointers.get(event.pointerId);
    if (!pointer) return;
    const [x0, y0] = pointer.start;
    if (Math.hypot(event.clientX - x0, event.clientY - y0) > DRAG_PX && !this.moved) {
      this.moved = true;
      this.svg.setPointerCapture(event.pointerId);
    }
    if (!this.moved) return;
    const before = this.point({ clientX: pointer.x, clientY: pointer.y });
    const others = [...this.pointers.entries()].filter(([id]) => id !== event.pointerId);
    if (others.length === 1) {
      const other = others[0][1];
      const span = (a) => Math.hypot(a.x - other.x, a.y - other.y);
      const k = span(pointer) / Math.max(1, span({ x: event.clientX, y: event.clientY }));
      this.drawing.zoom(k, this.point({ clientX: other.x, clientY: other.y }));
    } else {
      const after = this.point(event);
      const [x, y, w, hgt] = view ?? this.drawing.full;
      this.drawing.setView([x - (after[0] - before[0]), y - (after[1] - before[1]), w, hgt]);
    }
    pointer.x = event.clientX;
    pointer.y = event.clientY;
  }

  up(event) {
    const pointer = this.pointers.get(event.pointerId);
    this.pointers.delete(event.pointerId);
    if (!pointer || this.moved) return;
    const id = event.target.dataset?.coverId;
    if (id) openCover(id);
  }
}
