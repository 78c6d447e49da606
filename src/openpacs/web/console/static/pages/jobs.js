/* console page: the job queue (routing, prefetch, ... once they land). */
"use strict";
(() => {
  const { h } = OP;
  async function render(main, args, query) {
    const state = h("select", { name: "state" }, ["", "pending", "running", "done", "failed", "cancelled"].map(s => h("option", { value: s, selected: s === (query.state || "") }, s || "any")));
    const kind = h("input", { name: "kind", value: query.kind || "" });
    const page = await OP.api("jobs", { query: { state: query.state, kind: query.kind, cursor: query.cursor, limit: 50 } });
    const columns = [
      { label: "ID", key: "id" }, { label: "Kind", key: "kind" },
      { label: "State", render: j => h("span.badge." + (j.state === "failed" ? "err" : j.state === "done" ? "ok" : "warn"), j.state) },
      { label: "Progress", render: j => Math.round((j.progress || 0) * 100) + " %" },
      { label: "Owner", key: "owner" }, { label: "Created", render: j => OP.when(j.created_at) },
      { label: "Updated", render: j => OP.when(j.updated_at) }, { label: "Error", key: "error" },
    ];
    OP.append(main, [
      h("div.panel", h("h1", "Jobs"),
        h("form.search", { onsubmit: ev => { ev.preventDefault(); OP.go("jobs", [], { state: state.value, kind: kind.value.trim() }); } },
          OP.field("State", state), OP.field("Kind", kind), h("button.primary", { type: "submit" }, "Filter"))),
      h("div.panel", OP.table(columns, page.items, { empty: "No jobs. Background work (routing, prefetch, retention) will appear here." }),
        page.next ? h("div.pager", h("a", { href: OP.href("jobs", [], { state: query.state, kind: query.kind, cursor: page.next }) }, "Older jobs →")) : null),
    ]);
  }
  OP.page({ id: "jobs", title: "Jobs", right: "read", render });
})();
