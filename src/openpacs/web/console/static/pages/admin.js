/* console pages: users (accounts, roles, tokens, passwords) and departments (codes, assignment rules). */
"use strict";
(() => {
  const { h } = OP;
  const ROLES = ["admin", "radiologist", "physician", "technologist", "viewer", "auditor"];
  const split = s => s.split(",").map(x => x.trim()).filter(Boolean);

  async function users(main) {
    const list = await OP.api("users");
    const secret = h("div");
    const showSecret = (label, value) => OP.clear(secret).appendChild(h("div.panel", { role: "status" },
      h("p", label + " (shown once): "), h("code.secret", value)));
    const uname = h("input", { name: "username", required: true, maxlength: 128 });
    const role = h("select", { name: "role" }, ROLES.map(r => h("option", { value: r, selected: r === "viewer" }, r)));
    const depts = h("input", { name: "departments", placeholder: "all" });
    const create = h("form.panel", { onsubmit: async ev => {
      ev.preventDefault();
      try {
        const r = await OP.api("users", { method: "POST", body: { username: uname.value.trim(), role: role.value, departments: depts.value.trim() ? split(depts.value) : null } });
        OP.toast(`User ${r.username} created`); await OP.route(); showSecret(`Password of ${r.username}`, r.password);
      } catch (e) { OP.toast(e.detail || e.message, "err"); }
    } }, h("h2", "New user"), h("div.row", OP.field("User name", uname), OP.field("Role", role), OP.field("Departments", depts, "comma-separated; empty: all")),
      h("button.primary", { type: "submit" }, "Create user"));
    const act = (fn) => async () => { try { await fn(); } catch (e) { OP.toast(e.detail || e.message, "err"); } };
    const columns = [
      { label: "User", render: u => h("strong", u.username) },
      { label: "Role", render: u => {
        const s = h("select", { "aria-label": "Role of " + u.username, onchange: act(async () => { await OP.api("users/" + encodeURIComponent(u.username), { method: "PATCH", body: { role: s.value } }); OP.toast(`${u.username} is now ${s.value}`); }) },
          ROLES.map(r => h("option", { value: r, selected: r === u.role }, r)));
        return s;
      } },
      { label: "Departments", render: u => u.departments ? u.departments.join(", ") : h("span.muted", "all") },
      { label: "State", render: u => u.disabled ? h("span.badge.err", "disabled") : h("span.badge.ok", "active") },
      { label: "Last login", render: u => OP.when(u.last_login_at) },
      { label: "", render: u => h("span",
        h("button", { type: "button", onclick: act(async () => { await OP.api("users/" + encodeURIComponent(u.username), { method: "PATCH", body: { disabled: !u.disabled } }); OP.route(); }) }, u.disabled ? "Enable" : "Disable"), " ",
        h("button", { type: "button", onclick: act(async () => {
          if (!(await OP.confirm("New password", `Generate a new password for ${u.username}? Their sessions end.`, "Generate"))) return;
          const r = await OP.api("users/" + encodeURIComponent(u.username) + "/password", { method: "POST", body: {} });
          showSecret(`New password of ${u.username}`, r.password);
        }) }, "Reset password"), " ",
        h("button", { type: "button", onclick: act(async () => {
          const r = await OP.api("users/" + encodeURIComponent(u.username) + "/tokens", { method: "POST", body: { name: "console" } });
          showSecret(`API token ${r.id} of ${u.username}`, r.token); await tokens(u.username);
        }) }, "New token"), " ",
        h("button", { type: "button", onclick: act(() => tokens(u.username)) }, "Tokens")) },
    ];
    const tokenBox = h("div");
    async function tokens(name) {
      const rows = await OP.api("users/" + encodeURIComponent(name) + "/tokens");
      OP.clear(tokenBox).appendChild(h("div.panel", h("h2", `API tokens of ${name}`), OP.table([
        { label: "ID", key: "id" }, { label: "Name", key: "name" }, { label: "Prefix", key: "prefix" },
        { label: "Created", render: t => OP.when(t.created_at) }, { label: "Expires", render: t => OP.when(t.expires_at) || "never" },
        { label: "", render: t => t.revoked ? h("span.badge.err", "revoked") : h("button.danger", { type: "button", onclick: act(async () => {
          await OP.api("tokens/" + t.id, { method: "DELETE" }); OP.toast(`Token ${t.id} revoked`); await tokens(name);
        }) }, "Revoke") },
      ], rows, { empty: "No tokens." })));
    }
    OP.append(main, [h("div.panel", h("h1", "Users"), OP.table(columns, list)), secret, tokenBox, create]);
  }

  async function departments(main) {
    const doc = await OP.api("departments");
    const act = (fn) => async ev => { if (ev) ev.preventDefault(); try { await fn(); } catch (e) { OP.toast(e.detail || e.message, "err"); } };
    const code = h("input", { name: "code", required: true, maxlength: 64 });
    const dname = h("input", { name: "name" });
    const rdept = h("select", { name: "department" }, doc.departments.map(d => h("option", { value: d.code }, d.code)));
    const inputs = { modality: h("input", { name: "modality", placeholder: "CT,MR" }), calling_aet: h("input", { name: "calling_aet" }),
      institution_name: h("input", { name: "institution_name" }), institutional_department_name: h("input", { name: "institutional_department_name" }) };
    const prio = h("input", { name: "priority", type: "number", value: "100" });
    OP.append(main, [
      h("div.panel", h("h1", "Departments"), OP.table([{ label: "Code", key: "code" }, { label: "Name", key: "name" }], doc.departments, { empty: "No departments yet." }),
        h("form.row", { onsubmit: act(async () => { await OP.api("departments", { method: "POST", body: { code: code.value, name: dname.value } }); OP.toast("Department added"); OP.route(); }) },
          OP.field("Code", code), OP.field("Name", dname), h("button.primary", { type: "submit" }, "Add department"))),
      h("div.panel", h("h2", "Assignment rules"), h("p.muted", "A new study goes to the department of the first matching rule (lowest priority first)."),
        OP.table([{ label: "Priority", key: "priority" }, { label: "Department", key: "department" }, { label: "Modality", key: "modality" },
          { label: "Calling AE", key: "calling_aet" }, { label: "Institution", key: "institution_name" }, { label: "Institutional dept.", key: "institutional_department_name" },
          { label: "", render: r => h("button.danger", { type: "button", onclick: act(async () => {
            if (!(await OP.confirm("Delete rule", `Delete rule ${r.id}?`, "Delete"))) return;
            await OP.api("departments/rules/" + r.id, { method: "DELETE" }); OP.route(); }) }, "Delete") }], doc.rules, { empty: "No rules." }),
        h("form", { onsubmit: act(async () => {
          const body = { department: rdept.value, priority: Number(prio.value) };
          for (const [k, el] of Object.entries(inputs)) if (el.value.trim()) body[k] = el.value.trim();
          await OP.api("departments/rules", { method: "POST", body }); OP.toast("Rule added"); OP.route();
        }) }, h("div.row", OP.field("Department", rdept), OP.field("Priority", prio), OP.field("Modality", inputs.modality), OP.field("Calling AE", inputs.calling_aet),
          OP.field("Institution", inputs.institution_name), OP.field("Institutional department", inputs.institutional_department_name)),
          h("div.actions", h("button.primary", { type: "submit" }, "Add rule"),
            h("button", { type: "button", onclick: act(async () => { const r = await OP.api("departments/reapply", { method: "POST" }); OP.toast(`${r.changed} studies re-assigned`); }) }, "Re-apply rules to all studies")))),
    ]);
  }

  OP.page({ id: "users", title: "Users", right: "admin", render: users });
  OP.page({ id: "departments", title: "Departments", right: "admin", render: departments });
})();
