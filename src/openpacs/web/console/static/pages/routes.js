/* console page: auto-routing rules — list, add/edit/remove (TOML rules read-only), router status, dry run. */
"use strict";
(() => {
  const { h } = OP;
  const OPS = ["equals", "wildcard", "regex", "range", "in"];
  const ATTRS = ["Modality", "CallingAETitle", "CalledAETitle", "SOPClassUID", "Department", "InstitutionName",
    "StationName", "BodyPartExamined", "StudyDescription", "SeriesDescription", "Manufacturer", "AccessionNumber", "StudyDate"];

  function describe(c) {
    const v = Array.isArray(c.value) ? (c.op === "range" ? c.value.join("–") : c.value.join(" | ")) : c.value;
    return `${c.negate ? "not " : ""}${c.attribute} ${c.op === "equals" ? "=" : c.op} ${v}`;
  }

  function conditionRow(c, onRemove) {
    const list = "route-attrs";
    const attr = h("input", { name: "attribute", list, required: true, value: c.attribute || "Modality", "aria-label": "Attribute" });
    const op = h("select", { name: "op", "aria-label": "Operator" }, OPS.map(o => h("option", { value: o, selected: o === (c.op || "equals") }, o)));
    const val = Array.isArray(c.value) ? (c.op === "range" ? c.value.join("-") : c.value.join("\\")) : (c.value || "");
    const value = h("input", { name: "value", required: true, value: val, "aria-label": "Value", placeholder: "CT · CT* · ^St.? Mary · 20240101-20241231 · CT\\MR" });
    const negate = h("input", { type: "checkbox", name: "negate", checked: !!c.negate });
    const row = h("div.row.cond", attr, op, value, h("label", negate, " not"),
      h("button", { type: "button", "aria-label": "Remove condition", onclick: () => { row.remove(); onRemove && onRemove(); } }, "×"));
    row.read = () => {
      const o = op.value; let v = value.value.trim();
      if (o === "in") v = v.split("\\").map(s => s.trim()).filter(Boolean);
      return Object.assign({ attribute: attr.value.trim(), op: o, value: v }, negate.checked ? { negate: true } : {});
    };
    return row;
  }

  function ruleForm(rule, destinations, onDone) {
    const v = rule || { name: "", enabled: true, destinations: [], conditions: [{ attribute: "Modality", op: "equals", value: "CT" }],
      match: "all", trigger: "instance", stable_seconds: 60, schedule: [], days: [], transfer_syntax: "", priority: 0, description: "" };
    const name = h("input", { name: "name", required: true, maxlength: 64, value: v.name, disabled: !!rule });
    const dests = destinations.map(d => h("input", { type: "checkbox", name: "destination", value: d, checked: v.destinations.includes(d) }));
    const conds = h("div.conds");
    const addCond = c => conds.appendChild(conditionRow(c));
    v.conditions.forEach(addCond);
    const match = h("select", { name: "match" }, ["all", "any"].map(m => h("option", { value: m, selected: m === v.match }, m === "all" ? "all conditions" : "any condition")));
    const trigger = h("select", { name: "trigger" },
      h("option", { value: "instance", selected: v.trigger === "instance" }, "each instance as it arrives"),
      h("option", { value: "stable", selected: v.trigger === "stable" }, "the study, once stable"));
    const stable = h("input", { name: "stable_seconds", type: "number", min: 0, max: 604800, value: String(v.stable_seconds) });
    const schedule = h("input", { name: "schedule", value: v.schedule.join(" "), placeholder: "always · 22:00-06:00" });
    const days = h("input", { name: "days", value: v.days.join(" "), placeholder: "every day · sat sun" });
    const ts = h("input", { name: "transfer_syntax", value: v.transfer_syntax, placeholder: "as stored" });
    const enabled = h("input", { type: "checkbox", name: "enabled", checked: v.enabled });
    const commit = h("input", { type: "checkbox", name: "commit", checked: !!v.commit });
    const desc = h("input", { name: "description", value: v.description || "" });
    const err = h("p.err", { role: "alert" });
    const form = h("form.panel#route-form", {
      onsubmit: async ev => {
        ev.preventDefault();
        const body = {
          destinations: dests.filter(b => b.checked).map(b => b.value),
          conditions: [...conds.querySelectorAll(".cond")].map(r => r.read()),
          match: match.value, trigger: trigger.value, stable_seconds: Number(stable.value || 0),
          schedule: schedule.value.trim(), days: days.value.trim(), transfer_syntax: ts.value.trim(),
          enabled: enabled.checked, commit: commit.checked, description: desc.value,
        };
        try {
          if (rule) await OP.api("routes/" + encodeURIComponent(rule.name), { method: "PUT", body });
          else await OP.api("routes", { method: "POST", body: Object.assign({ name: name.value.trim() }, body) });
          OP.toast(rule ? `Rule ${rule.name} saved` : `Rule ${name.value.trim()} added`);
          onDone();
        } catch (e) { err.textContent = e.detail || e.message; }
      },
    },
      h("h2", rule ? `Edit rule ${rule.name}` : "Add a routing rule"),
      h("datalist#route-attrs", ATTRS.map(a => h("option", { value: a }))),
      h("div.row", OP.field("Name", name), OP.field("Match", match), h("label", enabled, " enabled")),
      h("fieldset", h("legend", "Conditions (none: every instance)"), conds,
        h("button", { type: "button", onclick: () => addCond({ attribute: "", op: "equals", value: "" }) }, "+ condition")),
      h("fieldset", h("legend", "Destinations"), dests.length ? dests.map(b => h("label", b, " " + b.value + " ")) : h("span.muted", "No nodes yet: add one under Nodes.")),
      h("div.row", OP.field("Send", trigger), OP.field("Stable after (s)", stable), OP.field("Schedule", schedule, "time windows, local time"),
        OP.field("Days", days), OP.field("Transfer syntax", ts, "UID, empty = as stored")),
      h("div.row", OP.field("Description", desc), h("label", { title: "DICOM destinations: the job is done only once the peer has committed every instance" }, commit, " ask for storage commitment")),
      err,
      h("div.actions", h("button.primary", { type: "submit" }, rule ? "Save" : "Add rule"), h("button", { type: "button", onclick: onDone }, "Cancel")));
    return form;
  }

  function prefetchForm(rule, archives, onDone) {
    const v = rule || { name: "", enabled: true, sources: [], on: ["study"], conditions: [{ attribute: "Modality", op: "equals", value: "CT" }],
      match: "all", prior_modalities: "same", same_body_part: false, max_priors: 3, max_age_days: 1825, method: "", description: "" };
    const name = h("input", { name: "name", required: true, maxlength: 64, value: v.name, disabled: !!rule });
    const srcs = archives.map(d => h("input", { type: "checkbox", name: "source", value: d, checked: v.sources.includes(d) }));
    const onStudy = h("input", { type: "checkbox", name: "on-study", checked: v.on.includes("study") });
    const onOrder = h("input", { type: "checkbox", name: "on-order", checked: v.on.includes("order") });
    const conds = h("div.conds");
    v.conditions.forEach(c => conds.appendChild(conditionRow(c)));
    const mods = h("input", { name: "prior_modalities", value: Array.isArray(v.prior_modalities) ? v.prior_modalities.join(" ") : v.prior_modalities, placeholder: "same · CT MR · empty = any" });
    const maxPriors = h("input", { name: "max_priors", type: "number", min: 1, max: 50, value: String(v.max_priors) });
    const maxAge = h("input", { name: "max_age_days", type: "number", min: 0, value: String(v.max_age_days) });
    const body = h("input", { type: "checkbox", name: "same_body_part", checked: v.same_body_part });
    const enabled = h("input", { type: "checkbox", name: "enabled", checked: v.enabled });
    const err = h("p.err", { role: "alert" });
    return h("form.panel#prefetch-form", {
      onsubmit: async ev => {
        ev.preventDefault();
        const m = mods.value.trim();
        const payload = { kind: "prefetch", sources: srcs.filter(b => b.checked).map(b => b.value),
          on: [onStudy.checked ? "study" : null, onOrder.checked ? "order" : null].filter(Boolean),
          conditions: [...conds.querySelectorAll(".cond")].map(r => r.read()), match: "all",
          prior_modalities: m === "same" ? "same" : m.split(/[\s,]+/).filter(Boolean), same_body_part: body.checked,
          max_priors: Number(maxPriors.value || 3), max_age_days: Number(maxAge.value || 0), enabled: enabled.checked };
        try {
          if (rule) await OP.api("routes/" + encodeURIComponent(rule.name), { method: "PUT", body: payload });
          else await OP.api("routes", { method: "POST", body: Object.assign({ name: name.value.trim() }, payload) });
          OP.toast(rule ? `Rule ${rule.name} saved` : `Prefetch rule ${name.value.trim()} added`);
          onDone();
        } catch (e) { err.textContent = e.detail || e.message; }
      },
    },
      h("h2", rule ? `Edit prefetch rule ${rule.name}` : "Add a prefetch rule"),
      h("p.muted", "When a study arrives or an order is placed, fetch the patient's prior studies from other archives."),
      h("div.row", OP.field("Name", name), h("label", enabled, " enabled"), h("label", onStudy, " when a study arrives"), h("label", onOrder, " when an order is placed")),
      h("fieldset", h("legend", "For (none: everything)"), conds,
        h("button", { type: "button", onclick: () => conds.appendChild(conditionRow({ attribute: "", op: "equals", value: "" })) }, "+ condition")),
      h("fieldset", h("legend", "Fetch from"), srcs.length ? srcs.map(b => h("label", b, " " + b.value + " ")) : h("span.muted", "No archives yet: add one under Nodes.")),
      h("div.row", OP.field("Prior modalities", mods), OP.field("How many (newest)", maxPriors), OP.field("At most (days old)", maxAge, "0 = any age"),
        h("label", body, " same body part")),
      err,
      h("div.actions", h("button.primary", { type: "submit" }, rule ? "Save" : "Add prefetch rule"), h("button", { type: "button", onclick: onDone }, "Cancel")));
  }

  function dryRunPanel() {
    const uid = h("input", { name: "study", placeholder: "Study Instance UID", pattern: "[0-9.]+", required: true, size: 60, "aria-label": "Study Instance UID" });
    const out = h("div#dry-run-result");
    const form = h("form.row", {
      onsubmit: async ev => {
        ev.preventDefault(); OP.clear(out);
        try {
          const r = await OP.api("routes/dry-run", { query: { study: uid.value.trim() } });
          out.appendChild(OP.table([
            { label: "Rule", key: "rule" },
            { label: "Would send", render: x => x.would_send ? h("span.badge.ok", "yes") : h("span.badge", x.enabled ? "no" : "rule off") },
            { label: "Instances", render: x => `${x.instances} of ${x.of}` },
            { label: "To", render: x => x.destinations.join(", ") },
            { label: "When", render: x => (x.trigger === "stable" ? "once stable" : "at once") + (x.open_now ? "" : ` (window opens ${OP.when(x.next_window)})`) },
          ], r.results, { empty: "No rules." }));
        } catch (e) { out.appendChild(h("p.err", e.detail || e.message)); }
      },
    }, uid, h("button", { type: "submit" }, "Dry run"));
    return h("div.panel", h("h2", "Dry run"), h("p.muted", "Which rules a stored study would trigger, and to where. Nothing is sent."), form, out);
  }

  async function render(main) {
    const data = await OP.api("routes");
    const admin = OP.can("admin");
    const formBox = h("div");
    const reload = () => OP.route();
    const c = data.cursor;
    const columns = [
      { label: "Rule", render: r => h("span", h("strong", r.name), r.editable ? null : h("span.badge.warn", { title: "configured in the TOML file: read-only here" }, " TOML"),
        r.description ? h("div.muted", r.description) : null) },
      { label: "State", render: r => r.enabled ? h("span.badge.ok", "on") : h("span.badge", "off") },
      { label: "When", render: r => r.conditions.length ? h("span", r.conditions.map(describe).join(r.match === "all" ? " and " : " or ")) : h("span.muted", "every instance") },
      { label: "To", render: r => r.kind === "prefetch" ? h("span", h("span.badge", "prefetch"), " from " + r.sources.join(", ")) : r.destinations.join(", ") },
      { label: "Send", render: r => r.kind === "prefetch"
        ? `on ${r.on.join(" and ")}: newest ${r.max_priors} prior(s), ${Array.isArray(r.prior_modalities) ? (r.prior_modalities.join(" ") || "any modality") : "same modality"}`
          + (r.max_age_days ? `, ≤ ${r.max_age_days} days` : "") + (r.same_body_part ? ", same body part" : "")
        : (r.trigger === "stable" ? `study, stable ${r.stable_seconds} s` : "each instance")
        + (r.schedule.length ? ` · ${r.schedule.join(", ")}` : "") + (r.days.length ? ` (${r.days.join(" ")})` : "")
        + (r.transfer_syntax ? ` · ${r.transfer_syntax}` : "") + (r.commit ? " · commitment" : "") },
      { label: "", render: r => (!admin || !r.editable) ? "" : h("span",
        h("button", { type: "button", "aria-label": (r.enabled ? "Disable " : "Enable ") + r.name, onclick: async () => {
          try { await OP.api("routes/" + encodeURIComponent(r.name), { method: "PUT", body: { enabled: !r.enabled } }); reload(); }
          catch (e) { OP.toast(e.detail || e.message, "err"); }
        } }, r.enabled ? "Disable" : "Enable"), " ",
        h("button", { type: "button", "aria-label": "Edit " + r.name, onclick: () => { OP.clear(formBox).appendChild(r.kind === "prefetch" ? prefetchForm(r, data.destinations, reload) : ruleForm(r, data.destinations, reload)); } }, "Edit"), " ",
        h("button.danger", { type: "button", "aria-label": "Remove " + r.name, onclick: async () => {
          if (!(await OP.confirm("Remove rule", `Remove the routing rule ${r.name}?`, "Remove"))) return;
          try { await OP.api("routes/" + encodeURIComponent(r.name), { method: "DELETE" }); OP.toast(`Rule ${r.name} removed`); reload(); }
          catch (e) { OP.toast(e.detail || e.message, "err"); }
        } }, "Remove")) },
    ];
    OP.append(main, [
      h("div.panel", h("h1", "Routing"),
        h("p.muted", "Rules forward what arrives to other nodes, from the change feed: they never slow down or fail a store. " +
          "Each match becomes a send job (see Jobs), retried until the destination has it."),
        h("p#router-status", c.seq === null ? "Router not started yet." :
          (c.behind > 0 ? h("span.badge.warn", `${c.behind} change(s) to route`) : h("span.badge.ok", "up to date")),
          c.updated_at ? ` · last step ${OP.when(c.updated_at)}` : "",
          data.waiting.length ? ` · ${data.waiting.length} stud(ies) waiting to be stable` : ""),
        admin ? h("div.actions", h("button.primary#add-rule", { type: "button", onclick: () => { OP.clear(formBox).appendChild(ruleForm(null, data.destinations, reload)); } }, "Add rule"),
          h("button#add-prefetch", { type: "button", onclick: () => { OP.clear(formBox).appendChild(prefetchForm(null, data.destinations, reload)); } }, "Add prefetch rule")) : null),
      formBox,
      h("div.panel", OP.table(columns, data.rules, { empty: "No routing rules yet." })),
      data.waiting.length ? h("div.panel", h("h2", "Waiting to be stable"), OP.table([
        { label: "Rule", key: "rule" }, { label: "Study", key: "study_instance_uid" },
        { label: "Instances", key: "instances" }, { label: "Last arrival", render: w => OP.when(w.last_at) },
      ], data.waiting)) : null,
      dryRunPanel(),
    ]);
  }

  OP.page({ id: "routes", title: "Routing", right: "read", render });
})();
