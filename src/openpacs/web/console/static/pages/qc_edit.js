/* Quality-control edits (web/api/qc_edit.py) on the study page and the QC page: edit study and patient attributes,
   merge the study into another, split series off to a new or another study, merge the patient; the QC history with
   old → new values and undo. Administrators only. DOM only through OP.h. */
"use strict";
(() => {
  const { h } = OP;
  const STUDY = [["StudyDescription", "Description", "description"], ["StudyDate", "Study date", "date", "YYYYMMDD"],
    ["AccessionNumber", "Accession", "accession"], ["ReferringPhysicianName", "Referring physician", "referring_physician", "Family^Given"]];
  const PATIENT = [["PatientName", "Patient name", "name", "Family^Given"], ["PatientID", "Patient ID", "id"],
    ["PatientBirthDate", "Birth date", "birth_date", "YYYYMMDD"], ["PatientSex", "Sex", "sex", "M, F or O"]];
  const OPS = { edit: "Edit", merge: "Merge", split: "Split", move: "Move" };

  const short = uid => uid && uid.length > 26 ? h("code", { title: uid }, uid.slice(0, 8) + "…" + uid.slice(-12)) : h("code", uid || "");
  const uids = xs => { const out = []; [...new Set(xs)].forEach((u, i) => { if (i) out.push(", "); out.push(short(u)); }); return out; };
  const act = async (path, method, body, done) => {
    try { const r = await OP.api(path, { method, body }); OP.toast(done); return r; }
    catch (e) { OP.toast(e.detail || e.message, "err"); return null; }
  };

  function form(id, title, fields, values, submit) {
    const inputs = {};
    const f = h("form.search#" + id, { "aria-label": title },
      fields.map(([kw, label, key, hint]) => OP.field(label, inputs[kw] = h("input", { name: kw, value: values[key] || "", placeholder: hint || "" }))),
      h("button.primary", { type: "submit" }, "Save"));
    f.addEventListener("submit", async e => {
      e.preventDefault();
      const changed = {};
      for (const [kw, , key] of fields) if (inputs[kw].value.trim() !== (values[key] || "")) changed[kw] = inputs[kw].value.trim();
      if (!Object.keys(changed).length) { OP.toast("Nothing changed", "err"); return; }
      await submit(changed);
    });
    return h("div", h("h3", title), f);
  }

  function describe(e) {
    const n = e.new || {}, o = e.old || {};
    if (e.operation === "edit") return h("ul.diffs", Object.keys(n.values || {}).map(k => h("li", `${k}: “${(o.values || {})[k] ?? ""}” → “${n.values[k] ?? ""}”`)));
    const parts = [];
    const count = x => Object.keys(x || {}).length;
    if (count(n.studies)) parts.push(h("li", `${count(n.studies)} stud(ies) to patient ${e.new.into || ""}`));
    if (count(n.series)) parts.push(h("li", `${count(n.series)} series to study `, uids(Object.values(n.series))));
    if (count(n.instances)) parts.push(h("li", `${count(n.instances)} instance(s) to series `, uids(Object.values(n.instances))));
    const gone = o.deleted || {};
    const removed = ["studies", "series", "patients"].map(k => (gone[k] || []).length ? `${gone[k].length} ${k} removed` : "").filter(Boolean);
    if (removed.length) parts.push(h("li", removed.join(", ")));
    return h("ul.diffs", parts);
  }

  function historyTable(items, reload) {
    return OP.table([
      { label: "When", render: e => OP.when(e.at) }, { label: "Who", key: "user" },
      { label: "Operation", render: e => `${OPS[e.operation] || e.operation} ${e.level.toLowerCase()}` },
      { label: "On", render: e => short(e.uid) }, { label: "Change (old → new)", render: describe },
      { label: "", render: e => e.undone_at ? h("span.muted", `undone by ${e.undone_by || "?"} ${OP.when(e.undone_at)}`)
        : h("button.undo", { type: "button", onclick: async () => {
          if (!await OP.confirm("Undo?", `Undo the ${e.operation} of ${e.level.toLowerCase()} ${e.uid} by ${e.user}? The state before it comes back.`, "Undo")) return;
          if (await act(`qc/history/${e.id}/undo`, "POST", {}, "Undone")) reload();
        } }, "Undo") },
    ], items, { empty: "No QC change yet." });
  }

  async function historyPanel(query) {
    const box = h("div.panel#qc-history", h("h2", "QC history"), h("p.muted", "Edits, merges, splits and moves, newest first; each can be undone."));
    const page = await OP.api("qc/history", { query: { limit: 100, uid: query && query.uid } });
    box.append(historyTable(page.items, () => OP.route()));
    return box;
  }

  function studyPanel(s) {
    const uid = s.uid;
    const reload = () => OP.route();
    const box = h("div.panel#qc-edit", h("h2", "Quality control"));
    const editStudy = form("qc-study-form", "Study attributes", STUDY, s, async changed => {
      if (await act(`studies/${encodeURIComponent(uid)}`, "PATCH", changed, "Study updated")) reload();
    });
    const editPatient = form("qc-patient-form", "Patient demographics", PATIENT, s.patient, async changed => {
      if (await act(`patients/${encodeURIComponent(s.patient.id)}`, "PATCH", changed, "Patient updated")) reload();
    });
    const into = h("input", { name: "into", placeholder: "StudyInstanceUID of the surviving study" });
    const merge = h("form.search#qc-merge-form", { "aria-label": "Merge study" }, OP.field("Merge this study into", into),
      h("button.danger", { type: "submit" }, "Merge"));
    merge.addEventListener("submit", async e => {
      e.preventDefault();
      const target = into.value.trim();
      if (!target) { OP.toast("Enter the study to merge into", "err"); return; }
      if (!await OP.confirm("Merge study?", `Move all ${s.num_series} series of this study into ${target}? This study then goes (undoable from the QC history).`, "Merge")) return;
      if (await act(`studies/${encodeURIComponent(uid)}/merge`, "POST", { into: target }, "Studies merged")) OP.go("study", [target]);
    });
    const checks = s.series.map(se => h("label", h("input", { type: "checkbox", name: "split-series", value: se.uid }), ` ${se.modality || ""} #${se.number || ""} ${se.description || ""} (${se.num_instances})`));
    const splitInto = h("input", { name: "split-into", placeholder: "empty: a new study" });
    const splitDesc = h("input", { name: "split-description", placeholder: "description of the new study" });
    const split = h("form.search#qc-split-form", { "aria-label": "Split study" }, h("fieldset", h("legend", "Series to split off"), checks),
      OP.field("To study", splitInto), OP.field("New study description", splitDesc), h("button.danger", { type: "submit" }, "Split"));
    split.addEventListener("submit", async e => {
      e.preventDefault();
      const chosen = checks.map(c => c.querySelector("input")).filter(i => i.checked).map(i => i.value);
      if (!chosen.length) { OP.toast("Choose the series to split off", "err"); return; }
      const body = { series: chosen };
      if (splitInto.value.trim()) body.into = splitInto.value.trim();
      if (!body.into && splitDesc.value.trim()) body.attributes = { StudyDescription: splitDesc.value.trim() };
      const r = await act(`studies/${encodeURIComponent(uid)}/split`, "POST", body, "Series split off");
      if (r) reload();
    });
    const pInto = h("input", { name: "patient-into", placeholder: "PatientID of the surviving patient" });
    const pmerge = h("form.search#qc-patient-merge-form", { "aria-label": "Merge patient" }, OP.field(`Merge patient ${s.patient.id} into`, pInto),
      h("button.danger", { type: "submit" }, "Merge patients"));
    pmerge.addEventListener("submit", async e => {
      e.preventDefault();
      const target = pInto.value.trim();
      if (!target) return;
      if (!await OP.confirm("Merge patients?", `Move every study of patient ${s.patient.id} to patient ${target}?`, "Merge")) return;
      if (await act(`patients/${encodeURIComponent(s.patient.id)}/merge`, "POST", { into: target }, "Patients merged")) reload();
    });
    const hist = h("div", h("h3", "History of this study"));
    OP.api("qc/history", { query: { uid, limit: 50 } }).then(p => hist.append(historyTable(p.items, reload)))
      .catch(e => hist.append(h("p.err", e.detail || e.message)));
    box.append(h("div.row", editStudy, editPatient), h("div.row", h("div", h("h3", "Merge"), merge, pmerge), h("div", h("h3", "Split"), split)), hist);
    return box;
  }

  OP.qcEdit = { studyPanel, historyPanel };
})();
