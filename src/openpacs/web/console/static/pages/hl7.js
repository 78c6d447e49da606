/* console page: the HL7 v2 message log — filters, newest first, one message with its raw text (segments on their own
   lines, fields spaced for reading) and the ACK that was sent. */
"use strict";
(() => {
  const { h } = OP;
  const RESULTS = { "": "any", AA: "AA accepted", AE: "AE error", AR: "AR rejected" };
  const toIso = v => v ? new Date(v).toISOString() : "";
  const badge = r => h("span.badge." + (r === "AA" ? "ok" : r === "AE" ? "warn" : "err"), r);
  const segments = text => (text || "").split(/\r\n|\r|\n/).filter(Boolean).join("\n");

  async function detail(main, id) {
    const m = await OP.api(`hl7/messages/${encodeURIComponent(id)}`);
    OP.append(main, [
      h("div.panel", h("h1", `HL7 message #${m.id}`),
        h("p", h("a", { href: OP.href("hl7") }, "← Message log")),
        h("dl.kv",
          h("dt", "Received"), h("dd", OP.when(m.received_at)),
          h("dt", "Type"), h("dd", m.message_type || "(not readable)"),
          h("dt", "Control ID"), h("dd", m.control_id),
          h("dt", "Sender"), h("dd", [m.sending_application, m.sending_facility].filter(Boolean).join(" / ")),
          h("dt", "Version / charset"), h("dd", [m.version, m.charset || "ASCII"].filter(Boolean).join(" · ")),
          h("dt", "Result"), h("dd", badge(m.result), m.error ? " " + m.error : "", m.error_location ? ` (${m.error_location})` : ""),
          h("dt", "Patient ID"), h("dd", m.patient_id || ""),
          h("dt", "Peer"), h("dd", m.peer || ""),
          h("dt", "Size"), h("dd", OP.bytes(m.size)))),
      h("div.panel", h("h2", "Message"), h("pre.log#hl7-raw", segments(m.raw))),
      h("div.panel", h("h2", "ACK sent"), h("pre.log#hl7-ack", segments(m.ack))),
    ]);
  }

  async function render(main, args, query) {
    if (args.length) return detail(main, args[0]);
    const f = {
      type: h("input", { name: "type", value: query.type || "", placeholder: "ADT or ADT^A08" }),
      control_id: h("input", { name: "control_id", value: query.control_id || "" }),
      patient: h("input", { name: "patient", value: query.patient || "" }),
      result: h("select", { name: "result" }, Object.entries(RESULTS).map(([k, v]) => h("option", { value: k, selected: k === (query.result || "") }, v))),
      since: h("input", { name: "since", type: "datetime-local", value: query.since_local || "" }),
      until: h("input", { name: "until", type: "datetime-local", value: query.until_local || "" }),
    };
    const filters = { type: query.type, control_id: query.control_id, patient: query.patient, result: query.result, since: query.since, until: query.until };
    const page = await OP.api("hl7/messages", { query: Object.assign({ limit: 100, cursor: query.cursor }, filters) });
    const columns = [
      { label: "Received", render: m => h("a", { href: OP.href("hl7", [String(m.id)]) }, OP.when(m.received_at)) },
      { label: "Type", render: m => m.message_type || "?" }, { label: "Control ID", key: "control_id" },
      { label: "Sender", render: m => [m.sending_application, m.sending_facility].filter(Boolean).join(" / ") },
      { label: "Result", render: m => badge(m.result) }, { label: "Patient ID", key: "patient_id" },
      { label: "Detail", render: m => (m.error || "") + (m.error_location ? ` (${m.error_location})` : "") },
    ];
    const submit = ev => {
      ev.preventDefault();
      OP.go("hl7", [], { type: f.type.value.trim(), control_id: f.control_id.value.trim(), patient: f.patient.value.trim(), result: f.result.value,
        since: toIso(f.since.value), until: toIso(f.until.value), since_local: f.since.value, until_local: f.until.value });
    };
    OP.append(main, [
      h("div.panel", h("h1", "HL7 messages"),
        h("form.search#hl7-filters", { onsubmit: submit },
          h("div.row", OP.field("Type", f.type), OP.field("Control ID", f.control_id), OP.field("Patient ID", f.patient), OP.field("Result", f.result),
            OP.field("From", f.since), OP.field("Until", f.until)),
          h("div.actions", h("button.primary", { type: "submit" }, "Search"), " ", h("a", { href: OP.href("hl7") }, "Clear filters")))),
      h("div.panel", OP.table(columns, page.items, { empty: "No HL7 messages match." }),
        page.next ? h("div.pager", h("a", { href: OP.href("hl7", [], Object.assign({}, query, { cursor: page.next })) }, "Older messages →")) : null),
    ]);
  }
  OP.page({ id: "hl7", title: "HL7", right: "admin", render });
})();
