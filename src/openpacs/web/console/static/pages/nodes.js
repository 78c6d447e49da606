/* console page: remote DICOM nodes — list with activity, C-ECHO, add/edit/remove (TOML nodes read-only). */
"use strict";
(() => {
  const { h } = OP;
  const OPS = ["echo", "store", "find", "move", "get", "worklist", "mpps", "commit"];
  const KINDS = ["modality", "workstation", "archive", "other"];

  function nodeForm(node, onDone) {
    const v = node || { name: "", aet: "", host: "", port: 104, kind: "modality", allow: ["echo", "store", "find", "move", "get"], tls: false, description: "" };
    const name = h("input", { name: "name", required: true, maxlength: 64, value: v.name });
    const aet = h("input", { name: "aet", required: true, maxlength: 16, value: v.aet });
    const host = h("input", { name: "host", required: true, value: v.host });
    const port = h("input", { name: "port", type: "number", min: 1, max: 65535, required: true, value: String(v.port) });
    const kind = h("select", { name: "kind" }, KINDS.map(k => h("option", { value: k, selected: k === v.kind }, k)));
    const boxes = OPS.map(op => h("input", { type: "checkbox", name: "allow", value: op, checked: v.allow.includes(op) }));
    const tls = h("input", { type: "checkbox", name: "tls", checked: v.tls });
    const desc = h("input", { name: "description", value: v.description || "" });
    const err = h("p.err", { role: "alert" });
    const form = h("form.panel", {
      onsubmit: async ev => {
        ev.preventDefault();
        const body = { name: name.value.trim(), aet: aet.value.trim(), host: host.value.trim(), port: Number(port.value), kind: kind.value,
          allow: boxes.filter(b => b.checked).map(b => b.value), tls: tls.checked, description: desc.value };
        try {
          if (node) await OP.api("nodes/" + encodeURIComponent(node.name), { method: "PUT", body });
          else await OP.api("nodes", { method: "POST", body });
          OP.toast(node ? `Node ${body.name} saved` : `Node ${body.name} added`);
          onDone();
        } catch (e) { err.textContent = e.detail || e.message; }
      },
    },
      h("h2", node ? `Edit ${node.name}` : "Add a node"),
      h("div.row", OP.field("Name", name), OP.field("AE title", aet, "≤ 16 characters"), OP.field("Host", host), OP.field("Port", port), OP.field("Kind", kind)),
      h("fieldset", h("legend", "Allowed operations"), boxes.map(b => h("label", b, " " + b.value + " "))),
      h("div.row", h("label", tls, " DICOM TLS"), OP.field("Description", desc)),
      err,
      h("div.actions", h("button.primary", { type: "submit" }, node ? "Save" : "Add node"), h("button", { type: "button", onclick: onDone }, "Cancel")));
    return form;
  }

  async function render(main) {
    const nodes = await OP.api("nodes");
    const formBox = h("div");
    const admin = OP.can("admin");
    const reload = () => OP.route();
    const echo = async (n, cell, btn) => {
      btn.disabled = true; OP.clear(cell).appendChild(h("span.muted", "echoing…"));
      try {
        const r = await OP.api("nodes/" + encodeURIComponent(n.name) + "/echo", { method: "POST" });
        OP.clear(cell).appendChild(r.ok
          ? h("span.badge.ok", { "data-echo": "ok" }, `OK · ${r.ms.toFixed(1)} ms`)
          : h("span.badge.err", { "data-echo": "failed", title: r.detail }, "Failed: " + r.detail));
      } catch (e) { OP.clear(cell).appendChild(h("span.badge.err", { "data-echo": "failed" }, e.detail || e.message)); }
      btn.disabled = false;
    };
    const columns = [
      { label: "Name", render: n => h("span", h("strong", n.name), n.editable ? null : h("span.badge.warn", { title: "configured in the TOML file: read-only here" }, " TOML")) },
      { label: "Kind", key: "kind" },
      { label: "AE title", key: "aet" },
      { label: "Address", render: n => `${n.host}:${n.port}` + (n.tls ? " (TLS)" : "") },
      { label: "Allow", render: n => n.allow.join(", ") },
      { label: "Last connected", render: n => n.activity.last_connected_at ? OP.when(n.activity.last_connected_at) + (n.activity.last_address ? ` from ${n.activity.last_address}` : "") : h("span.muted", "never") },
      { label: "Received", render: n => `${n.activity.instances_received || 0} inst · ${OP.bytes(n.activity.bytes_received || 0)}` },
      { label: "Sent", render: n => `${n.activity.instances_sent || 0} inst · ${OP.bytes(n.activity.bytes_sent || 0)}` },
      { label: "C-ECHO", render: n => {
        const cell = h("span.echo-result", n.activity.last_echo_at
          ? h("span.badge." + (n.activity.last_echo_ok ? "ok" : "err"), { title: "last echo " + OP.when(n.activity.last_echo_at) },
            n.activity.last_echo_ok ? `OK · ${Number(n.activity.last_echo_ms).toFixed(1)} ms` : "Failed") : "");
        if (!admin) return cell;
        const btn = h("button", { type: "button", "aria-label": "Echo " + n.name });
        btn.textContent = "Echo";
        btn.addEventListener("click", () => echo(n, cell, btn));
        return h("span", btn, " ", cell);
      } },
      { label: "", render: n => (!admin || !n.editable) ? "" : h("span",
        h("button", { type: "button", "aria-label": "Edit " + n.name, onclick: () => { OP.clear(formBox).appendChild(nodeForm(n, reload)); } }, "Edit"), " ",
        h("button.danger", { type: "button", "aria-label": "Remove " + n.name, onclick: async () => {
          if (!(await OP.confirm("Remove node", `Remove ${n.name} (${n.aet} at ${n.host}:${n.port})?`, "Remove"))) return;
          try { await OP.api("nodes/" + encodeURIComponent(n.name), { method: "DELETE" }); OP.toast(`Node ${n.name} removed`); reload(); }
          catch (e) { OP.toast(e.detail || e.message, "err"); }
        } }, "Remove")) },
    ];
    OP.append(main, [
      h("div.panel", h("h1", "Remote nodes"),
        h("p.muted", "Modalities, workstations and archives. Nodes from the configuration file are read-only; changes here apply without a restart."),
        admin ? h("button.primary#add-node", { type: "button", onclick: () => { OP.clear(formBox).appendChild(nodeForm(null, reload)); } }, "Add node") : null),
      formBox,
      h("div.panel", OP.table(columns, nodes, { empty: "No remote nodes yet." })),
    ]);
  }

  OP.page({ id: "nodes", title: "Nodes", right: "read", render });
})();
