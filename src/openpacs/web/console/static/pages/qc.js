/* console page: reconciliation (QC) — studies with no matching order or disagreeing with their order; link a study to
   a worklist entry (it takes the order's patient and accession) or dismiss the item. */
"use strict";
(() => {
  const { h } = OP;
  const STATUSES = { open: "open", linked: "linked", dismissed: "dismissed", all: "all" };
  const diffs = d => d.length ? h("ul.diffs", d.map(x => h("li", `${x.attribute}: study “${x.study}” · order “${x.order}”`))) : "no matching order";

  async function render(main, args, query) {
    const status = query.status || "open";
    const page = await OP.api("qc", { query: { status, limit: 100, cursor: query.cursor } });
    const reload = () => OP.route();
    const act = async (path, body, done) => {
      try { await OP.api(path, { method: "POST", body }); OP.toast(done); reload(); }
      catch (e) { OP.toast(e.detail || e.message, "err"); }
    };
    const columns = [
      { label: "Received", render: i => OP.when(i.created_at) },
      { label: "Patient", render: i => `${OP.pn(i.patient_name)} (${i.patient_id || ""})` },
      { label: "Accession", key: "accession_number" }, { label: "Study date", render: i => OP.date(i.study_date) },
      { label: "Problem", render: i => diffs(i.differences) }, { label: "Status", key: "status" },
      { label: "", render: i => i.status !== "open" ? (i.resolved_by ? `by ${i.resolved_by}` : "") : h("span",
        h("input", { name: "step", type: "number", min: 1, placeholder: "worklist entry #", "aria-label": "Worklist entry for " + i.study_instance_uid,
          value: i.step_id ? String(i.step_id) : "" }), " ",
        h("button", { type: "button", onclick: ev => {
          const n = Number(ev.target.parentNode.querySelector("input").value);
          if (!n) { OP.toast("Enter the worklist entry number to link to", "err"); return; }
          act(`qc/${i.id}/link`, { step_id: n }, `Study linked to worklist entry ${n}`);
        } }, "Link"), " ",
        h("button", { type: "button", onclick: () => act(`qc/${i.id}/dismiss`, {}, "Dismissed") }, "Dismiss")) },
    ];
    const sel = h("select", { name: "status", onchange: ev => OP.go("qc", [], { status: ev.target.value }) },
      Object.entries(STATUSES).map(([k, v]) => h("option", { value: k, selected: k === status }, v)));
    OP.append(main, [
      h("div.panel", h("h1", "Reconciliation"),
        h("p", "Studies whose patient disagrees with their order (by accession number, else patient ID and date), or with no order. ",
          h("a", { href: OP.href("worklist", [], { status: "all" }) }, "Worklist entries"), " have the numbers to link to."),
        h("div.row", OP.field("Status", sel))),
      h("div.panel", OP.table(columns, page.items, { empty: "Nothing to reconcile." }),
        page.next ? h("div.pager", h("a", { href: OP.href("qc", [], Object.assign({}, query, { cursor: page.next })) }, "More →")) : null),
    ]);
    if (OP.qcEdit) main.append(await OP.qcEdit.historyPanel(query));  // pages/qc_edit.js: edits, merges, splits
  }
  OP.page({ id: "qc", title: "QC", right: "admin", render });
})();
