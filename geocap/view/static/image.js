/* geocap view: one image, its boxes and the attention of each of its records.
 * State in the location hash: #id=<image id>&r=<record>&l=<layer>&h=<head or "mean">, and the
 * selection: &w=<step of the selected word> or &o=<index of the selected object>. Every change is
 * written back and edits of the address are followed; a value the record does not have is
 * reported on the page (#address-notice) and replaced by the default.
 * Layers and heads are 0-based in the hash, the select values and data-layer attributes, and
 * shown 1-based ("layer 1", "head 1", "L1"), as the analysis report numbers them.
 * Shading: a box's weight is its fill colour, on a pale-to-full ramp of the attention kind's colour.
 * The fills are opaque inside one group whose opacity lets the image through, drawn weakest
 * first, so where boxes overlap the strongest of them shows: fills never add up. The outline
 * width grows with the weight too (for a box under a stronger one). Shaded elements carry the
 * exact value in data-attention (float16 values, or their mean over heads).
 * Patch records (a patch_grid: the objects are a ViT-like encoder's image tokens, see
 * geocap/view/encode.py): the grid's lines are drawn instead of outlined, labelled boxes, and a
 * row of weights is a heat map over the patch cells: each cell's fill is the same ramp as a box's
 * with opacity FILL_OPACITY times its fraction of the largest patch weight, so the strongest
 * patch looks as the strongest box would and weak ones let the image through; a scale
 * (#heat-scale) gives the values. Special tokens (special_objects: class / register tokens, in
 * any record) are never drawn: their weights are numbers beside the image (#special-weights) and
 * do not count for the largest weight the shades are fractions of. With "absolute scale" (&s=abs)
 * a shade is the weight itself (full colour = 1), so near-uniform attention stays pale.
 * Encoder and decoder layers: when the encoder's maps have another number of layers than the
 * decoder's (a Hugging Face captioner), there are two pickers: l = the encoder layer (encoder
 * self-attention), dl = the decoder layer (cross and decoder self-attention); else one, l.
 * Patch records also list their patches by weight when shaded, and a word's referent, a region
 * of patches (referent_objects), is outlined cell by cell. Sub-word tokens are shown as the text
 * they add (pieces), grouped by word (word_of). */
"use strict";

