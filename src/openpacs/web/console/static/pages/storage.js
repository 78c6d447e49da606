/* console page: storage management — usage by day (chart), modality, department, patient and study; compression at
   rest and its saving; the integrity scrub; retention rules with their dry-run preview and study protection.
   The chart is drawn on <canvas> as the dashboard's are (no library), with a text summary for screen readers. */
"use strict";
(() => {
  const { h } = OP;
  const num = n => (n === null || n === undefined ? "—" : Number(n).toLocaleString());

  /** Bars of bytes per day (oldest left), like the dashboard's charts: grid, labels, aria summary. */
  function bars(canvas, rows) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 600, hgt = canvas.clientHeight || 170;
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(hgt * dpr);
    const g = canvas.getContext("2d"); g.scale(dpr, dpr);
    const padL = 64, padR = 8, padT = 8, padB = 22, cw = w - padL - padR, ch = hgt - padT - padB;
    const values = rows.map(r => r.bytes), max = Math.max(1, ...values);
    g.font = "11px system-ui, sans-serif"; g.fillStyle = "#5b6878"; g.strokeStyle = "#e3e8ef";
    for (let i = 0; i <= 4; i++) {
      const y = padT + ch - (ch * i) / 4;
      g.beginPath(); g.moveTo(padL, y + 0.5); g.lineTo(padL + cw, y + 0.5); g.stroke();
      g.textAlign = "right"; g.textBaseline = "middle"; g.fillText(OP.bytes((max * i) / 4), padL - 6, y);
    }
    const n = Math.max(1, rows.length), bw = cw / n;
    rows.forEach((r, i) => {
      const bh = (ch * r.bytes) / max;
      g.fillStyle = "#1f5fbf"; g.fillRect(padL + i * bw + bw * 0.15, padT + ch - bh, bw * 0.7, bh);
      if (n <= 14 || i % Math.ceil(n / 7) === 0) {
        g.fillStyle = "#5b6878"; g.textAlign = "center"; g.textBaseline = "top"; g.fillText(r.key.slice(5), padL + i * bw + bw / 2, padT + ch + 5);
      }
    });
    const total = values.reduce((a, b) => a + b, 0);
    canvas.setAttribute("aria-label", `bytes stored per day of arrival over ${rows.length} day(s): ${OP.bytes(total)} in all, peak ${OP.bytes(max)}`);
  }

  const usageCols = label => [
    { label, render: r => !r.key ? (r.label || "(none)") : r.label && r.label !== r.key ? `${r.key} — ${r.label}` : r.key },
    { label: "Studies", render: r => num(r.studies) }, { label: "Instances", render: r => num(r.instances) },
    { label: "Size", render: r => OP.bytes(r.bytes) },
  ];

  async function render(main) {
    const [day, mod, dep, pat, study, comp, scrub, prev] = await Promise.all([
      OP.api("storage/usage", { query: { by: "day", limit: 30 } }), OP.api("storage/usage", { query: { by: "modality" } }),
      OP.api("storage/usage", { query: { by: "department" } }), OP.api("storage/usage", { query: { by: "patient", limit: 10 } }),
      OP.api("storage/usage", { query: { by: "study", limit: 10 } }), OP.api("storage/compression"), OP.api("storage/scrub"),
      OP.api("retention/preview", { query: { limit: 200 } })]);
    const canvas = h("canvas.chart", { role: "img", "aria-label": "bytes per day", "data-metric": "usage-by-day" });
    const alerts = [];
    if (day.storage_refusing) alerts.push(h("p.err", { role: "alert" }, `New data refused: ${day.storage_refusing}`));
    if (scrub.scrub_failures) alerts.push(h("p.err", { role: "alert" }, `The last integrity scrub found ${scrub.scrub_failures} instance(s) missing or corrupt.`));
    const act = (label, path, opts) => h("button", { type: "button", onclick: async () => {
      try { const r = await OP.api(path, Object.assign({ method: "POST" }, opts || {})); OP.toast(r && r.job_id ? `${label}: job ${r.job_id}` : `${label}: nothing to do`); OP.route(); }
      catch (e) { OP.toast(e.message, "err"); }
    } }, label);
    const protectBtn = r => h("button", { type: "button", "aria-label": (r.protected ? "Unprotect " : "Protect ") + r.study_instance_uid,
      onclick: async () => { await OP.api(`studies/${encodeURIComponent(r.study_instance_uid)}/${r.protected ? "unprotect" : "protect"}`, { method: "POST" }); OP.route(); } },
      r.protected ? "Unprotect" : "Protect");
    const studyRows = prev.delete.concat(prev.protected_kept);
    const content = h("div#storage",
      h("h1", "Storage"), alerts,
      h("section.cards", { "aria-label": "Storage figures" },
        h("div.card", h("div.v", OP.bytes(day.total_bytes)), h("div.k", `${num(day.total_instances)} instances in ${num(day.total_studies)} studies`)),
        h("div.card", h("div.v", day.storage_free_bytes === null ? "—" : OP.bytes(day.storage_free_bytes)), h("div.k", "free"),
          day.storage_min_free_bytes ? h("div.k", `minimum ${OP.bytes(day.storage_min_free_bytes)}`) : null),
        h("div.card", h("div.v", OP.bytes(comp.bytes_saved)), h("div.k", `saved by compression (${num(comp.compressed)} instances${comp.ratio ? `, ${comp.ratio}:1` : ""})`)),
        h("div.card" + (scrub.scrub_failures ? ".err" : ""), h("div.v", num(scrub.scrub_failures)), h("div.k", "scrub failures"),
          h("div.k", scrub.scrub_last_at ? `last scrub ${OP.when(scrub.scrub_last_at)}` : "no scrub yet"))),
      h("section.row", h("div.panel", h("h2", "Stored per day of arrival (30 days)"), canvas)),
      h("section.row",
        h("div.panel", h("h2", "By modality"), OP.table(usageCols("Modality"), mod.items, { empty: "Nothing stored." })),
        h("div.panel", h("h2", "By department"), OP.table(usageCols("Department"), dep.items, { empty: "Nothing stored." }))),
      h("section.row",
        h("div.panel", h("h2", "Largest patients"), OP.table(usageCols("Patient"), pat.items, { empty: "Nothing stored." })),
        h("div.panel", h("h2", "Largest studies"), OP.table([
          { label: "Study", render: r => h("span", { title: r.key }, `${r.extra.patient_name || r.extra.patient_id} · ${r.label || r.key.slice(0, 20) + "…"}`) },
          { label: "Date", render: r => r.extra.study_date }, { label: "Modalities", render: r => r.extra.modalities },
          { label: "Size", render: r => OP.bytes(r.bytes) }, { label: "Protected", render: r => r.extra.protected ? "yes" : "" },
        ], study.items, { empty: "Nothing stored." }))),
      h("section.row",
        h("div.panel", h("h2", "Compression at rest"),
          h("p", comp.policy ? `Policy: ${comp.policy}, ${comp.after_days ? `after ${comp.after_days} days` : "shortly after arrival"}; ${num(comp.eligible_now)} instance(s) due now.` : "No compression policy (compress = \"\")."),
          h("p", `${OP.bytes(comp.bytes_before)} → ${OP.bytes(comp.bytes_after)} for ${num(comp.compressed)} instance(s); ${num(comp.skipped)} skipped.`),
          comp.policy ? act("Compress now", "storage/compress") : null),
        h("div.panel", h("h2", "Integrity scrub"),
          OP.table([{ label: "Instance", key: "sop_instance_uid" }, { label: "Problem", key: "problem" }, { label: "Detail", key: "detail" }],
            scrub.failures, { empty: scrub.scrub_last_at ? "Every blob matched its SHA-256." : "No scrub has run yet." }),
          act("Scrub now", "storage/scrub"))),
      h("section.row", h("div.panel", h("h2", "Retention (dry run)"),
        h("p", prev.rules.length ? prev.rules.map(r => `${r.name} (${r.kind === "age" ? `older than ${Math.round(r.older_than_days)} days` : `recycle above ${r.recycle_above}`}${r.modalities.length ? ", " + r.modalities.join("/") : ""})`).join(" · ") : "No retention rules."),
        h("p", `A run now would delete ${num(prev.studies)} study(ies), ${OP.bytes(prev.bytes)}; ${num(prev.protected_kept.length)} protected study(ies) kept.`),
        OP.table([
          { label: "Patient", render: r => r.patient_name || r.patient_id }, { label: "Study date", key: "study_date" },
          { label: "Modalities", key: "modalities" }, { label: "Size", render: r => OP.bytes(r.size_bytes) },
          { label: "Rule", render: r => `${r.rule}: ${r.reason}` },
          { label: "Outcome", render: r => h("span.badge." + (r.protected ? "ok" : "warn"), r.protected ? "kept (protected)" : "deleted") },
          { label: "", render: protectBtn },
        ], studyRows, { empty: "Nothing to delete." }),
        prev.studies ? act("Run retention now", "retention/run") : null)));
    OP.append(main, [content]);
    bars(canvas, day.items.slice().reverse());
  }

  OP.page({ id: "storage", title: "Storage", right: "admin", render });
})();
