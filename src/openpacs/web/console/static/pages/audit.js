/* console page: the audit trail — filters, newest first, CSV and PS3.15 XML export. */
"use strict";
(() => {
  const { h } = OP;
  const EVENTS = ["", "ApplicationActivity", "AuditLogUsed", "BeginTransferring", "InstancesAccessed", "InstancesTransferred", "StudyDeleted",
    "Export", "Import", "NetworkEntry", "PatientRecord", "Query", "SecurityAlert", "UserAuthentication"];
  const OUTCOMES = { "": "any", "0": "success", "4": "minor failure", "8": "serious failure", "12": "major failure" };
  const toIso = v => v ? new Date(v).toISOString() : "";

  async function render(main, args, query) {
    const f = {
      user: h("input", { name: "user", value: query.user || "" }),
      patient: h("input", { name: "patient", value: query.patient || "" }),
      study: h("input", { name: "study", value: query.study || "" }),
      event: h("select", { name: "event" }, EVENTS.map(e => h("option", { value: e, selected: e === (query.event || "") }, e || "any"))),
      outcome: h("select", { name: "outcome" }, Object.entries(OUTCOMES).map(([k, v]) => h("option", { value: k, selected: k === (query.outcome || "") }, v))),
      since: h("input", { name: "since", type: "datetime-local", value: query.since_local || "" }),
      until: h("input", { name: "until", type: "datetime-local", value: query.until_local || "" }),
    };
    const filters = { user: query.user, patient: query.patient, study: query.study, event: query.event, outcome: query.outcome,
      since: query.since, until: query.until };
    const page = await OP.api("audit", { query: Object.assign({ limit: 100, cursor: query.cursor }, filters) });
    const qs = fmt => { const q = new URLSearchParams({ format: fmt }); for (const [k, v] of Object.entries(filters)) if (v) q.set(k, v); return "/api/audit/export?" + q; };
    const outcome = e => h("span.badge." + (e.outcome === 0 ? "ok" : e.outcome === 4 ? "warn" : "err"), OUTCOMES[String(e.outcome)] || e.outcome);
    const columns = [
      { label: "Time", render: e => OP.when(e.at) }, { label: "Event", render: e => e.event + (e.event_type ? ` (${e.event_type})` : "") },
      { label: "Outcome", render: outcome }, { label: "User", key: "user" }, { label: "Role", key: "role" },
      { label: "Protocol", key: "protocol" }, { label: "Source", render: e => [e.source_address, e.source_aet].filter(Boolean).join(" / ") },
      { label: "Patient", render: e => e.patient_id ? `${e.patient_id} ${OP.pn(e.patient_name)}` : "" },
      { label: "Studies", render: e => e.study_uids.length ? h("span", { title: e.study_uids.join("\n") }, e.study_uids.length === 1 ? e.study_uids[0] : `${e.study_uids.length} studies`) : "" },
      { label: "Detail", render: e => e.detail || e.query },
    ];
    const submit = ev => {
      ev.preventDefault();
      OP.go("audit", [], { user: f.user.value.trim(), patient: f.patient.value.trim(), study: f.study.value.trim(), event: f.event.value,
        outcome: f.outcome.value, since: toIso(f.since.value), until: toIso(f.until.value), since_local: f.since.value, until_local: f.until.value });
    };
    OP.append(main, [
      h("div.panel", h("h1", "Audit trail"),
        h("form.search#audit-filters", { onsubmit: submit },
          h("div.row", OP.field("User", f.user), OP.field("Patient ID", f.patient), OP.field("Study UID", f.study), OP.field("Event", f.event),
            OP.field("Outcome", f.outcome), OP.field("From", f.since), OP.field("Until", f.until)),
          h("div.actions", h("button.primary", { type: "submit" }, "Search"), " ", h("a", { href: OP.href("audit") }, "Clear filters"), " · ",
            h("a#export-csv", { href: qs("csv"), download: "" }, "Export CSV"), " · ", h("a#export-xml", { href: qs("xml"), download: "" }, "Export XML (PS3.15)")))),
      h("div.panel", OP.table(columns, page.items, { empty: "No audit events match." }),
        page.next ? h("div.pager", h("a", { href: OP.href("audit", [], Object.assign({}, query, { cursor: page.next })) }, "Older events →")) : null),
    ]);
  }
  OP.page({ id: "audit", title: "Audit", right: "audit", render });
})();
