// The live stream, read with fetch(): EventSource cannot send the Authorization header
// the API needs. Parses server-sent events and, like EventSource, reconnects after the
// server's `retry`, sending the last event id back as Last-Event-ID to miss nothing.

import { apiUrl, authHeaders } from "./api.js";

const DEFAULT_RETRY_MS = 2000;
const MAX_RETRY_MS = 30_000;
const BACKOFF = 1.5; // each failed attempt in a row waits this much longer
// The server comments every 15 s; a silence three times as long is a dead connection.
const SILENCE_MS = 45_000;

export class LiveStream {
  /** onEvent(type, data, id); onOpen() on every (re)connection; onStatus(connected). */
  constructor({ onEvent, onOpen, onStatus, onRefused }) {
    Object.assign(this, { onEvent, onOpen, onStatus, onRefused });
    this.lastId = null;
    this.retryMs = DEFAULT_RETRY_MS;
    this.controller = null;
    this.stopped = true;
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.run();
  }

  stop() {
    this.stopped = true;
    this.controller?.abort();
  }

  async run() {
    let failures = 0;
    while (!this.stopped) {
      try {
        await this.connect();
        failures = 0;
      } catch (error) {
        if (this.stopped) return;
        if (error.refused) return this.onRefused();
        failures += 1;
      }
      this.onStatus(false);
      if (this.stopped) return;
      // The server's retry, backing off while it stays down.
      const wait = Math.min(MAX_RETRY_MS, this.retryMs * BACKOFF ** Math.max(0, failures - 1));
      await new Promise((resolve) => setTimeout(resolve, wait * (0.8 + Math.random() * 0.4)));
    }
  }

  async connect() {
    this.controller = new AbortController();
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (this.lastId !== null) headers["Last-Event-ID"] = this.lastId;
    const response = await fetch(apiUrl("stream"), {
      headers,
      cache: "no-store",
      signal: this.controller.signal,
    });
    if (response.status === 401) throw Object.assign(new Error("refused"), { refused: true });
    if (response.status === 400) this.lastId = null; // an id this server never gave
    if (!response.ok) throw new Error(`stream: HTTP ${response.status}`);
    this.onStatus(true);
    this.onOpen();
    await this.read(response.body);
  }

  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let event = newEvent();
    let watchdog = setTimeout(() => this.controller.abort(), SILENCE_MS);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        clearTimeout(watchdog);
        watchdog = setTimeout(() => this.controller.abort(), SILENCE_MS);
        buffer += value;
        let end;
        while ((end = buffer.search(/[\r\n]/)) >= 0) {
          // A CR at the very end may be the first half of a CRLF: wait for more.
          if (buffer[end] === "\r" && end === buffer.length - 1) break;
          const line = buffer.slice(0, end);
          buffer = buffer.slice(end + (buffer.startsWith("\r\n", end) ? 2 : 1));
          event = this.line(line, event);
        }
      }
    } finally {
      clearTimeout(watchdog);
    }
  }

  /** One line of the event-stream format; returns the event being assembled. */
  line(line, event) {
    if (line === "") {
      if (event.id !== null) this.lastId = event.id;
      if (event.data.length > 0) this.dispatch(event);
      return newEvent();
    }
    if (line.startsWith(":")) return event; // a comment: keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") event.data.push(value);
    else if (field === "event") event.type = value;
    else if (field === "id" && !value.includes("\0")) event.id = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retryMs = Number(value);
    return event;
  }

  dispatch(event) {
    let data;
    try {
      data = JSON.parse(event.data.join("\n"));
    } catch {
      return; // not ours to understand; the stream goes on
    }
    this.onEvent(event.type, data, event.id);
  }
}

function newEvent() {
  return { type: "message", data: [], id: null };
}
