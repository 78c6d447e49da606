/* console page: the dashboard — counts, storage with its forecast, 24-hour activity charts, live figures, failures.
   Charts are drawn on <canvas> by chart() below (no library, no CDN); each has a text summary for screen readers. */
"use strict";
(() => {
  const { h } = OP;
  let timer = null;

  function num(n) { return n === null || n === undefined ? "—" : Number(n).toLocaleString(); }

  /** A filled area chart of values per bucket, time axis from start (Unix s) by step (s). */
  function chart(canvas, values, start, step, color, unit) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 600, hgt = canvas.clientHeight || 170;
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(hgt * dpr);
    const g = canvas.getContext("2d");
    g.scale(dpr, dpr);
    const padL = 44, padR = 8, padT = 8, padB = 22;
    const cw = w - padL - padR, ch = hgt - padT - padB;
    const max = Math.max(1, ...values);
    const nice = (() => { const p = Math.pow(10, Math.floor(Math.log10(max))); for (const m of [1, 2, 4, 8, 10]) if (m * p >= max) return m * p; return 10 * p; })();
    g.font = "11px system-ui, sans-serif"; g.fillStyle = "#5b6878"; g.strokeStyle = "#e3e8ef"; g.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {  // horizontal grid with labels
      const y = padT + ch - (ch * i) / 4;
      g.beginPath(); g.moveTo(padL, y + 0.5); g.lineTo(padL + cw, y + 0.5); g.stroke();
      const v = (nice * i) / 4;
      g.textAlign = "right"; g.textBaseline = "middle";
      g.fillText(v >= 10 ? Math.round(v).toLocaleString() : v.toFixed(v ? 1 : 0), padL - 6, y);
    }
    g.textAlign = "center"; g.textBaseline = "top";
    const n = values.length;
    for (let i = 0; i < n; i += Math.max(1, Math.round(n / 6))) {  // time labels
      const t = new Date((start + i * step) * 1000);
      g.fillText(t.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" }), padL + (cw * i) / Math.max(1, n - 1), padT + ch + 5);
    }
    const x = i => padL + (cw * i) / Math.max(1, n - 1);
    const y = v => padT + ch - (ch * v) / nice;
    g.beginPath(); g.moveTo(x(0), y(0));
    values.forEach((v, i) => g.lineTo(x(i), y(v)));
    g.lineTo(x(n - 1), y(0)); g.closePath();
    g.fillStyle = color + "55"; g.fill();
    g.beginPath(); values.forEach((v, i) => (i ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v))));
    g.strokeStyle = color; g.lineWidth = 1.6; g.stroke();
    const total = values.reduce((a, b) => a + b, 0);
    canvas.setAttribute("aria-label", `${unit}: peak ${max.toLocaleString()} per bucket of ${step / 60} min, ${total.toLocaleString()} in all over the last ${Math.round(n * step / 3600)} h`);
  }

  function card(label, value, note, kind) {
    return h("div.card" + (kind ? "." + kind : ""), h("div.v", value), h("div.k", label), note ? h("div.k", note) : null);
  }

  function forecast(s) {
    if (s.storage_free_bytes === null) return "free space not known for this storage";
    if (!s.ingest_bytes_per_day) return "no ingest in the last 7 days";
    const d = s.days_until_full;
    return `${OP.bytes(s.ingest_bytes_per_day)}/day → full in ${d > 3650 ? "10+ years" : Math.round(d).toLocaleString() + " days"}`;
  }

  async function render(main) {
    if (timer) { clearInterval(timer); timer = null; }
    const [s, act] = await Promise.all([OP.api("stats"), OP.api("stats/activity", { query: { hours: 24, step: 300 } })]);
    const total = s.storage_total_bytes, free = s.storage_free_bytes;
    const usedPct = total ? Math.round(100 * (total - free) / total) : null;
    const jobs = s.jobs || {};
    const charts = [
      ["Stores", "store", "#1f5fbf", "instances stored"],
      ["Queries", "query", "#2e8b57", "queries answered"],
      ["Retrievals", "retrieve", "#b5651d", "retrievals"],
    ];
    const canvases = charts.map(([title, , , unit]) => h("canvas.chart", { role: "img", "aria-label": unit, "data-metric": title.toLowerCase() }));
    const counts = (act.metrics.store && act.metrics.store.count.length) || 0;
    const lowSpace = free !== null && s.storage_min_free_bytes !== null && free < 2 * s.storage_min_free_bytes;
    const storageKind = s.storage_refusing || (usedPct !== null && usedPct >= 90) ? "err"
      : (lowSpace || (s.days_until_full !== null && s.days_until_full < 30) ? "warn" : null);
    const content = h("div#dashboard",
      h("h1", "Dashboard"),
      h("section.cards", { "aria-label": "Archive contents" },
        card("Patients", num(s.patients)), card("Studies", num(s.studies)),
        card("Series", num(s.series)), card("Instances", num(s.instances)),
        card("Storage used", OP.bytes(s.storage_used_bytes), usedPct !== null ? `the disk is ${usedPct} % used` : null),
        card("Storage free", free === null ? "—" : OP.bytes(free),
          s.storage_refusing ? `New data refused: ${s.storage_refusing}` : forecast(s), storageKind),
        card("Active associations", num(s.associations_active)), card("Active HTTP requests", num(s.http_requests_active)),
        card("Jobs waiting", num((jobs.pending || 0) + (jobs.running || 0)), `${num(jobs.failed || 0)} failed`, jobs.failed ? "warn" : null),
        s.security_alerts_24h === null ? null : card("Security alerts (24 h)", num(s.security_alerts_24h), null, s.security_alerts_24h ? "warn" : null),
        s.scrub_failures ? card("Integrity scrub", num(s.scrub_failures), "instance(s) missing or corrupt: see Storage", "err") : null),
      h("section.row", { "aria-label": "Activity over the last 24 hours" },
        charts.map(([title, metric], i) => h("div.panel",
          h("h2", `${title} per 5 minutes (24 h)`),
          canvases[i],
          h("p.muted", `${num(s.last_24h[metric] || 0)} in the last 24 h`)))),
      h("section.row",
        h("div.panel", h("h2", "Failed associations"),
          OP.table([
            { label: "Calling AE", key: "aet" }, { label: "Rejected", key: "rejected" },
            { label: "Last attempt", render: r => OP.when(r.last_connected_at) }, { label: "From", key: "last_address" },
          ], s.failed_associations, { empty: "None." })),
        s.recent_failures === null ? null : h("div.panel", h("h2", "Recent errors and refusals (24 h)"),
          OP.table([
            { label: "When", render: r => OP.when(r.at) }, { label: "Event", key: "event" },
            { label: "User / AE", key: "user" }, { label: "Detail", key: "detail" },
          ], s.recent_failures, { empty: "None." }),
          OP.can("audit") ? h("p", h("a", { href: OP.href("audit") }, "Open the audit log →")) : null)),
      h("p.muted", `Figures computed in ${s.generated_ms} ms; refreshed every 30 s. ${counts} points per chart.`));
    OP.append(main, [content]);
    charts.forEach(([, metric, color, unit], i) => {
      const m = act.metrics[metric];
      chart(canvases[i], m ? m.count : [], act.start, act.step, color, unit);
    });
    timer = setInterval(() => {
      if (OP.parseHash().id !== "dashboard" || !document.getElementById("dashboard")) { clearInterval(timer); timer = null; return; }
      OP.route();
    }, 30000);
  }

  OP.page({ id: "dashboard", title: "Dashboard", right: "read", render });
})();
