/* Renders /api/openapi.json: text nodes only (never innerHTML). */
"use strict";
(async () => {
  const h = (tag, attrs, ...kids) => {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v); else el.setAttribute(k, v);
    }
    for (const c of kids.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
    return el;
  };
  const doc = await (await fetch("/api/openapi.json", { credentials: "same-origin" })).json();
  document.getElementById("title").textContent = doc.info.title + " " + doc.info.version + " (OpenAPI " + doc.openapi + ")";
  document.getElementById("desc").textContent = doc.info.description || "";
  const resolve = s => {
    if (s && s.$ref) return doc.components.schemas[s.$ref.split("/").pop()] || s;
    return s;
  };
  const typeOf = s => {
    s = s || {};
    if (s.$ref) return s.$ref.split("/").pop();
    if (s.anyOf) return s.anyOf.map(typeOf).join(" | ");
    if (s.type === "array") return typeOf(s.items) + "[]";
    return s.type || "any";
  };
  const schemaTable = s => {
    s = resolve(s);
    if (!s || !s.properties) return h("p", {}, "type: " + typeOf(s));
    return h("table", {}, h("tr", {}, h("th", {}, "field"), h("th", {}, "type"), h("th", {}, "required")),
      Object.entries(s.properties).map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {}, typeOf(v)),
        h("td", {}, (s.required || []).includes(k) ? "yes" : ""))));
  };
  const byTag = new Map();
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const tag = (op.tags || ["other"])[0];
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push({ path, method: method.toUpperCase(), op });
    }
  }
  const nav = document.getElementById("tags"), main = document.getElementById("ops");
  for (const [tag, ops] of byTag) {
    nav.append(h("a", { href: "#tag-" + tag }, tag));
    main.append(h("h2", { id: "tag-" + tag }, tag));
    for (const { path, method, op } of ops) {
      const params = op.parameters || [];
      const out = h("pre", {});
      const inputs = {};
      const tryIt = method === "GET" ? h("p", {}, h("button", { type: "button", onclick: async () => {
        let url = "/api" + path.replace(/\{(\w+)\}/g, (_, n) => encodeURIComponent(inputs[n] ? inputs[n].value : ""));
        const q = new URLSearchParams();
        for (const p of params) if (p.in === "query" && inputs[p.name].value) q.set(p.name, inputs[p.name].value);
        if ([...q].length) url += "?" + q;
        const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
        out.textContent = r.status + " " + r.statusText + "\n" + (await r.text()).slice(0, 20000);
      } }, "Try it (GET " + path + ")")) : null;
      main.append(h("details", {},
        h("summary", {}, h("span", { class: "m " + method }, method), h("span", { class: "path" }, "/api" + path),
          h("span", {}, op.summary || ""), h("span", { class: "right" }, op.operationId || "")),
        h("div", { class: "body" },
          op.description ? h("p", {}, op.description) : null,
          params.length ? h("table", {}, h("tr", {}, h("th", {}, "parameter"), h("th", {}, "in"), h("th", {}, "type"), h("th", {}, "description"), h("th", {}, "value")),
            params.map(p => {
              const input = h("input", { "aria-label": p.name });
              inputs[p.name] = input;
              return h("tr", {}, h("td", {}, p.name + (p.required ? " *" : "")), h("td", {}, p.in), h("td", {}, typeOf(p.schema)),
                h("td", {}, p.description || (p.schema && p.schema.description) || ""), h("td", {}, input));
            })) : null,
          op.requestBody ? [h("h4", {}, "Request body"), schemaTable(Object.values(op.requestBody.content)[0].schema)] : null,
          h("h4", {}, "Responses"),
          h("table", {}, Object.entries(op.responses || {}).map(([code, r]) => h("tr", {}, h("td", {}, code), h("td", {}, r.description || ""),
            h("td", {}, r.content && r.content["application/json"] ? typeOf(r.content["application/json"].schema) : "")))),
          tryIt, out)));
    }
  }
  const schemas = doc.components && doc.components.schemas ? doc.components.schemas : {};
  main.append(h("h2", { id: "schemas" }, "schemas"));
  for (const [name, s] of Object.entries(schemas)) {
    main.append(h("details", {}, h("summary", {}, h("span", { class: "path" }, name)), h("div", { class: "body" }, schemaTable(s))));
  }
})();
