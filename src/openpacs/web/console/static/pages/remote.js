/* console page: query a remote archive (C-FIND or QIDO-RS) and retrieve studies into this archive (C-MOVE, C-GET or
   WADO-RS jobs). Results are DICOM JSON from /api/nodes/{name}/studies; every value goes in as text. */
"use strict";
(() => {
  const { h } = OP;
  const val = (j, tag) => { const e = j[tag]; return e && e.Value && e.Value.length ? e.Value[0] : ""; };
  const vals = (j, tag) => { const e = j[tag]; return e && e.Value ? e.Value : []; };
  const pnOf = v => (v && typeof v === "object") ? (v.Alphabetic || "") : (v || "");
  const dicomDate = s => (s || "").replace(/-/g, "");

  function jobBadge(job) {
    const kind = job.state === "failed" ? "err" : job.state === "done" ? "ok" : "warn";
    const text = job.state === "done" || job.state === "running" || job.total
      ? `${job.state} · ${job.done}/${job.total}` : job.state;
    return h("span", h("span.badge." + kind, { "data-job-state": job.state, title: job.error || "" }, text), " ",
      h("a", { href: OP.href("jobs", [], { kind: "retrieve" }) }, `job ${job.id}`),
      job.error && job.state !== "done" ? h("small.err", " " + job.error) : null);
  }

  async function follow(job, cell) {
    for (let i = 0; i < 600; i++) {
      OP.clear(cell).appendChild(jobBadge(job));
      if (["done", "failed", "cancelled"].includes(job.state)) return;
      await new Promise(r => setTimeout(r, 1000));
      try { job = await OP.api("jobs/" + job.id); } catch (e) { return; }
    }
  }

  async function render(main, args, query) {
    const archives = await OP.api("remote-archives");
    const admin = OP.can("admin");
    const node = h("select", { name: "node" }, archives.map(a => h("option", { value: a.name, selected: a.name === query.node },
      `${a.name} (${a.protocol === "dicomweb" ? "DICOMweb" : "DICOM"} · ${a.address})`)));
    const pid = h("input", { name: "PatientID", value: query.PatientID || "" });
    const pname = h("input", { name: "PatientName", value: query.PatientName || "", placeholder: "DOE^J*" });
    const from = h("input", { name: "from", type: "date", value: query.from || "" });
    const to = h("input", { name: "to", type: "date", value: query.to || "" });
    const acc = h("input", { name: "AccessionNumber", value: query.AccessionNumber || "" });
    const mod = h("input", { name: "ModalitiesInStudy", value: query.ModalitiesInStudy || "", placeholder: "CT", maxlength: 16 });
    const method = h("select", { name: "method" });
    const syncMethods = () => {
      const a = archives.find(x => x.name === node.value);
      OP.clear(method);
      for (const m of (a ? a.methods : [])) method.appendChild(h("option", { value: m, selected: m === query.method },
        { move: "C-MOVE (to this archive)", get: "C-GET", wado: "WADO-RS" }[m] || m));
    };
    node.addEventListener("change", syncMethods);
    syncMethods();
    const results = h("div.panel#remote-results");
    const search = h("form.search", {
      onsubmit: ev => {
        ev.preventDefault();
        OP.go("remote", [], { node: node.value, PatientID: pid.value.trim(), PatientName: pname.value.trim(), from: from.value,
          to: to.value, AccessionNumber: acc.value.trim(), ModalitiesInStudy: mod.value.trim(), method: method.value, run: "1" });
      },
    },
      h("div.row", OP.field("Remote archive", node), OP.field("Patient ID", pid), OP.field("Patient name", pname, "wildcards * and ?"),
        OP.field("Study date from", from), OP.field("to", to), OP.field("Accession number", acc), OP.field("Modality", mod)),
      h("div.actions", admin ? OP.field("Retrieve by", method) : null, h("button.primary#remote-search", { type: "submit" }, "Search")));
    OP.append(main, [
      h("div.panel", h("h1", "Query remote archive"),
        h("p.muted", "Find studies on another PACS (C-FIND or QIDO-RS) and retrieve them into this archive. A retrieve is a job: follow it on the ",
          h("a", { href: OP.href("jobs", [], { kind: "retrieve" }) }, "Jobs"), " page."),
        archives.length ? search : h("p", "No remote archive configured: add a node on the ", h("a", { href: OP.href("nodes") }, "Nodes"),
          " page or a [remote_dicomweb.NAME] table in the configuration file.")),
      results,
    ]);
    if (!query.run || !archives.length) { results.appendChild(h("p.muted", "Enter search criteria and press Search.")); return; }
    const q = { PatientID: query.PatientID, PatientName: query.PatientName, AccessionNumber: query.AccessionNumber,
      ModalitiesInStudy: query.ModalitiesInStudy, limit: 200 };
    if (query.from || query.to) q.StudyDate = `${dicomDate(query.from)}-${dicomDate(query.to)}`;
    results.appendChild(h("p.muted", "Searching " + node.value + "…"));
    let found;
    try { found = await OP.api("nodes/" + encodeURIComponent(node.value) + "/studies", { query: q }); }
    catch (e) { OP.clear(results).appendChild(h("p.err", { role: "alert", "data-remote-error": "1" }, e.detail || e.message)); return; }
    const retrieve = async (j, cell, btn) => {
      btn.disabled = true;
      try {
        const job = await OP.api("nodes/" + encodeURIComponent(node.value) + "/retrieve",
          { method: "POST", body: { level: "STUDY", uids: [val(j, "0020000D")], method: method.value } });
        OP.toast(`Retrieve job ${job.id} queued`);
        follow(job, cell);
      } catch (e) { btn.disabled = false; OP.clear(cell).appendChild(h("span.badge.err", e.detail || e.message)); }
    };
    const columns = [
      { label: "Patient", render: j => h("span", h("strong", OP.pn(pnOf(val(j, "00100010")))), h("br"), h("small.muted", val(j, "00100020"))) },
      { label: "Study date", render: j => OP.date(val(j, "00080020")) },
      { label: "Accession", render: j => String(val(j, "00080050")) },
      { label: "Modalities", render: j => vals(j, "00080061").join(", ") },
      { label: "Description", render: j => String(val(j, "00081030")) },
      { label: "Series / instances", render: j => `${val(j, "00201206") || "?"} / ${val(j, "00201208") || "?"}` },
      { label: "Study UID", render: j => h("small.muted", String(val(j, "0020000D"))) },
      { label: "", render: j => {
        const cell = h("span.retrieve-state");
        if (!admin) return cell;
        const btn = h("button.primary", { type: "button", "aria-label": "Retrieve study " + val(j, "0020000D") }, "Retrieve");
        btn.addEventListener("click", () => retrieve(j, cell, btn));
        return h("span", btn, " ", cell);
      } },
    ];
    OP.clear(results).append(h("h2", `${found.length} stud${found.length === 1 ? "y" : "ies"} on ${node.value}`),
      OP.table(columns, found, { empty: "No matching study on the remote archive." }));
  }

  OP.page({ id: "remote", title: "Query remote", right: "read", render });
})();
