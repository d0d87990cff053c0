// The API as the dashboard uses it: the key from sessionStorage in every request, one
// error type, pages followed to the end, downloads as blobs.

const KEY_ITEM = "smartcover.key";
const PAGE = 500; // the API's largest page
const listeners = new Set();
let clockOffsetMs = 0;

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const apiKey = () => sessionStorage.getItem(KEY_ITEM);
export const setApiKey = (key) => sessionStorage.setItem(KEY_ITEM, key);
export const forgetApiKey = () => sessionStorage.removeItem(KEY_ITEM);

/** `fn()` is called when the server refuses the key (revoked, or the admin key changed). */
export function onUnauthenticated(fn) {
  listeners.add(fn);
}

/** The server's clock in epoch ms: deadlines are counted down against it, not ours. */
export const serverNow = () => Date.now() + clockOffsetMs;

export function apiUrl(path, params = {}) {
  const url = new URL(`api/v1/${path}`, document.baseURI);
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  return url;
}

export function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${apiKey() ?? ""}`, ...extra };
}

async function request(path, { params, method = "GET", body } = {}) {
  const headers = authHeaders(body ? { "Content-Type": "application/json" } : {});
  const response = await fetch(apiUrl(path, params), {
    method,
    headers,
    body: body ? JSON.stringify(body) : undefined,
    cache: "no-store",
  });
  const date = Date.parse(response.headers.get("Date") ?? "");
  if (!Number.isNaN(date)) clockOffsetMs = date + 500 - Date.now(); // Date has 1 s steps
  if (response.ok) return response;
  let error = { code: "http_error", message: `HTTP ${response.status}` };
  try {
    error = await response.json();
  } catch {
    // not the API's error body (a proxy's page): keep the status line
  }
  if (response.status === 401) for (const fn of listeners) fn();
  throw new ApiError(response.status, error.code, error.message);
}

export async function get(path, params) {
  return (await request(path, { params })).json();
}

export async function post(path, body) {
  return (await request(path, { method: "POST", body })).json();
}

/** Every item of a paged list; `until(item)` true stops early (the list is ordered). */
export async function getAll(path, params = {}, until = () => false) {
  const items = [];
  let offset = 0;
  while (offset !== null) {
    const page = await get(path, { ...params, limit: PAGE, offset });
    const stop = page.items.findIndex(until);
    items.push(...(stop < 0 ? page.items : page.items.slice(0, stop)));
    offset = stop < 0 ? page.next_offset : null;
  }
  return items;
}

/** A file from the API, with the name its Content-Disposition gives. */
export async function download(path, params) {
  const response = await request(path, { params });
  const disposition = response.headers.get("Content-Disposition") ?? "";
  const utf8 = /filename\*=UTF-8''([^;]+)/i.exec(disposition);
  const plain = /filename="([^"]+)"/i.exec(disposition);
  const name = utf8 ? decodeURIComponent(utf8[1]) : plain ? plain[1] : path.split("/").pop();
  return { blob: await response.blob(), name };
}
