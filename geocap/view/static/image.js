/* geocap view: one image, its boxes and the attention of each of its records.
 * State in the location hash: #id=<image id>&r=<record>&l=<layer>&h=<head or "mean">.
 * Layers and heads are 0-based in the hash, the select values and data-layer attributes, and
 * shown 1-based ("layer 1", "head 1", "L1"), as the analysis report numbers them.
 * Shaded elements carry the exact value shown in data-attention (float16 values, or their mean
 * over heads); the fill opacity is proportional to it (the largest value of the row is darkest). */
"use strict";

(function () {
  const G = Geocap;
  const BLANK_ASPECT = [400, 300];
  const MAX_OPACITY = 0.8;
  const ui = {};
  const state = { data: null, record: 0, layer: 0, head: "mean", sel: null, hover: null,
                  canvas: null, decoded: {}, manifest: null };

  function $(id) { return document.getElementById(id); }

  function record() { return state.data.records[state.record]; }

  /** The decoded maps of the current record: {encoder_self, decoder_self, cross}, null when absent. */
  function maps() {
    if (!state.decoded[state.record]) {
      const rec = record();
      const out = {};
      for (const name of Object.keys(G.MAP_TITLES)) {
        let enc = rec.maps[name];
        if (name === "encoder_self" && typeof enc === "number") enc = state.data.encoders[enc];
        out[name] = enc ? G.decodeMap(enc) : null;
      }
      state.decoded[state.record] = out;
    }
    return state.decoded[state.record];
  }

  function labelOf(i) {
    const labels = record().labels;
    return labels && labels[i] !== null ? labels[i] : "object " + i;
  }

  function inputWord(s) {
    return s === 0 ? "<bos>" : record().tokens[s - 1];
  }

  /** Where the boxes are drawn: the image file, else a blank canvas of the image's (or a 4:3) shape. */
  function resolveCanvas(data) {
    const known = data.width && data.height ? [data.width, data.height] : null;
    const blank = function (reason) {
      const size = known || BLANK_ASPECT;
      const notes = [reason];
      if (!known) notes.push("Image size unknown: the boxes are drawn on a 4:3 canvas.");
      return { kind: "blank", width: size[0], height: size[1], notes: notes };
    };
    if (!data.image) return Promise.resolve(blank("No image file for this image: the boxes are drawn on a blank canvas."));
    return new Promise(function (resolve) {
      const img = new Image();
      img.onload = function () {
        const size = known || [img.naturalWidth, img.naturalHeight];
        resolve({ kind: "image", href: data.image, width: size[0], height: size[1], notes: [] });
      };
      img.onerror = function () {
        resolve(blank("The image file " + data.image + " could not be loaded: the boxes are drawn on a blank canvas."));
      };
      img.src = data.image;
    });
  }

  function fillSelect(select, options, value) {
    select.replaceChildren.apply(select, options.map(function (o) {
      return G.el("option", { value: o[0], text: o[1] });
    }));
    select.value = String(value);
  }

  function shapes() {
    const rec = record();
    let L = 0, H = 0;
    for (const name of Object.keys(G.MAP_TITLES)) {
      const m = rec.maps[name];
      const enc = name === "encoder_self" && typeof m === "number" ? state.data.encoders[m] : m;
      if (enc) { L = Math.max(L, enc.shape[0]); H = Math.max(H, enc.shape[1]); }
      const ent = rec.entropy[name];
      if (ent) { L = Math.max(L, ent.length); H = Math.max(H, ent.length ? ent[0].length : 0); }
    }
    return [L, H];
  }

  function renderControls() {
    fillSelect(ui.record, state.data.records.map(function (rec, k) {
      const text = rec.tokens[rec.tokens.length - 1] === "<eos>" ? rec.tokens.slice(0, -1) : rec.tokens;
      return [k, rec.kind + (rec.caption_id >= 0 ? " #" + rec.caption_id : "") + ": " + text.join(" ")];
    }), state.record);
    const [L, H] = shapes();
    state.layer = Math.min(state.layer, Math.max(0, L - 1));
    if (state.head !== "mean" && Number(state.head) >= H) state.head = "mean";
    fillSelect(ui.layer, Array.from({ length: Math.max(L, 1) }, (_, l) => [l, L ? String(l + 1) : "none"]), state.layer);
    fillSelect(ui.head, [["mean", "mean over heads"]].concat(Array.from({ length: H }, (_, h) => [h, "head " + (h + 1)])),
      state.head);
  }

  function renderNotices() {
    const rec = record();
    const notices = [];
    for (const note of state.canvas.notes) notices.push(G.el("p", { class: "notice canvas-note", text: note }));
    const consequence = {
      encoder_self: "hovering or selecting an object cannot shade the boxes.",
      decoder_self: "selecting a word cannot shade the words.",
      cross: "selecting a word cannot shade the boxes.",
    };
    for (const name of Object.keys(G.MAP_TITLES)) {
      if (rec.maps[name] === null || rec.maps[name] === undefined) {
        notices.push(G.el("p", { class: "notice missing", "data-map": name,
          text: "Missing: this record has no " + G.MAP_TITLES[name] + " maps (not recorded); " + consequence[name] }));
      }
    }
    ui.notices.replaceChildren.apply(ui.notices, notices);
  }

  function renderStage() {
    const rec = record();
    const W = state.canvas.width, H = state.canvas.height;
    const svg = G.el("svg", { id: "canvas", viewBox: "0 0 " + W + " " + H, "data-background": state.canvas.kind,
                              preserveAspectRatio: "xMidYMid meet" });
    if (state.canvas.kind === "image") {
      svg.append(G.el("image", { id: "canvas-image", href: state.canvas.href, x: 0, y: 0, width: W, height: H,
                                 preserveAspectRatio: "none" }));
    } else {
      svg.append(G.el("rect", { id: "canvas-blank", x: 0, y: 0, width: W, height: H }));
    }
    const order = rec.boxes.map(function (b, i) { return i; });
    const area = function (b) { return (b[2] - b[0]) * (b[3] - b[1]); };
    order.sort(function (a, b) { return area(rec.boxes[b]) - area(rec.boxes[a]); });
    const group = G.el("g", { id: "boxes" });
    for (const i of order) {
      const [x1, y1, x2, y2] = rec.boxes[i];
      const box = G.el("rect", { class: "box", "data-index": i, "data-label": labelOf(i),
        x: x1 * W, y: y1 * H, width: Math.max((x2 - x1) * W, 0.5), height: Math.max((y2 - y1) * H, 0.5),
        "fill-opacity": 0, "vector-effect": "non-scaling-stroke" });
      box.addEventListener("mouseenter", function () { state.hover = { kind: "object", index: i }; shade(); });
      box.addEventListener("mouseleave", function () { state.hover = null; shade(); hideTooltip(); });
      box.addEventListener("mousemove", function (event) { showTooltip(event, box); });
      box.addEventListener("click", function () { select({ kind: "object", index: i }); });
      group.append(box);
    }
    if (rec.labels) {
      for (const i of order) {
        const [x1, y1] = rec.boxes[i];
        if (rec.labels[i] === null) continue;
        group.append(G.el("text", { class: "box-label", x: x1 * W + 2, y: y1 * H + Math.max(10, H / 40),
          "font-size": Math.max(9, H / 40), text: rec.labels[i] }));
      }
    }
    svg.append(group);
    ui.stage.replaceChildren(svg);
    ui.objects.replaceChildren.apply(ui.objects, rec.boxes.map(function (b, i) {
      const item = G.el("li", {},
        G.el("button", { type: "button", class: "object", "data-index": i,
          onclick: function () { select({ kind: "object", index: i }); },
          onmouseenter: function () { state.hover = { kind: "object", index: i }; shade(); },
          onmouseleave: function () { state.hover = null; shade(); } },
        i + ": " + labelOf(i)), G.el("span", { class: "object-value" }));
      return item;
    }));
  }

  function renderTokens() {
    const rec = record();
    const T = rec.tokens.length;
    const chips = [];
    for (let j = 0; j <= T; j++) {
      const word = j === 0 ? "<bos>" : rec.tokens[j - 1];
      const attrs = { type: "button", class: "token" + (j === 0 ? " bos" : "") + (j === T ? " not-input" : ""),
                      "data-position": j, text: word };
      if (j >= 1) attrs["data-step"] = j - 1;
      if (j <= T - 1) attrs["data-input"] = j;
      const chip = G.el("button", attrs);
      if (j >= 1) {
        const t = j - 1;
        chip.addEventListener("click", function () { select({ kind: "token", step: t }); });
        const ref = rec.referents ? rec.referents[t] : -1;
        if (ref >= 0) chip.setAttribute("data-referent", ref);
        const source = rec.source_referents ? rec.source_referents[t] : -1;
        if (source >= 0) chip.setAttribute("data-source-referent", source);
        chip.addEventListener("mouseenter", function () {
          if (ref >= 0) ui.stage.querySelectorAll('rect.box[data-index="' + ref + '"]').forEach(function (b) { b.classList.add("referent"); });
        });
        chip.addEventListener("mouseleave", function () {
          ui.stage.querySelectorAll("rect.box.referent").forEach(function (b) { b.classList.remove("referent"); });
          hideTooltip();
        });
      } else {
        chip.disabled = true;
      }
      chip.addEventListener("mousemove", function (event) { showTooltip(event, chip); });
      chips.push(chip);
    }
    ui.tokens.replaceChildren.apply(ui.tokens, chips);
  }

  function renderEntropy() {
    const rec = record();
    const names = Object.keys(G.MAP_TITLES).filter(function (n) { return rec.entropy[n]; });
    if (!names.length) {
      ui.entropy.replaceChildren(G.el("p", { class: "notice missing", "data-map": "entropy",
        text: "Missing: this record has no entropies." }));
      return;
    }
    const series = names.map(function (name) {
      const perLayer = rec.entropy[name].map(function (heads) {
        if (state.head === "mean") return heads.reduce(function (a, b) { return a + b; }, 0) / heads.length;
        return Number(state.head) < heads.length ? heads[Number(state.head)] : null;
      });
      return { name: name, values: perLayer };
    });
    const L = Math.max.apply(null, series.map(function (s) { return s.values.length; }));
    let top = 0;
    for (const s of series) for (const v of s.values) if (v !== null) top = Math.max(top, v);
    top = top > 0 ? top * 1.1 : 1;
    const W = 340, Hgt = 150, left = 40, right = 90, pad = 14;
    const legend = { encoder_self: "encoder", decoder_self: "decoder self", cross: "cross" };
    const x = function (l) { return left + (L > 1 ? l * (W - left - right) / (L - 1) : (W - left - right) / 2); };
    const y = function (v) { return Hgt - pad - v / top * (Hgt - 2 * pad); };
    const svg = G.el("svg", { id: "entropy-plot", viewBox: "0 0 " + W + " " + Hgt, width: W, height: Hgt });
    svg.append(G.el("line", { class: "axis", x1: left, y1: Hgt - pad, x2: W - right, y2: Hgt - pad }),
      G.el("line", { class: "axis", x1: left, y1: pad, x2: left, y2: Hgt - pad }),
      G.el("text", { class: "tick", x: left - 4, y: pad + 4, "text-anchor": "end", text: top.toFixed(2) }),
      G.el("text", { class: "tick", x: left - 4, y: Hgt - pad, "text-anchor": "end", text: "0" }));
    for (let l = 0; l < L; l++) {
      svg.append(G.el("text", { class: "tick", x: x(l), y: Hgt - 2, "text-anchor": "middle", text: "L" + (l + 1) }));
    }
    series.forEach(function (s, k) {
      const points = [];
      s.values.forEach(function (v, l) { if (v !== null) points.push(x(l) + "," + y(v)); });
      svg.append(G.el("polyline", { class: "series series-" + s.name, points: points.join(" ") }));
      s.values.forEach(function (v, l) {
        if (v === null) return;
        const dot = G.el("circle", { class: "point series-" + s.name + (l === state.layer ? " current" : ""),
          cx: x(l), cy: y(v), r: l === state.layer ? 4 : 3, "data-map": s.name, "data-layer": l, "data-entropy": v },
        G.el("title", { text: G.MAP_TITLES[s.name] + ", layer " + (l + 1) + ": " + v.toFixed(4) + " nats" }));
        svg.append(dot);
      });
      svg.append(G.el("text", { class: "legend series-" + s.name, x: W - right + 8, y: pad + 14 * k + 4,
        text: legend[s.name] }));
    });
    ui.entropy.replaceChildren(svg);
  }

  function select(target) {
    const same = state.sel && target && state.sel.kind === target.kind &&
      state.sel.index === target.index && state.sel.step === target.step;
    state.sel = same ? null : target;
    shade();
  }

  function headText() {
    return state.head === "mean" ? "mean over heads" : "head " + (Number(state.head) + 1);
  }

  function paint(elements, values) {
    let top = 0;
    for (const v of values) if (v > top) top = v;
    elements.forEach(function (node, k) {
      const v = values[k];
      node.setAttribute("data-attention", String(v));
      const opacity = top > 0 ? MAX_OPACITY * v / top : 0;
      if (node.tagName.toLowerCase() === "rect") node.setAttribute("fill-opacity", opacity.toFixed(4));
      else node.style.setProperty("--shade", opacity.toFixed(4));
    });
    return top;
  }

  function clearShading() {
    ui.stage.querySelectorAll("rect.box").forEach(function (b) {
      b.removeAttribute("data-attention");
      b.setAttribute("fill-opacity", 0);
      b.classList.remove("selected");
    });
    ui.tokens.querySelectorAll(".token").forEach(function (c) {
      c.removeAttribute("data-attention");
      c.style.setProperty("--shade", 0);
      c.classList.remove("selected");
    });
    ui.objects.querySelectorAll(".object").forEach(function (o) { o.classList.remove("selected"); });
    ui.objects.querySelectorAll(".object-value").forEach(function (o) { o.textContent = ""; });
  }

  /** Shade the boxes (and words) for the hovered, else the selected, object or word. */
  function shade() {
    clearShading();
    const active = state.hover || state.sel;
    const rec = record();
    const m = maps();
    if (state.sel && state.sel.kind === "object") {
      ui.stage.querySelectorAll('rect.box[data-index="' + state.sel.index + '"]').forEach(function (b) { b.classList.add("selected"); });
      ui.objects.querySelectorAll('.object[data-index="' + state.sel.index + '"]').forEach(function (b) { b.classList.add("selected"); });
    } else if (state.sel && state.sel.kind === "token") {
      ui.tokens.querySelectorAll('.token[data-step="' + state.sel.step + '"]').forEach(function (c) { c.classList.add("selected"); });
    }
    ui.stage.setAttribute("data-shading", "none");
    if (!active) {
      ui.info.textContent = "Hover or select an object, or select a word.";
      return;
    }
    const where = "layer " + (state.layer + 1) + ", " + headText();
    const boxes = Array.from(rec.boxes, function (_, i) { return ui.stage.querySelector('rect.box[data-index="' + i + '"]'); });
    if (active.kind === "object") {
      const row = m.encoder_self ? G.mapRow(m.encoder_self, state.layer, state.head, active.index) : null;
      if (!row) {
        ui.info.textContent = m.encoder_self ? "The encoder self-attention has no " + where + "."
          : "No encoder self-attention in this record: nothing to shade for object " + active.index + ".";
        return;
      }
      const top = paint(boxes, row);
      ui.objects.querySelectorAll(".object-value").forEach(function (o, i) { o.textContent = " " + G.fmt(row[i]); });
      ui.stage.setAttribute("data-shading", "encoder_self");
      ui.info.textContent = "Boxes: encoder self-attention from object " + active.index + " (" + labelOf(active.index) +
        ") to every object, " + where + "; darkest = " + G.fmt(top) + ".";
      return;
    }
    const t = active.step;
    const parts = [];
    const cross = m.cross ? G.mapRow(m.cross, state.layer, state.head, t) : null;
    if (cross) {
      const top = paint(boxes, cross);
      ui.objects.querySelectorAll(".object-value").forEach(function (o, i) { o.textContent = " " + G.fmt(cross[i]); });
      ui.stage.setAttribute("data-shading", "cross");
      parts.push("boxes: cross-attention (darkest " + G.fmt(top) + ")");
    } else {
      parts.push(m.cross ? "no cross-attention at " + where : "no cross-attention in this record");
    }
    const dec = m.decoder_self ? G.mapRow(m.decoder_self, state.layer, state.head, t) : null;
    if (dec) {
      const chips = Array.from({ length: rec.tokens.length }, function (_, s) {
        return ui.tokens.querySelector('.token[data-input="' + s + '"]');
      });
      const top = paint(chips, dec);
      parts.push("words: decoder self-attention over the inputs (darkest " + G.fmt(top) + ")");
    } else {
      parts.push(m.decoder_self ? "no decoder self-attention at " + where : "no decoder self-attention in this record");
    }
    ui.info.textContent = "Step " + t + " (predicting \u201c" + rec.tokens[t] + "\u201d, input \u201c" + inputWord(t) +
      "\u201d), " + where + ": " + parts.join("; ") + ".";
  }

  function showTooltip(event, node) {
    const value = node.getAttribute("data-attention");
    let text;
    if (node.classList.contains("box")) {
      text = "object " + node.getAttribute("data-index") + ": " + node.getAttribute("data-label");
    } else {
      text = node.textContent;
      const ref = node.getAttribute("data-referent");
      if (ref !== null) text += " (names object " + ref + ": " + labelOf(Number(ref)) + ")";
      const source = node.getAttribute("data-source-referent");
      if (source !== null) text += " (swapped in; the original word named object " + source + ": " + labelOf(Number(source)) + ")";
    }
    if (value !== null) text += " \u2014 attention " + G.fmt(Number(value));
    ui.tooltip.textContent = text;
    ui.tooltip.hidden = false;
    ui.tooltip.style.left = (event.pageX + 12) + "px";
    ui.tooltip.style.top = (event.pageY + 12) + "px";
  }

  function hideTooltip() { ui.tooltip.hidden = true; }

  function writeHash() {
    const target = G.hashOf({ id: state.data.id, r: state.record, l: state.layer, h: state.head });
    if (target !== location.hash) history.replaceState(null, "", target);
  }

  function renderRecord() {
    renderControls();
    renderNotices();
    renderStage();
    renderTokens();
    renderEntropy();
    shade();
    writeHash();
  }

  async function loadImage(id) {
    ui.status.textContent = "Loading image " + id + "…";
    ui.status.className = "";
    document.body.removeAttribute("data-ready");
    let data;
    try {
      data = await G.load(G.imageKey(id));
    } catch (err) {
      throw new Error("image " + id + " is not in this site (" + err.message + ")");
    }
    const hash = G.hashState();
    state.data = data;
    state.decoded = {};
    state.sel = null;
    state.hover = null;
    state.record = Math.min(Math.max(0, parseInt(hash.r || "0", 10) || 0), data.records.length - 1);
    state.layer = Math.max(0, parseInt(hash.l || "0", 10) || 0);
    state.head = hash.h && hash.h !== "mean" ? String(parseInt(hash.h, 10) || 0) : "mean";
    state.canvas = await resolveCanvas(data);
    $("title").textContent = "Image " + id;
    document.title = "geocap view: image " + id;
    ui.status.textContent = data.records.length + " records, " + record().boxes.length + " objects" +
      (state.canvas.kind === "image" ? "" : ", no image shown");
    renderRecord();
    document.body.setAttribute("data-ready", "image");
  }

  async function start() {
    for (const id of ["record", "layer", "head", "notices", "stage", "objects", "tokens", "entropy", "tooltip", "status"]) {
      ui[id] = $(id);
    }
    ui.info = $("shading-info");
    ui.record.addEventListener("change", function () {
      state.record = Number(ui.record.value);
      state.sel = null;
      state.hover = null;
      renderRecord();
    });
    ui.layer.addEventListener("change", function () { state.layer = Number(ui.layer.value); renderEntropy(); shade(); writeHash(); });
    ui.head.addEventListener("change", function () { state.head = ui.head.value; renderEntropy(); shade(); writeHash(); });
    $("clear-selection").addEventListener("click", function () { state.sel = null; state.hover = null; shade(); });
    window.addEventListener("hashchange", function () {
      const id = parseInt(G.hashState().id, 10);
      if (state.data && id !== state.data.id && id >= 0) loadImage(id).catch(G.showError);
    });
    try {
      state.manifest = await G.load("manifest.js");
      if (state.manifest.report_href) {
        $("links").append(" ", G.el("a", { id: "report-link", href: state.manifest.report_href, text: "analysis report" }));
      }
      const id = parseInt(G.hashState().id, 10);
      if (!(id >= 0)) throw new Error("no image id in the address (image.html#id=<image id>)");
      await loadImage(id);
    } catch (err) {
      G.showError(err);
    }
  }

  start();
})();
