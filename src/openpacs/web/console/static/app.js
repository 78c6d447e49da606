/* OpenPACS console core: DOM builder, API client, hash router, small widgets. Pages register with OP.page(). */
"use strict";
const OP = (() => {
  const pages = new Map();   // id -> {id, title, nav, right, render}
  const state = { me: null, current: null };

  /** h("tag.class#id", {attr: value, onclick: fn}, child...): children are nodes or text (always escaped). */
  function h(spec, attrs, ...children) {
    const m = /^([a-z0-9]+)?((?:[.#][\w-]+)*)$/i.exec(spec) || [null, spec, ""];
    const el = document.createElement(m[1] || "div");
    for (const part of (m[2] || "").match(/[.#][\w-]+/g) || []) {
      if (part[0] === ".") el.classList.add(part.slice(1)); else el.id = part.slice(1);
    }
    if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
      children.unshift(attrs); attrs = null;
    }
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(el.dataset, v);
      else if (k === "value") el.value = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    append(el, children);
    return el;
  }
  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }

  class ApiError extends Error {
    constructor(status, detail) { super(detail); this.status = status; this.detail = detail; }
  }

  /** api(path, {method, body, query, raw}) -> parsed JSON (or the Response with raw: true). */
  async function api(path, opts = {}) {
    const method = opts.method || "GET";
    let url = path.startsWith("/") ? path : "/api/" + path;
    if (opts.query) {
      const q = new URLSearchParams();
      for (const [k, v] of Object.entries(opts.query)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
      const s = q.toString(); if (s) url += (url.includes("?") ? "&" : "?") + s;
    }
    const headers = Object.assign({ Accept: "application/json" }, opts.headers || {});
    if (method !== "GET" && method !== "HEAD" && state.me && state.me.csrf_token) headers["X-CSRF-Token"] = state.me.csrf_token;
    let body = opts.body;
    if (body !== undefined && !(body instanceof Blob) && !(body instanceof FormData) && typeof body !== "string") {
      body = JSON.stringify(body); headers["Content-Type"] = "application/json";
    }
    const r = await fetch(url, { method, headers, body, credentials: "same-origin" });
    if (r.status === 401) { location.href = "/login?next=" + encodeURIComponent("/ui/" + location.hash); throw new ApiError(401, "sign in required"); }
    if (opts.raw) return r;
    if (r.status === 204) return null;
    const text = await r.text();
    let doc = null;
    try { doc = text ? JSON.parse(text) : null; } catch (e) { doc = null; }
    if (!r.ok) throw new ApiError(r.status, (doc && doc.detail) ? String(doc.detail) : (text || r.statusText));
    return doc;
  }

  function can(right) { return !!(state.me && state.me.rights.includes(right)); }

  function page(def) { pages.set(def.id, Object.assign({ nav: true, right: "read" }, def)); }

  function parseHash() {
    const raw = location.hash.replace(/^#\/?/, "");
    const [path, qs] = raw.split("?");
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    return { id: parts[0] || "dashboard", args: parts.slice(1), query: Object.fromEntries(new URLSearchParams(qs || "")) };
  }
  /** go("studies", ["uid"], {q: 1}): change the hash (and so the page). */
  function go(id, args = [], query = {}) {
    const qs = new URLSearchParams(Object.entries(query).filter(([, v]) => v !== "" && v !== undefined && v !== null)).toString();
    location.hash = "#/" + [id, ...args].map(encodeURIComponent).join("/") + (qs ? "?" + qs : "");
  }
  function href(id, args = [], query = {}) {
    const qs = new URLSearchParams(Object.entries(query).filter(([, v]) => v !== "" && v !== undefined && v !== null)).toString();
    return "#/" + [id, ...args].map(encodeURIComponent).join("/") + (qs ? "?" + qs : "");
  }

  function renderNav() {
    const nav = clear(document.getElementById("nav"));
    const cur = parseHash().id;
    for (const p of pages.values()) {
      if (!p.nav || (p.right && !can(p.right))) continue;
      const a = h("a", { href: "#/" + p.id, "aria-current": (p.id === cur || (p.section && p.section === cur)) ? "page" : null }, p.title);
      nav.appendChild(a);
    }
    nav.appendChild(h("a", { href: "/api/docs", target: "_blank", rel: "noopener" }, "API"));
  }

  async function route() {
    const { id, args, query } = parseHash();
    const p = pages.get(id) || pages.get("dashboard");
    const main = clear(document.getElementById("main"));
    state.current = p;
    renderNav();
    if (!p) { main.appendChild(h("p", "No page.")); return; }
    document.title = p.title + " · OpenPACS";
    if (p.right && !can(p.right)) {
      const alt = !location.hash.replace(/^#\/?/, "") && [...pages.values()].find(q => q.nav && (!q.right || can(q.right)));
      if (alt) { go(alt.id); return; }  // the default page is not for this role (an auditor): its first page instead
      main.appendChild(h("div.panel", h("h1", p.title), h("p.err", `You need the “${p.right}” right for this page.`)));
      return;
    }
    try {
      await p.render(main, args, query);
    } catch (e) {
      main.appendChild(h("p.err", { role: "alert" }, "Could not load this page: " + (e.detail || e.message)));
    }
  }

  function toast(message, kind = "ok") {
    const t = h("div.toast." + kind, message);
    document.getElementById("toasts").appendChild(t);
    setTimeout(() => t.remove(), kind === "err" ? 8000 : 4000);
  }

  /** table([{key, label, render(row)->node|text, sort: "field"}], rows, {onSort, sort, empty}) */
  function table(columns, rows, opts = {}) {
    const head = h("tr", columns.map(c => {
      if (!c.sort || !opts.onSort) return h("th", { scope: "col" }, c.label);
      const active = opts.sort && opts.sort.replace(/^-/, "") === c.sort;
      const desc = active && opts.sort.startsWith("-");
      const b = h("button.sort", { type: "button", onclick: () => opts.onSort(active && !desc ? "-" + c.sort : c.sort) },
        c.label, active ? (desc ? " ▼" : " ▲") : "");
      return h("th", { scope: "col", "aria-sort": active ? (desc ? "descending" : "ascending") : null }, b);
    }));
    const body = rows.length
      ? rows.map(r => h("tr", columns.map(c => h("td", c.render ? c.render(r) : fmt(r[c.key])))))
      : [h("tr", h("td.empty", { colspan: columns.length }, opts.empty || "Nothing here."))];
    return h("table.grid", h("thead", head), h("tbody", body));
  }

  function fmt(v) { return v === null || v === undefined ? "" : Array.isArray(v) ? v.join(", ") : String(v); }
  function bytes(n) {
    if (n === null || n === undefined) return "";
    const u = ["B", "KB", "MB", "GB", "TB", "PB"]; let i = 0; let x = Number(n);
    while (Math.abs(x) >= 1024 && i < u.length - 1) { x /= 1024; i++; }
    return (i ? x.toFixed(x < 10 ? 1 : 0) : x) + " " + u[i];
  }
  /** DICOM DA (YYYYMMDD) -> YYYY-MM-DD */
  function date(da) { return da && /^\d{8}$/.test(da) ? `${da.slice(0, 4)}-${da.slice(4, 6)}-${da.slice(6, 8)}` : (da || ""); }
  /** DICOM PN (Family^Given^Middle) -> "Family, Given Middle" */
  function pn(v) {
    if (!v) return "";
    const s = String(v).split("=")[0].split("^");
    const rest = s.slice(1, 3).filter(Boolean).join(" ");
    return rest ? `${s[0]}, ${rest}` : s[0];
  }
  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso); if (isNaN(d)) return iso;
    return d.toLocaleString(undefined, { year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  /** A confirmation dialog (native <dialog>): resolves true when confirmed. */
  function confirmDialog(title, text, okLabel = "Confirm") {
    return new Promise(resolve => {
      const ok = h("button.danger", { type: "button" }, okLabel);
      const cancel = h("button", { type: "button" }, "Cancel");
      const d = h("dialog.confirm", { "aria-labelledby": "dlg-title" }, h("h2#dlg-title", title), h("p", text), h("div.actions", cancel, ok));
      document.body.appendChild(d);
      const done = v => { d.close(); d.remove(); resolve(v); };
      ok.addEventListener("click", () => done(true));
      cancel.addEventListener("click", () => done(false));
      d.addEventListener("cancel", () => done(false));
      d.showModal(); cancel.focus();
    });
  }

  /** A labelled form field: field("Patient ID", input) */
  function field(label, control, hint) {
    const id = control.id || ("f-" + Math.random().toString(36).slice(2, 9));
    control.id = id;
    return h("div.field", h("label", { for: id }, label), control, hint ? h("small", hint) : null);
  }

  async function start() {
    try { state.me = await api("me"); } catch (e) { if (e.status !== 401) document.getElementById("main").textContent = "API unavailable: " + e.message; return; }
    if (state.me.auth_enabled && !state.me.authenticated) { location.href = "/login?next=" + encodeURIComponent("/ui/" + location.hash); return; }
    const who = document.getElementById("who");
    append(who, [h("span", state.me.username + " (" + state.me.role + ")"),
      state.me.auth_enabled ? h("form", { method: "post", action: "/logout" },
        h("input", { type: "hidden", name: "csrf_token", value: state.me.csrf_token || "" }), h("button.link", { type: "submit" }, "Sign out"))
        : h("span.badge.warn", { title: "authentication is off: loopback development mode" }, "development mode")]);
    window.addEventListener("hashchange", route);
    await route();
  }

  return { h, append, clear, api, ApiError, can, page, go, href, parseHash, route, toast, table, fmt, bytes, date, pn, when,
    confirm: confirmDialog, field, state, start };
})();
