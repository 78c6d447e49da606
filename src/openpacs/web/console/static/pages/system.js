/* console page: system — version, uptime, backends, ports; the effective configuration (secrets redacted) and a live
   view of the server log (admins). */
"use strict";
(() => {
  const { h } = OP;
  let poller = null;

  function uptime(s) {
    const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    return (d ? d + " d " : "") + (d || hh ? hh + " h " : "") + m + " min";
  }

  async function render(main) {
    if (poller) { clearTimeout(poller); poller = null; }
    const info = await OP.api("system");
    const kv = (pairs) => h("dl.kv", pairs.map(([k, v]) => [h("dt", k), h("dd", v)]));
    OP.append(main, [h("div.panel", h("h1", "System"), kv([
      ["Version", "OpenPACS " + info.version], ["AE title", info.aet], ["Node", info.node],
      ["Started", OP.when(info.started_at)], ["Uptime", uptime(info.uptime_seconds)],
      ["Index", `${info.index_backend} — ${info.index_url}`], ["Storage", `${info.storage_backend} — ${info.storage_url}`],
      ["Ports", Object.entries(info.ports).map(([k, v]) => `${k} ${v || "off"}`).join(", ")],
      ["DICOM processes", String(info.dicom_workers)], ["Authentication", info.auth_enabled ? "on" : "off (loopback development mode)"],
      ["Python", info.python + " on " + info.platform], ["Process", String(info.pid)],
    ]))]);
    if (!OP.can("admin")) return;

    const config = await OP.api("system/config");
    const rows = Object.entries(config).map(([k, v]) => ({ key: k, value: typeof v === "object" && v !== null ? JSON.stringify(v) : String(v) }));
    OP.append(main, [h("div.panel", h("h2", "Effective configuration"),
      h("p.muted", "Settings after the TOML file, environment and command line; secrets are shown as ***."),
      OP.table([{ label: "Setting", key: "key" }, { label: "Value", render: r => h("code", r.value) }], rows))]);

    const level = h("select", { name: "level" }, ["DEBUG", "INFO", "WARNING", "ERROR"].map(l => h("option", { value: l, selected: l === "INFO" }, l)));
    const pause = h("button", { type: "button", "aria-pressed": "false" }, "Pause");
    const log = h("pre.log#server-log", { "aria-live": "off", tabindex: "0", "aria-label": "server log" });
    let last = 0, paused = false;
    const fmt = r => `${new Date(r.time * 1000).toISOString().replace("T", " ").slice(0, 23)} ${r.level.padEnd(7)} ${r.logger}` +
      `${r.request_id ? " [req=" + r.request_id + "]" : r.association_id ? " [assoc=" + r.association_id + "]" : ""}: ${r.message}\n`;
    async function poll() {
      if (!document.body.contains(log)) { poller = null; return; }
      if (!paused) {
        try {
          const got = await OP.api("system/log", { query: { after: last, level: level.value, limit: 500 } });
          const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
          for (const r of got.items) log.appendChild(document.createTextNode(fmt(r)));
          while (log.childNodes.length > 2000) log.removeChild(log.firstChild);
          last = got.last;
          if (atEnd) log.scrollTop = log.scrollHeight;
        } catch (e) { /* the next poll tries again */ }
      }
      poller = setTimeout(poll, 2000);
    }
    level.addEventListener("change", () => { OP.clear(log); last = 0; });
    pause.addEventListener("click", () => { paused = !paused; pause.textContent = paused ? "Resume" : "Pause"; pause.setAttribute("aria-pressed", String(paused)); });
    OP.append(main, [h("div.panel", h("h2", "Server log (live)"),
      h("div.toolbar", OP.field("Level", level), pause), log,
      h("p.muted", "Lines of the serving process (HTTP, HL7 and the first DICOM process); DICOM worker processes log to standard error."))]);
    await poll();
  }

  OP.page({ id: "system", title: "System", right: "read", render });
})();
