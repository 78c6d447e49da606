/* console page: IOCM rejections — instances, series or studies rejected with a rejection note (received from a
   modality or made here with the study page's Reject action); Restore brings them back. Also OP.rejectControl, the
   Reject action of the study page. */
"use strict";
(() => {
  const { h } = OP;
  const REASONS = {
    "113001": "Rejected for quality reasons",
    "113037": "Rejected for patient safety reasons",
    "113038": "Incorrect modality worklist entry",
    "113039": "Data retention policy expired",
  };
  const STATES = ["all", "rejected", "restored", "purged"];

  /** The Reject action of a study (administrators): a reason, then a rejection note for the whole study. */
  OP.rejectControl = s => {
    if (!OP.can("admin")) return null;
    const sel = h("select#reject-reason", { name: "reason", "aria-label": "Rejection reason" },
      Object.entries(REASONS).map(([k, v]) => h("option", { value: k }, `${k} ${v}`)));
    return h("span.row", sel, h("button.danger#reject-study", { type: "button", onclick: async () => {
      const reason = sel.value;
      if (!await OP.confirm("Reject study?", `Reject study ${s.description || s.uid} of ${OP.pn(s.patient.name)} (${s.num_instances} instances): ${REASONS[reason]}? It disappears from queries and retrieval until restored (Rejections page).`, "Reject")) return;
      try {
        const r = await OP.api(`studies/${encodeURIComponent(s.uid)}/reject`, { method: "POST", body: { reason } });
        OP.toast(`${r.num_instances} instance(s) rejected`); OP.go("rejections");
      } catch (e) { OP.toast(e.detail || e.message, "err"); }
    } }, "Reject study"));
  };

  async function render(main, args, query) {
    const state = query.state || "all";
    const page = await OP.api("rejections", { query: { state, limit: 100, cursor: query.cursor } });
    const columns = [
      { label: "When", render: r => OP.when(r.created_at) },
      { label: "Patient", render: r => `${OP.pn(r.patient_name) || ""} (${r.patient_id || ""})` },
      { label: "Study", render: r => h("code", r.study_instance_uid) },
      { label: "Reason", render: r => `${r.reason} ${r.reason_meaning}` },
      { label: "From", render: r => `${r.source}${r.actor ? " · " + r.actor : ""}` },
      { label: "Instances", key: "num_instances" }, { label: "State", key: "state" },
      { label: "", render: r => r.state !== "rejected" ? "" : h("button.restore", { type: "button", onclick: async () => {
        try { await OP.api(`rejections/${r.id}/restore`, { method: "POST", body: {} }); OP.toast("Restored"); OP.route(); }
        catch (e) { OP.toast(e.detail || e.message, "err"); }
      } }, "Restore") },
    ];
    const sel = h("select", { name: "state", onchange: ev => OP.go("rejections", [], { state: ev.target.value }) },
      STATES.map(k => h("option", { value: k, selected: k === state }, k)));
    OP.append(main, [
      h("div.panel", h("h1", "Rejections"),
        h("p", "IOCM rejection notes (Key Object Selections titled 113001, 113037, 113038 or 113039): their instances are hidden from queries and retrieval, and purged after the configured delay unless restored."),
        h("div.row", OP.field("State", sel))),
      h("div.panel", OP.table(columns, page.items, { empty: "No rejection." }),
        page.next ? h("div.pager", h("a", { href: OP.href("rejections", [], Object.assign({}, query, { cursor: page.next })) }, "More →")) : null),
    ]);
  }
  OP.page({ id: "rejections", title: "Rejections", right: "admin", render });
})();
