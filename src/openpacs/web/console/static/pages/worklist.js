/* console page: the Modality Worklist — scheduled procedure steps (from the RIS's orders or made here), filters,
   a form to schedule one by hand when there is no RIS, cancel. */
"use strict";
(() => {
  const { h } = OP;
  const STATUSES = { active: "on the worklist", all: "any", SCHEDULED: "scheduled", "IN PROGRESS": "in progress",
    COMPLETED: "completed", DISCONTINUED: "discontinued", CANCELLED: "cancelled" };
  const undash = v => (v || "").replace(/-/g, "");
  const untime = v => (v || "").replace(/:/g, "");
  const time = t => t && t.length >= 4 ? `${t.slice(0, 2)}:${t.slice(2, 4)}` : (t || "");
  const badge = s => h("span.badge." + (s === "SCHEDULED" ? "ok" : s === "IN PROGRESS" ? "warn" : s === "COMPLETED" ? "ok" : "err"), s);

  function entryForm(onDone) {
    const c = {
      PatientID: h("input", { name: "PatientID", required: true, maxlength: 64 }),
      PatientName: h("input", { name: "PatientName", maxlength: 320, placeholder: "Family^Given" }),
      PatientBirthDate: h("input", { name: "PatientBirthDate", type: "date" }),
      PatientSex: h("select", { name: "PatientSex" }, ["", "F", "M", "O"].map(s => h("option", { value: s }, s || "—"))),
      AccessionNumber: h("input", { name: "AccessionNumber", required: true, maxlength: 16 }),
      Modality: h("input", { name: "Modality", required: true, maxlength: 16, placeholder: "CT" }),
      ScheduledStationAETitle: h("input", { name: "ScheduledStationAETitle", maxlength: 16 }),
      ScheduledProcedureStepStartDate: h("input", { name: "ScheduledProcedureStepStartDate", type: "date", required: true }),
      ScheduledProcedureStepStartTime: h("input", { name: "ScheduledProcedureStepStartTime", type: "time" }),
      RequestedProcedureDescription: h("input", { name: "RequestedProcedureDescription", maxlength: 64 }),
      ReferringPhysicianName: h("input", { name: "ReferringPhysicianName", maxlength: 320, placeholder: "Family^Given" }),
    };
    const err = h("p.err", { role: "alert" });
    const form = h("form.panel#worklist-form", {
      onsubmit: async ev => {
        ev.preventDefault();
        const body = {};
        for (const [k, el] of Object.entries(c)) {
          let v = el.value.trim();
          if (k.endsWith("Date")) v = undash(v);
          if (k.endsWith("Time")) v = untime(v);
          if (k === "Modality") v = v.toUpperCase();
          if (v) body[k] = v;
        }
        try {
          const e = await OP.api("worklist", { method: "POST", body });
          OP.toast(`Scheduled ${e.accession_number} (${e.modality}) for ${OP.date(e.scheduled_procedure_step_start_date)}`);
          onDone();
        } catch (e) { err.textContent = e.detail || e.message; }
      },
    },
      h("h2", "Schedule a procedure"),
      h("div.row", OP.field("Patient ID", c.PatientID), OP.field("Patient name", c.PatientName), OP.field("Birth date", c.PatientBirthDate),
        OP.field("Sex", c.PatientSex)),
      h("div.row", OP.field("Accession number", c.AccessionNumber), OP.field("Modality", c.Modality),
        OP.field("Station AE title", c.ScheduledStationAETitle, "the modality that will pull it"),
        OP.field("Date", c.ScheduledProcedureStepStartDate), OP.field("Time", c.ScheduledProcedureStepStartTime)),
      h("div.row", OP.field("Procedure", c.RequestedProcedureDescription), OP.field("Referring physician", c.ReferringPhysicianName)),
      err,
      h("div.actions", h("button.primary", { type: "submit" }, "Schedule"), h("button", { type: "button", onclick: onDone }, "Cancel")));
    return form;
  }

  async function render(main, args, query) {
    const f = {
      status: h("select", { name: "status" }, Object.entries(STATUSES).map(([k, v]) => h("option", { value: k, selected: k === (query.status || "active") }, v))),
      modality: h("input", { name: "modality", value: query.modality || "", maxlength: 16 }),
      station: h("input", { name: "station", value: query.station || "", maxlength: 16 }),
      date_from: h("input", { name: "date_from", type: "date", value: OP.date(query.date_from || "") }),
      date_to: h("input", { name: "date_to", type: "date", value: OP.date(query.date_to || "") }),
      patient_id: h("input", { name: "patient_id", value: query.patient_id || "" }),
      accession: h("input", { name: "accession", value: query.accession || "" }),
    };
    const filters = { status: query.status || "active", modality: query.modality, station: query.station, date_from: query.date_from,
      date_to: query.date_to, patient_id: query.patient_id, accession: query.accession };
    const page = await OP.api("worklist", { query: Object.assign({ limit: 100, cursor: query.cursor }, filters) });
    const writer = OP.can("store");
    const formBox = h("div");
    const reload = () => OP.route();
    const columns = [
      { label: "#", key: "id" },
      { label: "Date", render: e => `${OP.date(e.scheduled_procedure_step_start_date)} ${time(e.scheduled_procedure_step_start_time)}` },
      { label: "Status", render: e => badge(e.status) },
      { label: "Patient", render: e => `${OP.pn(e.patient_name)} (${e.patient_id})` },
      { label: "Accession", key: "accession_number" }, { label: "Modality", key: "modality" },
      { label: "Station", key: "scheduled_station_ae_title" },
      { label: "Procedure", render: e => e.requested_procedure_description || e.scheduled_procedure_step_description || "" },
      { label: "Step ID", key: "scheduled_procedure_step_id" }, { label: "Source", key: "source" },
      { label: "", render: e => writer && (e.status === "SCHEDULED" || e.status === "IN PROGRESS") ? h("button", {
        type: "button", "aria-label": "Cancel " + e.accession_number,
        onclick: async () => {
          if (!confirm(`Cancel ${e.accession_number}? It leaves the worklist.`)) return;
          try { await OP.api("worklist/" + e.id, { method: "DELETE" }); OP.toast(`${e.accession_number} cancelled`); reload(); }
          catch (x) { OP.toast(x.detail || x.message, "err"); }
        } }, "Cancel") : "" },
    ];
    const submit = ev => {
      ev.preventDefault();
      OP.go("worklist", [], { status: f.status.value, modality: f.modality.value.trim().toUpperCase(), station: f.station.value.trim(),
        date_from: undash(f.date_from.value), date_to: undash(f.date_to.value), patient_id: f.patient_id.value.trim(), accession: f.accession.value.trim() });
    };
    OP.append(main, [
      h("div.panel", h("h1", "Worklist"),
        writer ? h("p", h("button.primary#add-entry", { type: "button", onclick: () => { OP.clear(formBox).appendChild(entryForm(reload)); } }, "Schedule a procedure")) : null,
        h("form.search#worklist-filters", { onsubmit: submit },
          h("div.row", OP.field("Status", f.status), OP.field("Modality", f.modality), OP.field("Station AE", f.station),
            OP.field("From", f.date_from), OP.field("Until", f.date_to), OP.field("Patient ID", f.patient_id), OP.field("Accession", f.accession)),
          h("div.actions", h("button.primary", { type: "submit" }, "Search"), " ", h("a", { href: OP.href("worklist") }, "Clear filters")))),
      formBox,
      h("div.panel", OP.table(columns, page.items, { empty: "No worklist entries match." }),
        page.next ? h("div.pager", h("a", { href: OP.href("worklist", [], Object.assign({}, query, { cursor: page.next })) }, "More →")) : null),
    ]);
  }
  OP.page({ id: "worklist", title: "Worklist", right: "read", render });
})();