(function () {
  const G = Geocap;
  const BLANK_ASPECT = [400, 300];
  const FILL_OPACITY = 0.7;
  const ui = {};
  const state = { data: null, record: 0, layer: 0, dlayer: 0, head: "mean", sel: null, hover: null, shown: null,
                  canvas: null, decoded: {}, manifest: null, problems: [], absolute: false };

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

  /** The record's special tokens and patches: {special: Set of indices, cell: index -> [row, col]
   * of a patch (the non-special objects in row-major order), grid: [rows, cols] or null}. */
  const layouts = new WeakMap();
  function layoutOf(rec) {
    if (!layouts.has(rec)) {
      const special = new Set(rec.special_objects || []);
      const cell = new Map();
      if (rec.patch_grid) {
        const cols = rec.patch_grid[1];
        let k = 0;
        for (let i = 0; i < rec.boxes.length; i++) {
          if (!special.has(i)) { cell.set(i, [Math.floor(k / cols), k % cols]); k++; }
        }
      }
      layouts.set(rec, { special: special, cell: cell, grid: rec.patch_grid || null });
    }
    return layouts.get(rec);
  }

  /** The name of a special token: the first is the class token. */
  function specialName(rec, i) {
    return (rec.special_objects || []).indexOf(i) === 0 ? "[CLS]" : "[special " + i + "]";
  }

  function labelOf(i) {
    const rec = record();
    const layout = layoutOf(rec);
    if (layout.special.has(i)) return specialName(rec, i);
    if (layout.cell.has(i)) return "patch (" + layout.cell.get(i).join(", ") + ")";
    const labels = rec.labels;
    return labels && labels[i] !== null ? labels[i] : "object " + i;
  }

  /** An object as the texts call it: "object 3 (dog)", or in a patch record "patch (1, 2) (token 8)". */
  function thing(i) {
    return layoutOf(record()).grid ? labelOf(i) + " (token " + i + ")" : "object " + i + " (" + labelOf(i) + ")";
  }

  /** What one object is called: "patch" in a patch record (its special tokens too: "token"), else "object". */
  function objectNoun() {
    return layoutOf(record()).grid ? "patch" : "object";
  }

  /** The text token t shows: its piece (a sub-word without its marker), else the token. */
  function pieceOf(t) {
    const rec = record();
    return rec.pieces ? rec.pieces[t] : rec.tokens[t];
  }

  /** The objects a referent names: its region of patches (referent_objects) or the object itself. */
  function regionOf(ref) {
    const rec = record();
    return rec.referent_objects ? rec.referent_objects[ref] || [] : [ref];
  }

  function inputWord(s) {
    return s === 0 ? "<bos>" : pieceOf(s - 1);
  }

  function quote(word) { return "\u201c" + word + "\u201d"; }

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

  /** Layers of the current record's encoder maps and of its decoder maps (decoder self and cross),
   * over maps and entropies, and heads: {enc, dec, H}. */
  function layerCounts() {
    const rec = record();
    const L = { encoder_self: 0, decoder_self: 0, cross: 0 };
    let H = 0;
    for (const name of Object.keys(G.MAP_TITLES)) {
      const m = rec.maps[name];
      const enc = name === "encoder_self" && typeof m === "number" ? state.data.encoders[m] : m;
      if (enc) { L[name] = Math.max(L[name], enc.shape[0]); H = Math.max(H, enc.shape[1]); }
      const ent = rec.entropy[name];
      if (ent) { L[name] = Math.max(L[name], ent.length); H = Math.max(H, ent.length ? ent[0].length : 0); }
    }
    return { enc: L.encoder_self, dec: Math.max(L.decoder_self, L.cross), H: H };
  }

  /** [layers, heads] of the current record (over its maps and entropies). */
  function shapes() {
    const c = layerCounts();
    return [Math.max(c.enc, c.dec), c.H];
  }

  /** Whether the encoder and the decoder have layer pickers of their own (their layer counts differ). */
  function splitLayers() {
    const c = layerCounts();
    return c.enc > 0 && c.dec > 0 && c.enc !== c.dec;
  }

  /** The layer shown for a map kind. */
  function layerOf(name) {
    return name === "encoder_self" || !splitLayers() ? state.layer : state.dlayer;
  }

  /** "layer 2, head 1", or with two pickers "encoder layer 2, ..." / "decoder layer 1, ...". */
  function whereText(name) {
    const which = !splitLayers() ? "layer " : name === "encoder_self" ? "encoder layer " : "decoder layer ";
    return which + (layerOf(name) + 1) + ", " + headText();
  }

  /** The index n when text is a whole number below count, else null. */
  function indexIn(text, count) {
    return /^\d+$/.test(text) && Number(text) < count ? Number(text) : null;
  }

  /** Set the view state from the address (a hashState object); what the image or record does not
   * have is left at its default and said in state.problems. */
  function applyAddress(hash) {
    const problems = [];
    const recs = state.data.records;
    state.record = 0;
    if (hash.r !== undefined) {
      const r = indexIn(hash.r, recs.length);
      if (r === null) problems.push("caption r=" + hash.r + " is not one of this image's " + recs.length +
        " captions (r=0 to " + (recs.length - 1) + "): showing the first.");
      else state.record = r;
    }
    const [Lmax, H] = shapes();
    const split = splitLayers();
    const L = split ? layerCounts().enc : Lmax;
    state.layer = 0;
    if (hash.l !== undefined) {
      const l = indexIn(hash.l, L);
      if (l === null) problems.push((split ? "encoder " : "") + "layer l=" + hash.l + " is not a layer of this " +
        "record (l=0 to " + (L - 1) + ", counted from 0): showing layer 1.");
      else state.layer = l;
    }
    state.dlayer = 0;
    if (split && hash.dl !== undefined) {
      const D = layerCounts().dec;
      const l = indexIn(hash.dl, D);
      if (l === null) problems.push("decoder layer dl=" + hash.dl + " is not a decoder layer of this record (dl=0 " +
        "to " + (D - 1) + ", counted from 0): showing decoder layer 1.");
      else state.dlayer = l;
    }
    state.absolute = hash.s === "abs";
    state.head = "mean";
    if (hash.h !== undefined && hash.h !== "mean") {
      const h = indexIn(hash.h, H);
      if (h === null) problems.push("head h=" + hash.h + " is not a head of this record (h=0 to " + (H - 1) +
        ", counted from 0, or h=mean): showing the mean over heads.");
      else state.head = String(h);
    }
    state.sel = null;
    state.hover = null;
    const rec = record();
    if (hash.w !== undefined) {
      const t = indexIn(hash.w, rec.tokens.length);
      if (t === null) problems.push("word w=" + hash.w + " is not a word of this caption (w=0 to " +
        (rec.tokens.length - 1) + "): no word selected.");
      else state.sel = { kind: "token", step: t };
    } else if (hash.o !== undefined) {
      const i = indexIn(hash.o, rec.boxes.length);
      if (i === null) problems.push("object o=" + hash.o + " is not an object of this image (o=0 to " +
        (rec.boxes.length - 1) + "): no object selected.");
      else state.sel = { kind: "object", index: i };
    }
    state.problems = problems;
  }

  function renderControls() {
    fillSelect(ui.record, state.data.records.map(function (rec, k) {
      const words = rec.words || rec.tokens;
      const text = words[words.length - 1] === "<eos>" ? words.slice(0, -1) : words;
      return [k, rec.kind + (rec.caption_id >= 0 ? " #" + rec.caption_id : "") + ": " + text.join(" ")];
    }), state.record);
    const [Lmax, H] = shapes();
    const split = splitLayers();
    const L = split ? layerCounts().enc : Lmax;
    state.layer = Math.min(state.layer, Math.max(0, L - 1));
    if (state.head !== "mean" && Number(state.head) >= H) state.head = "mean";
    fillSelect(ui.layer, Array.from({ length: Math.max(L, 1) }, (_, l) => [l, L ? String(l + 1) : "none"]), state.layer);
    ui.layerName.textContent = split ? "encoder layer" : "layer";
    ui.dlayerLabel.hidden = !split;
    if (split) {
      const D = layerCounts().dec;
      state.dlayer = Math.min(state.dlayer, D - 1);
      fillSelect(ui.dlayer, Array.from({ length: D }, (_, l) => [l, String(l + 1)]), state.dlayer);
    }
    ui.absolute.checked = state.absolute;
    ui.objectsTitle.textContent = layoutOf(record()).grid ? "Patches" : "Objects";
    fillSelect(ui.head, [["mean", "mean over heads"]].concat(Array.from({ length: H }, (_, h) => [h, "head " + (h + 1)])),
      state.head);
  }

  function renderNotices() {
    const rec = record();
    const notices = [];
    if (state.problems.length) {
      notices.push(G.el("p", { id: "address-notice", class: "notice address",
        text: "In the address: " + state.problems.join(" ") }));
    }
    for (const note of state.canvas.notes) notices.push(G.el("p", { class: "notice canvas-note", text: note }));
    const enc = maps().encoder_self;
    if (enc && enc.k) {
      notices.push(G.el("p", { id: "top-k-notice", class: "notice top-k", "data-k": enc.k,
        text: "Encoder self-attention kept as the " + enc.k + " largest weights of each row (geocap view " +
          "--encoder-top-k): a row misses at most " + G.fmt(enc.max_missing) + " of its weight, and no dropped " +
          "weight is above " + G.fmt(enc.max_dropped) + "; dropped weights show as 0." }));
    }
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
    const geometry = function (i) {
      const [x1, y1, x2, y2] = rec.boxes[i];
      return { x: x1 * W, y: y1 * H, width: Math.max((x2 - x1) * W, 0.5), height: Math.max((y2 - y1) * H, 0.5) };
    };
    const layout = layoutOf(rec);
    const drawn = rec.boxes.map(function (b, i) { return i; }).filter(function (i) { return !layout.special.has(i); });
    // boxes: opaque fills in a translucent group; patches: a translucent fill per cell
    const fills = G.el("g", { id: "fills", opacity: layout.grid ? null : FILL_OPACITY });
    for (const i of drawn) {
      fills.append(G.el("rect", Object.assign({ class: "fill", "data-index": i, fill: "none" }, geometry(i))));
    }
    // outlines and event targets: small boxes on top, so each stays reachable
    const order = drawn.slice();
    const area = function (b) { return (b[2] - b[0]) * (b[3] - b[1]); };
    order.sort(function (a, b) { return area(rec.boxes[b]) - area(rec.boxes[a]); });
    const group = G.el("g", { id: "boxes" });
    for (const i of order) {
      const box = G.el("rect", Object.assign({ class: layout.grid ? "box patch" : "box", "data-index": i,
        "data-label": labelOf(i), "vector-effect": "non-scaling-stroke" }, geometry(i)));
      box.addEventListener("mouseenter", function () { state.hover = i; shade(); });
      box.addEventListener("mouseleave", function () { state.hover = null; shade(); hideTooltip(); });
      box.addEventListener("mousemove", function (event) { showTooltip(event, box); });
      box.addEventListener("click", function () { select({ kind: "object", index: i }); });
      group.append(box);
    }
    if (rec.labels && !layout.grid) {
      for (const i of order) {
        const [x1, y1] = rec.boxes[i];
        if (rec.labels[i] === null) continue;
        group.append(G.el("text", { class: "box-label", x: x1 * W + 2, y: y1 * H + Math.max(10, H / 40),
          "font-size": Math.max(9, H / 40), text: rec.labels[i] }));
      }
    }
    svg.append(fills);
    if (layout.grid) svg.append(gridLines(layout.grid, W, H, patchWindow(rec, layout)));
    svg.append(group);
    ui.stage.replaceChildren(svg);
    renderSpecials(rec, layout);
    ui.objects.replaceChildren.apply(ui.objects, rec.boxes.map(function (b, i) {
      const button = G.el("button", { type: "button", class: "object", "data-index": i,
          onclick: function () { select({ kind: "object", index: i }); },
          onmouseenter: function () { state.hover = i; shade(); },
          onmouseleave: function () { state.hover = null; shade(); hideTooltip(); } },
        i + ": " + labelOf(i));
      button.addEventListener("mousemove", function (event) { showTooltip(event, button); });
      return G.el("li", { "data-index": i }, button, G.el("span", { class: "object-value", "data-index": i }));
    }));
  }

  /** The window the patches cover, normalised [x1, y1, x2, y2]: their boxes' bounding box (the whole
   * image, or the part a centre-cropping processor kept, geocap/hf/crop.py). */
  function patchWindow(rec, layout) {
    const w = [1, 1, 0, 0];
    rec.boxes.forEach(function (b, i) {
      if (layout.special.has(i)) return;
      w[0] = Math.min(w[0], b[0]);
      w[1] = Math.min(w[1], b[1]);
      w[2] = Math.max(w[2], b[2]);
      w[3] = Math.max(w[3], b[3]);
    });
    return w;
  }

  /** The patch grid's lines over its window, borders included: rows + 1 across (data-axis "row"),
   * cols + 1 down; the image outside the window (never seen by the model) dimmed (#outside-window). */
  function gridLines(grid, W, H, win) {
    const [rows, cols] = grid;
    const [x1, y1, x2, y2] = [win[0] * W, win[1] * H, win[2] * W, win[3] * H];
    const g = G.el("g", { id: "patch-grid", "data-rows": rows, "data-cols": cols, "data-window": win.join(" ") });
    if (win[0] > 0 || win[1] > 0 || win[2] < 1 || win[3] < 1) {
      g.append(G.el("path", { id: "outside-window", "fill-rule": "evenodd",
        d: "M0 0H" + W + "V" + H + "H0Z M" + x1 + " " + y1 + "H" + x2 + "V" + y2 + "H" + x1 + "Z" },
        G.el("title", { text: "outside the part of the image the model saw (its processor cropped it away)" })));
    }
    for (let r = 0; r <= rows; r++) {
      const y = y1 + r / rows * (y2 - y1);
      g.append(G.el("line", { class: "grid-line", "data-axis": "row", "data-at": r, x1: x1, x2: x2, y1: y, y2: y,
                              "vector-effect": "non-scaling-stroke" }));
    }
    for (let c = 0; c <= cols; c++) {
      const x = x1 + c / cols * (x2 - x1);
      g.append(G.el("line", { class: "grid-line", "data-axis": "col", "data-at": c, y1: y1, y2: y2, x1: x, x2: x,
                              "vector-effect": "non-scaling-stroke" }));
    }
    return g;
  }

  /** The special tokens beside the image: one button each, its weight written in it when shaded. */
  function renderSpecials(rec, layout) {
    const specials = Array.from(layout.special).sort(function (a, b) { return a - b; });
    ui.specials.hidden = !specials.length;
    ui.heatScale.hidden = true;
    if (!specials.length) { ui.specials.replaceChildren(); return; }
    ui.specials.replaceChildren.apply(ui.specials, [G.el("span", { class: "special-intro",
      text: "Not drawn (no region of the image): " })].concat(specials.map(function (i) {
      const button = G.el("button", { type: "button", class: "special-weight", "data-index": i,
        "data-label": labelOf(i),
        onclick: function () { select({ kind: "object", index: i }); },
        onmouseenter: function () { state.hover = i; shade(); },
        onmouseleave: function () { state.hover = null; shade(); hideTooltip(); },
        text: labelOf(i) });
      button.addEventListener("mousemove", function (event) { showTooltip(event, button); });
      return button;
    })));
  }

  /** The heat map's scale: swatches drawn as the cells are, for fractions 0 to 1 of the largest patch weight
   * (of 1 on the absolute scale). */
  function renderHeatScale(kind, top) {
    const steps = [0, 0.25, 0.5, 0.75, 1];
    const w = 64, h = 16;
    const svg = G.el("svg", { viewBox: "0 0 " + (w * steps.length) + " " + (h + 14), width: w * steps.length,
                              height: h + 14 });
    steps.forEach(function (f, k) {
      svg.append(G.el("rect", Object.assign({ class: "scale-swatch", "data-fraction": f, "data-attention": f * top,
                                              x: k * w, y: 0, width: w, height: h }, cellPaint(kind, f))),
        G.el("text", { class: "scale-value", x: k * w + 2, y: h + 11, text: G.fmt(f * top) }));
    });
    ui.heatScale.replaceChildren(G.el("span", { class: "scale-title", text: G.MAP_TITLES[kind] +
      (state.absolute ? " (absolute scale)" : "") + ": " }), svg);
    ui.heatScale.hidden = false;
  }

  /** Fill and fill-opacity of a patch cell of weight fraction f (0 to 1) of the largest. */
  function cellPaint(kind, f) {
    return f > 0 ? { fill: G.ramp(kind, f), "fill-opacity": (FILL_OPACITY * f).toFixed(4) } : { fill: "none" };
  }

  /** Outline the objects (or the region of patches) a referent names; null: none. */
  function markReferent(ref) {
    ui.stage.querySelectorAll("rect.box.referent").forEach(function (b) { b.classList.remove("referent"); });
    if (ref === null || ref < 0) return;
    for (const i of regionOf(ref)) {
      ui.stage.querySelectorAll('rect.box[data-index="' + i + '"]').forEach(function (b) {
        b.classList.add("referent");
      });
    }
  }

  /** The referent of the selected word, when it has one, else null. */
  function selectedReferent() {
    const rec = record();
    if (!state.sel || state.sel.kind !== "token" || !rec.referents) return null;
    const ref = rec.referents[state.sel.step];
    return ref >= 0 ? ref : null;
  }

  /** The caption's chips: <bos>, then one per token showing the text it adds (sub-word pieces of a
   * word grouped in one span.word, so a word reads as one), each still a step of its own. */
  function renderTokens() {
    const rec = record();
    const T = rec.tokens.length;
    const chips = [];
    for (let j = 0; j <= T; j++) {
      const word = j === 0 ? "<bos>" : pieceOf(j - 1);
      const attrs = { type: "button", class: "token" + (j === 0 ? " bos" : "") + (j === T ? " not-input" : ""),
                      "data-position": j, text: word };
      if (j >= 1 && rec.pieces) {
        attrs["data-token"] = rec.tokens[j - 1];
        attrs["data-word"] = rec.word_of[j - 1];
        if (rec.word_of[j - 1] < 0) attrs.class += " space";
      }
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
        chip.addEventListener("mouseenter", function () { if (ref >= 0) markReferent(ref); });
      }
      chip.addEventListener("mouseleave", function () {
        markReferent(selectedReferent());
        hideTooltip();
      });
      chip.addEventListener("mousemove", function (event) { showTooltip(event, chip); });
      chips.push(chip);
    }
    if (!rec.pieces) {
      ui.tokens.replaceChildren.apply(ui.tokens, chips);
      return;
    }
    const groups = [chips[0]];          // <bos>, then a span per word (a bare space token alone)
    let current = null, currentWord = null;
    for (let j = 1; j <= T; j++) {
      const w = rec.word_of[j - 1];
      if (w < 0 || w !== currentWord) {
        current = G.el("span", { class: "word", "data-word": w });
        groups.push(current);
        currentWord = w < 0 ? null : w;
      }
      current.append(chips[j]);
    }
    ui.tokens.replaceChildren.apply(ui.tokens, groups);
  }

  /** The record's entropies of the current head (or the mean over heads) per layer, by kind. */
  function entropySeries(rec) {
    return Object.keys(G.MAP_TITLES).filter(function (n) { return rec.entropy[n]; }).map(function (name) {
      const perLayer = rec.entropy[name].map(function (heads) {
        if (state.head === "mean") return heads.reduce(function (a, b) { return a + b; }, 0) / heads.length;
        return Number(state.head) < heads.length ? heads[Number(state.head)] : null;
      });
      return { name: name, values: perLayer };
    });
  }

  function entropyPlot(series) {
    const L = Math.max.apply(null, series.map(function (s) { return s.values.length; }));
    const top = 1.05;
    const W = 460, Hgt = 190, left = 40, right = 100, pad = 14;
    const legend = { encoder_self: "encoder self", decoder_self: "decoder self", cross: "cross" };
    const x = function (l) { return left + (L > 1 ? l * (W - left - right) / (L - 1) : (W - left - right) / 2); };
    const y = function (v) { return Hgt - pad - v / top * (Hgt - 2 * pad); };
    const svg = G.el("svg", { id: "entropy-plot", viewBox: "0 0 " + W + " " + Hgt, width: W, height: Hgt });
    svg.append(G.el("line", { class: "axis", x1: left, y1: Hgt - pad, x2: W - right, y2: Hgt - pad }),
      G.el("line", { class: "axis", x1: left, y1: pad, x2: left, y2: Hgt - pad }),
      G.el("line", { id: "uniform-line", class: "uniform", x1: left, y1: y(1), x2: W - right, y2: y(1), "data-entropy": 1 },
        G.el("title", { text: "1 = uniform: equal weight on every key the row attends to" })),
      G.el("text", { class: "tick", x: left - 4, y: y(1) + 4, "text-anchor": "end", text: "1" }),
      G.el("text", { class: "tick", x: left - 4, y: y(0.5) + 4, "text-anchor": "end", text: "0.5" }),
      G.el("text", { class: "tick", x: left - 4, y: y(0) + 4, "text-anchor": "end", text: "0" }));
    for (let l = 0; l < L; l++) {
      svg.append(G.el("text", { class: "tick", x: x(l), y: Hgt - 2, "text-anchor": "middle", text: "L" + (l + 1) }));
    }
    series.forEach(function (s, k) {
      const points = [];
      s.values.forEach(function (v, l) { if (v !== null) points.push(x(l) + "," + y(v)); });
      svg.append(G.el("polyline", { class: "series series-" + s.name, points: points.join(" ") }));
      s.values.forEach(function (v, l) {
        if (v === null) return;
        const current = l === layerOf(s.name);
        svg.append(G.el("circle", { class: "point series-" + s.name + (current ? " current" : ""),
          cx: x(l), cy: y(v), r: current ? 4 : 3, "data-map": s.name, "data-layer": l, "data-entropy": v },
        G.el("title", { text: G.MAP_TITLES[s.name] + ", layer " + (l + 1) + ", " + headText() + ": normalised entropy " +
          v.toFixed(3) + " (1 = uniform)" })));
      });
      svg.append(G.el("text", { class: "legend series-" + s.name, x: W - right + 8, y: y(1) + 14 * k + 4,
        text: legend[s.name] }));
    });
    svg.append(G.el("text", { class: "legend uniform-label", x: W - right, y: y(1) - 3, "text-anchor": "end", text: "uniform" }));
    return svg;
  }

  /** A layer x head table of one kind's entropies (and their mean over heads); a click picks them. */
  function entropyGrid(name, perHead) {
    const H = perHead.length ? perHead[0].length : 0;
    const head = G.el("tr", {}, G.el("th", { text: "layer \\ head" }));
    for (let h = 0; h < H; h++) head.append(G.el("th", { class: "head" + (String(h) === state.head ? " current" : ""), text: String(h + 1) }));
    head.append(G.el("th", { class: "head" + (state.head === "mean" ? " current" : ""), text: "mean" }));
    const table = G.el("table", { class: "entropy-grid", "data-map": name },
      G.el("caption", { class: "series-" + name, text: G.MAP_TITLES[name] }), head);
    perHead.forEach(function (heads, l) {
      const row = G.el("tr", { class: l === layerOf(name) ? "current" : null }, G.el("th", { text: "L" + (l + 1) }));
      const mean = heads.reduce(function (a, b) { return a + b; }, 0) / heads.length;
      heads.concat([mean]).forEach(function (v, h) {
        const headValue = h < H ? String(h) : "mean";
        const current = l === layerOf(name) && headValue === state.head;
        row.append(G.el("td", { class: "cell" + (current ? " current" : ""), "data-layer": l, "data-head": headValue,
          "data-entropy": v, style: "background-color: " + G.ramp(name, v),
          title: G.MAP_TITLES[name] + ", layer " + (l + 1) + ", " + (h < H ? "head " + (h + 1) : "mean over heads") +
            ": normalised entropy " + v.toFixed(3) + " (1 = uniform)",
          onclick: function () {
            if (name === "encoder_self" || !splitLayers()) state.layer = l;
            else state.dlayer = l;
            state.head = headValue;
            state.problems = [];
            renderRecord();
          },
          text: v.toFixed(2) }));
      });
      table.append(row);
    });
    return table;
  }

  function renderEntropy() {
    const rec = record();
    const series = entropySeries(rec);
    if (!series.length) {
      ui.entropy.replaceChildren(G.el("p", { class: "notice missing", "data-map": "entropy",
        text: "Missing: this record has no entropies." }));
      return;
    }
    const grids = G.el("div", { id: "entropy-grids" });
    for (const s of series) grids.append(entropyGrid(s.name, rec.entropy[s.name]));
    ui.entropy.replaceChildren(entropyPlot(series), grids);
  }

  const CONTROLLED = {
    distance_given_similarity: "attention vs distance, given feature similarity (this image: mean over query rows of " +
      "the within-row partial correlation; 0 = none)",
    distance: "attention vs distance, no control (this image: mean over query rows of the within-row Spearman)",
    referent_effect: "referent effect of this caption (own referent hit minus wrong referent hit, mean over its nouns)"
  };

  function renderControlled() {
    const values = record().controlled || {};
    const names = Object.keys(CONTROLLED).filter(function (n) { return values[n]; });
    if (!names.length) {
      ui.controlled.replaceChildren(G.el("p", { class: "notice missing", "data-map": "controlled",
        text: "Not computed for this record (no encoder maps, too few objects, or no grounded nouns with another " +
          "category in the image)." }));
      return;
    }
    const layers = Math.max.apply(null, names.map(function (n) { return values[n].length; }));
    const head = G.el("tr", {}, G.el("th", { text: "measure" }));
    for (let l = 0; l < layers; l++) head.append(G.el("th", { text: "layer " + (l + 1) }));
    const table = G.el("table", { id: "controlled-table" }, head);
    for (const name of names) {
      const row = G.el("tr", { "data-measure": name }, G.el("td", { text: CONTROLLED[name] }));
      for (let l = 0; l < layers; l++) {
        const v = values[name][l];
        row.append(G.el("td", { "data-layer": l, "data-value": v === null || v === undefined ? "" : v,
          text: v === null || v === undefined ? "n/a" : (v >= 0 ? "+" : "") + v.toFixed(3) }));
      }
      table.append(row);
    }
    ui.controlled.replaceChildren(table);
  }

  function select(target) {
    const same = state.sel && target && state.sel.kind === target.kind &&
      state.sel.index === target.index && state.sel.step === target.step;
    state.sel = same ? null : target;
    state.problems = [];
    renderNotices();
    shade();
    writeHash();
  }

  function headText() {
    return state.head === "mean" ? "mean over heads" : "head " + (Number(state.head) + 1);
  }

  function clearShading() {
    ui.stage.querySelectorAll("rect.fill").forEach(function (f) {
      f.setAttribute("fill", "none");
      f.removeAttribute("fill-opacity");
    });
    ui.specials.querySelectorAll(".special-weight").forEach(function (b) {
      b.removeAttribute("data-attention");
      b.classList.remove("selected");
      b.textContent = b.getAttribute("data-label");
    });
    ui.heatScale.hidden = true;
    ui.stage.querySelectorAll("rect.box").forEach(function (b) {
      b.removeAttribute("data-attention");
      b.style.removeProperty("stroke-width");
      b.classList.remove("selected");
    });
    ui.tokens.querySelectorAll(".token").forEach(function (c) {
      c.removeAttribute("data-attention");
      c.style.removeProperty("background-color");
      c.classList.remove("selected", "masked");
    });
    ui.objects.querySelectorAll(".object").forEach(function (o) { o.classList.remove("selected"); });
    ui.objects.querySelectorAll(".object-value").forEach(function (o) { o.textContent = ""; });
    if (layoutOf(record()).grid) orderObjects(null);
  }

  /** Shade the boxes (or the patch cells) by a row of weights over the objects (see the file's
   * comment), the special tokens' weights written beside; returns the largest drawn weight. */
  function paintBoxes(kind, row) {
    const layout = layoutOf(record());
    const drawn = row.map(function (v, i) { return i; }).filter(function (i) { return !layout.special.has(i); });
    const top = Math.max.apply(null, drawn.map(function (i) { return row[i]; }).concat([0]));
    const scale = state.absolute ? 1 : top;             // a shade is the weight's fraction of this
    const fills = ui.stage.querySelector("#fills");
    const order = drawn.sort(function (a, b) { return row[a] - row[b]; });
    for (const i of order) {
      const fill = fills.querySelector('rect.fill[data-index="' + i + '"]');
      if (layout.grid) {
        for (const [k, v] of Object.entries(cellPaint(kind, scale > 0 ? row[i] / scale : 0))) fill.setAttribute(k, v);
      } else {
        fill.setAttribute("fill", row[i] > 0 && scale > 0 ? G.ramp(kind, row[i] / scale) : "none");
      }
      fills.append(fill);                          // weakest first: the strongest ends on top
    }
    ui.stage.querySelectorAll("rect.box").forEach(function (box) {
      const v = row[Number(box.getAttribute("data-index"))];
      box.setAttribute("data-attention", String(v));
      if (!layout.grid) box.style.setProperty("stroke-width", (1 + 3 * (scale > 0 ? v / scale : 0)).toFixed(2) + "px");
    });
    ui.specials.querySelectorAll(".special-weight").forEach(function (b) {
      const v = row[Number(b.getAttribute("data-index"))];
      b.setAttribute("data-attention", String(v));
      b.textContent = b.getAttribute("data-label") + ": " + G.fmt(v);
    });
    if (layout.grid) renderHeatScale(kind, scale);
    ui.objects.querySelectorAll(".object-value").forEach(function (o) {
      o.textContent = " " + G.fmt(row[Number(o.getAttribute("data-index"))]);
    });
    if (layout.grid) orderObjects(row);
    return top;
  }

  /** A patch record's list of image tokens by weight, largest first (else, row null, by index). */
  function orderObjects(row) {
    const items = Array.from(ui.objects.children);
    const index = function (li) { return Number(li.getAttribute("data-index")); };
    items.sort(row ? function (a, b) { return row[index(b)] - row[index(a)] || index(a) - index(b); }
      : function (a, b) { return index(a) - index(b); });
    ui.objects.replaceChildren.apply(ui.objects, items);
    ui.objects.setAttribute("data-order", row ? "weight" : "index");
    ui.objectsTitle.textContent = layoutOf(record()).grid ? (row ? "Patches, by weight" : "Patches") : "Objects";
  }

  /** What the shaded elements of the stage are called in the text under it. */
  function drawnNoun() {
    return layoutOf(record()).grid ? "patches" : "boxes";
  }

  /** Said after the largest weight when the record has special tokens. */
  function specialsNote() {
    return layoutOf(record()).special.size ? "; the special tokens' weights are written beside the image" : "";
  }

  /** Shade the selected object or word; with nothing selected, the hovered object. */
  function shade() {
    clearShading();
    state.shown = null;
    const active = state.sel || (state.hover !== null ? { kind: "object", index: state.hover } : null);
    const rec = record();
    const m = maps();
    if (state.sel && state.sel.kind === "object") {
      ui.stage.querySelectorAll('rect.box[data-index="' + state.sel.index + '"]').forEach(function (b) { b.classList.add("selected"); });
      ui.specials.querySelectorAll('.special-weight[data-index="' + state.sel.index + '"]').forEach(function (b) {
        b.classList.add("selected");
      });
      ui.objects.querySelectorAll('.object[data-index="' + state.sel.index + '"]').forEach(function (b) { b.classList.add("selected"); });
    } else if (state.sel && state.sel.kind === "token") {
      ui.tokens.querySelectorAll('.token[data-step="' + state.sel.step + '"]').forEach(function (c) { c.classList.add("selected"); });
    }
    ui.stage.setAttribute("data-shading", "none");
    markReferent(selectedReferent());
    if (!active) {
      ui.info.textContent = "Select " + (layoutOf(rec).grid ? "a patch" : "an object") + " or a word (or hover " +
        (layoutOf(rec).grid ? "a patch" : "an object") + ").";
      return;
    }
    const darkest = function (top) {
      return state.absolute ? "absolute scale: full colour = 1; largest " + G.fmt(top) : "darkest " + G.fmt(top);
    };
    if (active.kind === "object") {
      const where = whereText("encoder_self");
      const row = m.encoder_self ? G.mapRow(m.encoder_self, layerOf("encoder_self"), state.head, active.index) : null;
      if (!row) {
        ui.info.textContent = m.encoder_self ? "The encoder self-attention has no " + where + "."
          : "No encoder self-attention in this record: nothing to shade for " + thing(active.index) + ".";
        return;
      }
      const top = paintBoxes("encoder_self", row);
      state.shown = { boxes: "encoder_self", object: active.index };
      ui.stage.setAttribute("data-shading", "encoder_self");
      const noun = drawnNoun();
      ui.info.textContent = noun.charAt(0).toUpperCase() + noun.slice(1) + ": encoder self-attention from " +
        thing(active.index) + " to every " + objectNoun() + ", " + where + "; " + darkest(top) + specialsNote() + ".";
      return;
    }
    const t = active.step;
    const where = whereText("cross");
    state.shown = { step: t };
    const parts = [];
    const cross = m.cross ? G.mapRow(m.cross, layerOf("cross"), state.head, t) : null;
    if (cross) {
      const top = paintBoxes("cross", cross);
      state.shown.boxes = "cross";
      ui.stage.setAttribute("data-shading", "cross");
      parts.push(drawnNoun() + ": cross-attention (" + darkest(top) + specialsNote() + ")");
    } else {
      parts.push(m.cross ? "no cross-attention at " + where : "no cross-attention in this record");
    }
    const dec = m.decoder_self ? G.mapRow(m.decoder_self, layerOf("decoder_self"), state.head, t) : null;
    if (dec) {
      const top = Math.max.apply(null, dec.concat([0]));
      const scale = state.absolute ? 1 : top;
      for (let s = 0; s < rec.tokens.length; s++) {
        const chip = ui.tokens.querySelector('.token[data-input="' + s + '"]');
        chip.setAttribute("data-attention", String(dec[s]));
        if (s > t + 1) chip.classList.add("masked");        // t + 1: the selected word itself
        else if (s <= t) {
          chip.style.setProperty("background-color", G.ramp("decoder_self", scale > 0 ? dec[s] / scale : 0));
        }
      }
      state.shown.words = true;
      parts.push("words: decoder self-attention over the inputs <bos> \u2026 " + quote(inputWord(t)) +
        " (" + darkest(top) + "; the later words are not inputs of this step)");
    } else {
      parts.push(m.decoder_self ? "no decoder self-attention at " + where : "no decoder self-attention in this record");
    }
    const ref = selectedReferent();
    const names = ref === null ? "" : rec.referent_objects
      ? "; the word names a region of " + regionOf(ref).length + " patches (outlined)"
      : "; the word names " + thing(ref) + " (outlined)";
    ui.info.textContent = "Step " + t + " (predicting " + quote(pieceOf(t)) + ", input " + quote(inputWord(t)) +
      "), " + where + ": " + parts.join("; ") + names + ".";
  }

  /** What a shaded element's number is, in words. */
  function describeValue(node) {
    const value = node.getAttribute("data-attention");
    const shown = state.shown;
    if (value === null || !shown) return "";
    const rec = record();
    const where = " in " + whereText(shown.boxes || "cross") + ": ";
    if (node.classList.contains("token")) {
      const s = Number(node.getAttribute("data-input"));
      const t = shown.step;
      if (s === t + 1) return " \u2014 the word step " + t + " predicts: not one of that step's inputs";
      if (s > t) {
        return " \u2014 comes after step " + t + " (predicting " + quote(pieceOf(t)) + "): not one of its inputs";
      }
      return " \u2014 decoder self-attention weight of step " + t + " (predicting " + quote(pieceOf(t)) +
        ") on this input" + where + G.fmt(Number(value));
    }
    if (shown.boxes === "cross") {
      return " \u2014 cross-attention weight of step " + shown.step + " (predicting " + quote(pieceOf(shown.step)) +
        ") on this " + objectNoun() + where + G.fmt(Number(value));
    }
    return " \u2014 encoder self-attention weight from " + thing(shown.object) + " to this " + objectNoun() + where +
      G.fmt(Number(value));
  }

  function showTooltip(event, node) {
    let text;
    if (["box", "object", "special-weight"].some(function (c) { return node.classList.contains(c); })) {
      const i = Number(node.getAttribute("data-index"));
      text = layoutOf(record()).grid ? "token " + i + ": " + labelOf(i) : "object " + i + ": " + labelOf(i);
      const box = ui.stage.querySelector('rect.box[data-index="' + i + '"]') ||
        ui.specials.querySelector('.special-weight[data-index="' + i + '"]');
      text += box ? describeValue(box) : "";
    } else {
      text = node.textContent;
      const token = node.getAttribute("data-token");
      if (token !== null && token !== text) text += " (token " + JSON.stringify(token) + ")";
      const ref = node.getAttribute("data-referent");
      if (ref !== null) {
        const region = regionOf(Number(ref));
        text += record().referent_objects
          ? " (names a region of " + region.length + " patches: " + region.slice(0, 4).map(labelOf).join(", ") +
            (region.length > 4 ? ", \u2026" : "") + ")"
          : " (names object " + ref + ": " + labelOf(Number(ref)) + ")";
      }
      const source = node.getAttribute("data-source-referent");
      if (source !== null) text += " (swapped in; the original word named object " + source + ": " + labelOf(Number(source)) + ")";
      text += describeValue(node);
    }
    ui.tooltip.textContent = text;
    ui.tooltip.hidden = false;
    ui.tooltip.style.left = (event.pageX + 12) + "px";
    ui.tooltip.style.top = (event.pageY + 12) + "px";
  }

  function hideTooltip() { ui.tooltip.hidden = true; }

  function writeHash() {
    const view = { id: state.data.id, r: state.record, l: state.layer, h: state.head };
    if (splitLayers()) view.dl = state.dlayer;
    if (state.absolute) view.s = "abs";
    if (state.sel && state.sel.kind === "token") view.w = state.sel.step;
    if (state.sel && state.sel.kind === "object") view.o = state.sel.index;
    const target = G.hashOf(view);
    if (target !== location.hash) history.replaceState(null, "", target);
  }

  function renderRecord() {
    renderControls();
    renderNotices();
    renderStage();
    renderTokens();
    renderEntropy();
    renderControlled();
    shade();
    writeHash();
    renderNeighbours();
  }

  /** The previous and next image of the index, and the index page holding this one. */
  async function neighbours(id) {
    const page = G.pageOf(state.manifest, id);
    if (page < 0) return { page: -1, prev: null, next: null };
    const entries = await G.load(G.indexPageKey(page));
    const k = entries.findIndex(function (e) { return e.id === id; });
    const pages = state.manifest.pages;
    return {
      page: page,
      prev: k > 0 ? entries[k - 1].id : page > 0 ? pages[page - 1][1] : null,
      next: k < entries.length - 1 ? entries[k + 1].id : page < pages.length - 1 ? pages[page + 1][0] : null,
    };
  }

  /** Links to the neighbouring images (keeping layer and head) and to this image's index page. */
  function renderNeighbours() {
    const near = state.near;
    if (!near) return;
    const link = function (id, targetId, label) {
      const old = $(id);
      const node = targetId === null ? G.el("span", { id: id, class: "disabled", text: label })
        : G.el("a", { id: id, href: "image.html" + G.hashOf({ id: targetId, l: state.layer, h: state.head,
          dl: splitLayers() ? state.dlayer : null, s: state.absolute ? "abs" : null }), text: label });
      old.replaceWith(node);
    };
    link("prev-image", near.prev, "\u2039 previous image");
    link("next-image", near.next, "next image \u203a");
    $("index-link").setAttribute("href", near.page >= 0 ? "index.html" + G.hashOf({ p: near.page + 1 }) : "index.html");
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
    const near = await neighbours(id);
    const canvas = await resolveCanvas(data);
    state.data = data;
    state.decoded = {};
    state.near = near;
    state.canvas = canvas;
    applyAddress(G.hashState());
    $("title").textContent = "Image " + id;
    document.title = "geocap view: image " + id;
    ui.status.textContent = data.records.length + " records, " + record().boxes.length +
      (layoutOf(record()).grid ? " image tokens" : " objects") +
      (state.canvas.kind === "image" ? "" : ", no image shown");
    renderRecord();
    document.body.setAttribute("data-ready", "image");
  }

  /** The image id of the address, or an error saying what is wrong with it. */
  function addressId() {
    const text = G.hashState().id;
    if (text === undefined) throw new Error("no image id in the address (image.html#id=<image id>)");
    if (!/^\d+$/.test(text)) throw new Error("the image id in the address, " + JSON.stringify(text) + ", is not a whole number");
    return Number(text);
  }

  function onAddressChange() {
    let id;
    try {
      id = addressId();
    } catch (err) {
      G.showError(err);
      return;
    }
    if (!state.data || id !== state.data.id) {
      loadImage(id).catch(G.showError);
      return;
    }
    applyAddress(G.hashState());
    renderRecord();
  }

  async function start() {
    for (const id of ["record", "layer", "head", "notices", "stage", "objects", "tokens", "entropy", "controlled",
      "tooltip", "status"]) {
      ui[id] = $(id);
    }
    ui.info = $("shading-info");
    ui.dlayer = $("dlayer");
    ui.dlayerLabel = $("dlayer-label");
    ui.layerName = $("layer-name");
    ui.absolute = $("absolute");
    ui.objectsTitle = $("objects-title");
    ui.specials = $("special-weights");
    ui.heatScale = $("heat-scale");
    const changed = function () { state.problems = []; renderRecord(); };
    ui.record.addEventListener("change", function () {
      state.record = Number(ui.record.value);
      state.sel = null;
      state.hover = null;
      changed();
    });
    ui.layer.addEventListener("change", function () { state.layer = Number(ui.layer.value); changed(); });
    ui.head.addEventListener("change", function () { state.head = ui.head.value; changed(); });
    ui.dlayer.addEventListener("change", function () { state.dlayer = Number(ui.dlayer.value); changed(); });
    ui.absolute.addEventListener("change", function () { state.absolute = ui.absolute.checked; changed(); });
    $("clear-selection").addEventListener("click", function () { state.hover = null; select(null); });
    window.addEventListener("hashchange", onAddressChange);
    try {
      state.manifest = await G.load("manifest.js");
      G.setColours(state.manifest);
      if (state.manifest.report_href) {
        $("links").append(" ", G.el("a", { id: "report-link", href: state.manifest.report_href, text: "analysis report" }));
      }
      await loadImage(addressId());
    } catch (err) {
      G.showError(err);
    }
  }

  start();
})();
