/* Studies: search (keyset pages), study detail with series thumbnails, tag browser, viewer link, zip download,
   drag-and-drop upload through STOW-RS with progress, delete (delete right only). DOM only through OP.h. */
"use strict";
(() => {
  const { h } = OP;
  const FIELDS = [
    ["patient_name", "Patient name", "DOE* (wildcards, any case)"], ["patient_id", "Patient ID"],
    ["accession", "Accession"], ["date_from", "Date from", "YYYYMMDD"], ["date_to", "Date to", "YYYYMMDD"],
    ["modality", "Modality", "CT"], ["department", "Department"], ["referring_physician", "Referring physician"],
    ["description", "Description"],
  ];

  function uploadBox(onDone) {
    const bar = h("progress", { max: 100, value: 0, hidden: true, "aria-label": "Upload progress" });
    const status = h("p.muted", { role: "status" });
    const input = h("input", { type: "file", multiple: true, id: "upload-files", accept: ".dcm,application/dicom,*/*" });
    const send = files => {
      if (!files.length) return;
      const boundary = "openpacs-" + Math.random().toString(36).slice(2);
      const parts = [];
      for (const f of files) parts.push(`--${boundary}\r\nContent-Type: application/dicom\r\n\r\n`, f, "\r\n");
      parts.push(`--${boundary}--\r\n`);
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/dicom-web/studies");
      xhr.setRequestHeader("Content-Type", `multipart/related; type="application/dicom"; boundary=${boundary}`);
      xhr.setRequestHeader("Accept", "application/dicom+json");
      if (OP.state.me && OP.state.me.csrf_token) xhr.setRequestHeader("X-CSRF-Token", OP.state.me.csrf_token);
      bar.hidden = false; bar.value = 0; status.textContent = `Uploading ${files.length} file(s)…`;
      xhr.upload.onprogress = e => { if (e.lengthComputable) bar.value = Math.round(100 * e.loaded / e.total); };
      xhr.onload = () => {
        bar.value = 100;
        if (xhr.status === 200 || xhr.status === 202) { status.textContent = `Uploaded ${files.length} file(s).`; OP.toast("Upload stored"); onDone(); }
        else { status.textContent = `Upload failed (${xhr.status}).`; OP.toast(`Upload failed (${xhr.status})`, "err"); }
      };
      xhr.onerror = () => { status.textContent = "Upload failed (network)."; };
      xhr.send(new Blob(parts));
    };
    input.addEventListener("change", () => send([...input.files]));
    const zone = h("div.dropzone#dropzone", { tabindex: 0, role: "group", "aria-label": "Drop DICOM files here to upload" },
      "Drop DICOM files here to upload, or ", h("label", { for: "upload-files" }, "choose files"), " ", input);
    zone.addEventListener("dragover", e => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", e => { e.preventDefault(); zone.classList.remove("over"); send([...e.dataTransfer.files]); });
    return h("div.panel", h("h2", "Upload"), zone, bar, status);
  }

  // department objects (services/summaries.py): a labelled badge per kind, in the list and on each series
  const KIND_LABELS = { ecg: "ECG", wsi: "WSI", pdf: "PDF", sr: "SR", rt: "RT", seg: "SEG", video: "Video", cine: "Cine",
    nm: "NM", pet: "PET", image: "Image", other: "Document" };
  function kindBadge(kind) {
    return h(`span.badge.kind.kind-${kind}`, { title: KIND_LABELS[kind] || kind }, KIND_LABELS[kind] || kind);
  }

  function rtPlanPanel(plan) {
    const num = (v, unit) => v === null || v === undefined ? "" : `${Math.round(v * 10) / 10}${unit}`;
    return h("div.panel.rt-plan", h("h2", "RT Plan ", plan.label || plan.name || ""),
      h("dl.kv", h("dt", "Intent"), h("dd", plan.intent || "—"), h("dt", "Fractions planned"), h("dd", String(plan.fractions || "—")),
        h("dt", "Prescription"), h("dd", plan.prescriptions.length ? plan.prescriptions.map(p => `${num(p.dose_gy, " Gy")}${p.description ? " (" + p.description + ")" : ""}`).join(", ") : "—")),
      OP.table([
        { label: "Beam", render: b => String(b.number) }, { label: "Name", render: b => b.name },
        { label: "Radiation", render: b => b.radiation }, { label: "Type", render: b => b.type },
        { label: "Energy", render: b => num(b.energy, " MV") }, { label: "Gantry", render: b => num(b.gantry_angle, "°") },
        { label: "Meterset (MU)", render: b => num(b.meterset, "") }, { label: "Control points", render: b => String(b.control_points) },
      ], plan.beams, { empty: "No beams." }));
  }

  // RT Dose over its CT (web/api/rt.py draws it): a slice slider and the overlay image
  function rtDosePanel(study, se) {
    const img = h("img.rt-dose-overlay", { alt: "RT Dose over its images" });
    const label = h("span.muted");
    const slider = h("input", { type: "range", min: "0", max: "0", value: "0", "aria-label": "Slice" });
    const panel = h("div.panel.rt-dose", h("h2", "RT Dose over the images"), h("p", slider, " ", label), img);
    (async () => {
      const r = await OP.api(`studies/${encodeURIComponent(study)}/rt-dose/${encodeURIComponent(se.first_instance)}/images`);
      if (!r.items.length) { OP.clear(panel).append(h("h2", "RT Dose"), h("p.muted", "No image on the dose's frame of reference.")); return; }
      const show = i => {
        const it = r.items[i];
        label.textContent = `${it.modality} at ${it.position} mm (${i + 1}/${r.items.length})`;
        img.src = `/api/studies/${encodeURIComponent(study)}/rt-dose/${encodeURIComponent(r.dose)}/overlay?image=${encodeURIComponent(it.uid)}`;
      };
      slider.max = String(r.items.length - 1);
      slider.value = String(Math.floor((r.items.length - 1) / 2));
      slider.addEventListener("input", () => show(Number(slider.value)));
      show(Number(slider.value));
    })().catch(e => OP.clear(panel).append(h("p.err", e.detail || e.message)));
    return panel;
  }

  OP.page({
    id: "studies", title: "Studies",
    async render(main, args, query) {
      const inputs = {};
      const form = h("form.search", { role: "search", "aria-label": "Search studies" },
        FIELDS.map(([k, label, hint]) => OP.field(label, inputs[k] = h("input", { name: k, value: query[k] || "", placeholder: hint || "" }))),
        h("button.primary", { type: "submit" }, "Search"));
      form.addEventListener("submit", e => {
        e.preventDefault();
        const q = { sort: query.sort || "" };
        for (const k in inputs) q[k] = inputs[k].value.trim();
        OP.go("studies", [], q);
      });
      const results = h("div", { "aria-live": "polite" });
      main.append(h("h1", "Studies"), h("div.panel", form), results);
      if (OP.can("store")) main.append(uploadBox(() => OP.route()));
      const params = {};
      for (const [k] of FIELDS) if (query[k]) params[k] = query[k];
      const sort = query.sort || "-date";
      let page;
      try { page = await OP.api("studies", { query: { ...params, sort, limit: 50, cursor: query.cursor } }); }
      catch (e) { results.append(h("p.err", { role: "alert" }, e.detail || e.message)); return; }
      const cols = [
        { label: "Patient", sort: "patient", render: s => h("a", { href: OP.href("study", [s.uid]) }, OP.pn(s.patient.name) || "(no name)") },
        { label: "Patient ID", render: s => s.patient.id },
        { label: "Date", sort: "date", render: s => OP.date(s.date) },
        { label: "Accession", sort: "accession", render: s => s.accession },
        { label: "Description", render: s => s.description },
        { label: "Modalities", render: s => h("span", s.modalities.join(", "), " ", (s.kinds || []).map(k => kindBadge(k))) },
        { label: "Department", render: s => s.department },
        { label: "Series", render: s => s.num_series }, { label: "Instances", render: s => s.num_instances },
        { label: "Received", sort: "received", render: s => OP.when(s.received_at) },
      ];
      const prev = (query.prev || "").split(",").filter(Boolean);
      const nav = h("div.pager",
        h("button", { type: "button", disabled: !query.cursor, onclick: () => {
          const back = prev.slice(0, -1); OP.go("studies", [], { ...query, cursor: prev[prev.length - 1] === "-" ? "" : prev[prev.length - 1], prev: back.join(",") });
        } }, "← Previous"),
        h("button", { type: "button", disabled: !page.next, onclick: () =>
          OP.go("studies", [], { ...query, cursor: page.next, prev: [...prev, query.cursor || "-"].join(",") }) }, "Next →"),
        h("span.muted", `${page.items.length} on this page`));
      results.append(OP.table(cols, page.items, { sort, empty: "No study matches.", onSort: s => OP.go("studies", [], { ...query, sort: s, cursor: "", prev: "" }) }), nav);
    },
  });

  function tagTree(elements) {
    return h("ul.tagtree", elements.map(e => e.items
      ? h("li", h("details", { open: true }, h("summary", `(${e.tag}) ${e.keyword} SQ — ${e.items.length} item(s)`),
          h("ol", e.items.map((it, i) => h("li", h("details", { open: true }, h("summary", `Item ${i + 1}`), tagTree(it)))))))
      : h("li", h("code", `(${e.tag})`), " ", h("strong", e.keyword || "(private)"), " ", h("span.badge", e.vr), " ", h("span", e.value))));
  }

  async function showTags(box, uid) {
    OP.clear(box).append(h("p.muted", "Loading tags…"));
    const t = await OP.api(`instances/${encodeURIComponent(uid)}/tags`);
    OP.clear(box).append(h("h2", "Tags of instance ", h("code", uid)), h("div.tags", h("h3", "File meta"), tagTree(t.meta), h("h3", "Data set"), tagTree(t.elements)));
    box.scrollIntoView();
  }

  // waveform objects (ECG, hemodynamic): each drawn on ECG paper by WADO-RS rendered (dicomweb/waveform_rendered.py),
  // at its natural size (4 px/mm: 25 mm/s, 10 mm/mV), with its summary and measurements; styles through the CSSOM (CSP)
  function waveformSection(series) {
    const items = series.flatMap(se => se.waveforms || []);
    if (!items.length) return null;
    return h("section#waveforms", { "aria-label": "Waveforms" }, h("h2", "Waveforms"), items.map(w => {
      const s = w.summary || {};
      const img = h("img.ecg", { src: `${w.rendered}?accept=image/png`, alt: `${s.text || "Waveform"} on ECG paper` });
      Object.assign(img.style, { display: "block", maxWidth: "none", background: "#fff" });
      const box = h("div.ecg-paper", img);
      Object.assign(box.style, { overflowX: "auto", maxWidth: "100%" });
      const groups = (s.groups || []).map(g => h("a", { href: `${w.rendered.replace(/\/rendered$/, "")}/frames/${g.index}/rendered?accept=image/svg%2Bxml`, target: "_blank", rel: "noopener" },
        `${g.label || "group " + g.index} (${g.channels} ch, ${g.duration} s, SVG)`));
      return h("figure.waveform", h("figcaption", h("strong", s.text || "Waveform"), " ", h("code", w.uid), h("br"),
        s.measurement_text ? h("span.measurements", s.measurement_text) : null, s.measurement_text ? h("br") : null,
        (s.statements || []).length ? h("span.statements", s.statements.join("; ")) : null,
        groups.length ? h("span", " — ", groups.map((a, i) => [i ? ", " : "", a])) : null), box);
    }));
  }

  OP.page({
    id: "study", title: "Study", nav: false, section: "studies",
    async render(main, args) {
      const uid = args[0];
      const s = await OP.api(`studies/${encodeURIComponent(uid)}`);
      const tags = h("div.panel#tags", { hidden: true });
      const actions = h("div.row",
        h("a", { href: s.viewer, target: "_blank", rel: "noopener" }, "Open in viewer"),
        OP.can("export") ? h("a", { href: s.download, download: `${uid}.zip` }, "Download zip (DICOMDIR)") : null,
        OP.can("delete") ? h("button.danger#delete-study", { type: "button", onclick: async () => {
          if (!await OP.confirm("Delete study?", `Delete study ${s.description || uid} of ${OP.pn(s.patient.name)} (${s.num_instances} instances)? This cannot be undone.`, "Delete")) return;
          try { await OP.api(`studies/${encodeURIComponent(uid)}`, { method: "DELETE" }); OP.toast("Study deleted"); OP.go("studies"); }
          catch (e) { OP.toast(e.detail || e.message, "err"); }
        } }, "Delete study") : null,
        OP.rejectControl ? OP.rejectControl(s) : null);  // IOCM (pages/rejections.js)
      main.append(h("p", h("a", { href: "#/studies" }, "← Studies")),
        h("h1", OP.pn(s.patient.name) || "(no name)", " — ", s.description || "(no description)"),
        h("div.panel", h("dl.kv",
          h("dt", "Patient ID"), h("dd", s.patient.id), h("dt", "Birth date"), h("dd", OP.date(s.patient.birth_date)),
          h("dt", "Study date"), h("dd", OP.date(s.date)), h("dt", "Accession"), h("dd", s.accession),
          h("dt", "Referring physician"), h("dd", OP.pn(s.referring_physician)), h("dt", "Department"), h("dd", s.department),
          h("dt", "Series / instances"), h("dd", `${s.num_series} / ${s.num_instances} (${OP.bytes(s.size_bytes)})`),
          h("dt", "Study UID"), h("dd", h("code", s.uid))), actions),
        h("h2", "Series"),
        h("div.thumbs", s.series.map(se => {
          const list = h("div");
          const btn = h("button", { type: "button", onclick: async () => {
            const r = await OP.api(`series/${encodeURIComponent(se.uid)}/instances`);
            OP.clear(list).append(h("ul", r.items.map(i => h("li", h("button.link", { type: "button", onclick: () => { tags.hidden = false; showTags(tags, i.uid); } }, `#${i.number || "?"} tags`)))));
          } }, "Instances");
          // objects without pixels (ECG, RT plan, SR, PDF) have no thumbnail: a tile with their kind instead
          const tile = () => h(`div.kind-tile.kind-${se.summary ? se.summary.kind : "other"}`, { role: "img", "aria-label": `${se.modality || ""} series` },
            KIND_LABELS[se.summary ? se.summary.kind : "other"] || se.modality || "?");
          const img = h("img", { src: se.thumbnail, alt: `Series ${se.number || ""} ${se.modality || ""} thumbnail`, loading: "lazy",
            onerror: () => img.replaceWith(tile()) });
          return h("figure", img,
            h("figcaption", h("strong", `${se.modality || ""} #${se.number || ""}`), " ", se.description || "", h("br"),
              se.summary ? h("span.summary", kindBadge(se.summary.kind), " ", se.summary.text) : null, se.summary ? h("br") : null,
              `${se.num_instances} instance(s)`, " ", btn, list));
        })), ...s.series.filter(se => se.summary && se.summary.rt_plan).map(se => rtPlanPanel(se.summary.rt_plan)),
        ...s.series.filter(se => se.modality === "RTDOSE" && se.first_instance).map(se => rtDosePanel(uid, se)), waveformSection(s.series) || "", tags);
      if (OP.can("admin") && OP.qcEdit) main.append(OP.qcEdit.studyPanel(s));  // pages/qc_edit.js
    },
  });
})();
