/* geocap view: shared by index.html and image.html.
 * Data files are scripts calling geocapData(key, value); they are loaded on demand by adding a
 * <script> tag, which works from file:// (where Chromium refuses fetch() of local files) and
 * from any static server alike. Encodings are described in geocap/view/encode.py. */
"use strict";

const Geocap = (function () {
  const pending = new Map();   // key -> {resolve, reject}
  const cache = new Map();     // key -> Promise of the value

  window.geocapData = function (key, value) {
    const waiter = pending.get(key);
    if (waiter) {
      pending.delete(key);
      waiter.resolve(value);
    }
  };

  /** The value of data/<key>, loaded once. */
  function load(key) {
    if (cache.has(key)) return cache.get(key);
    const promise = new Promise(function (resolve, reject) {
      pending.set(key, { resolve: resolve, reject: reject });
      const script = document.createElement("script");
      script.src = "data/" + key;
      script.onload = function () {
        script.remove();
        if (pending.has(key)) {
          pending.delete(key);
          reject(new Error("data/" + key + " did not hold viewer data"));
        }
      };
      script.onerror = function () {
        script.remove();
        pending.delete(key);
        reject(new Error("missing data file data/" + key));
      };
      document.head.appendChild(script);
    });
    cache.set(key, promise);
    promise.catch(function () { cache.delete(key); });
    return promise;
  }

  /** Index page (0-based) holding image id, by binary search over the manifest's [first, last]
   * id ranges of its pages; -1 when no page holds it. */
  function pageOf(manifest, id) {
    let lo = 0, hi = manifest.pages.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const [first, last] = manifest.pages[mid];
      if (id < first) hi = mid - 1;
      else if (id > last) lo = mid + 1;
      else return mid;
    }
    return -1;
  }

  /** The colour of each attention kind (the report's, from the manifest: ATTENTION_COLOURS in analysis/plotting.py),
   * also set as the CSS variables --colour-<kind> the stylesheet uses. */
  const colours = {};
  function setColours(manifest) {
    for (const [kind, colour] of Object.entries(manifest.colours || {})) {
      colours[kind] = colour;
      document.documentElement.style.setProperty("--colour-" + kind, colour);
    }
  }

  /** A weight fraction f in [0, 1] as an opaque colour from a pale tint (f = 0) to the kind's
   * colour (f = 1): lighter is less, so opaque shades compare without adding up. */
  function ramp(kind, f) {
    const hex = colours[kind] || "#555555";
    const t = 0.12 + 0.88 * Math.min(1, Math.max(0, f));
    const channel = function (k) {
      const c = parseInt(hex.slice(1 + 2 * k, 3 + 2 * k), 16);
      return Math.round(255 + (c - 255) * t);
    };
    return "rgb(" + channel(0) + ", " + channel(1) + ", " + channel(2) + ")";
  }

  function imageKey(id) {
    return "img/" + String(id % 1000).padStart(3, "0") + "/" + id + ".js";
  }

  function indexPageKey(page) {
    return "index/p" + String(page).padStart(5, "0") + ".js";
  }

  function bucketKey(bucket) {
    return "words/b" + String(bucket).padStart(4, "0") + ".js";
  }

  /** IEEE half (uint16) -> number, exactly. */
  function halfToNumber(h) {
    const sign = (h & 0x8000) ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    if (exp === 0) return sign * frac * Math.pow(2, -24);
    if (exp === 31) return frac ? NaN : sign * Infinity;
    return sign * (1 + frac / 1024) * Math.pow(2, exp - 15);
  }

  /** {shape, f16: base64 little-endian float16} -> {shape, data: Float64Array}. A top-k map
   * ({k, f16: kept values, idx: their uint16 columns}, encode.encode_top_k) comes back dense, its
   * dropped weights 0, with its k, max_missing and max_dropped. */
  function decodeMap(encoded) {
    const bin = atob(encoded.f16);
    const n = bin.length >> 1;
    const values = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      values[i] = halfToNumber(bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8));
    }
    if (!encoded.k) return { shape: encoded.shape, data: values };
    const idx = atob(encoded.idx);
    const C = encoded.shape[encoded.shape.length - 1];
    const data = new Float64Array(n / encoded.k * C);
    for (let i = 0; i < n; i++) {
      const row = Math.floor(i / encoded.k);
      data[row * C + (idx.charCodeAt(2 * i) | (idx.charCodeAt(2 * i + 1) << 8))] = values[i];
    }
    return { shape: encoded.shape, data: data, k: encoded.k, max_missing: encoded.max_missing,
             max_dropped: encoded.max_dropped };
  }

  /** Row r of layer l of a decoded [L, H, R, C] map, for head h or the mean over heads ("mean").
   * null when the layer or head is not in the map. */
  function mapRow(map, layer, head, row) {
    const [L, H, R, C] = map.shape;
    if (layer >= L || row >= R) return null;
    const heads = head === "mean" ? Array.from({ length: H }, (_, k) => k) : [Number(head)];
    if (heads[0] >= H) return null;
    const out = new Array(C).fill(0);
    for (const h of heads) {
      const base = ((layer * H + h) * R + row) * C;
      for (let c = 0; c < C; c++) out[c] += map.data[base + c];
    }
    if (heads.length > 1) for (let c = 0; c < C; c++) out[c] /= heads.length;
    return out;
  }

  /** Search words: lower-cased runs of letters, digits and "_" (as encode.words_of). */
  function words(text) {
    return String(text).toLowerCase().match(/[\p{L}\p{N}_]+/gu) || [];
  }

  /** FNV-1a (32 bit) of the UTF-16 code units, modulo n (as encode.word_bucket). */
  function wordBucket(word, n) {
    let h = 0x811c9dc5;
    for (let i = 0; i < word.length; i++) {
      h ^= word.charCodeAt(i);
      h = Math.imul(h, 0x01000193) >>> 0;
    }
    return h % n;
  }

  function hashState() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    const state = {};
    for (const [k, v] of params) state[k] = v;
    return state;
  }

  function hashOf(state) {
    const params = new URLSearchParams();
    for (const k of Object.keys(state)) {
      if (state[k] !== null && state[k] !== undefined && state[k] !== "") params.set(k, state[k]);
    }
    return "#" + params.toString();
  }

  /** el("div", {class: "x", onclick: f}, child, "text", ...) */
  function el(tag, attrs) {
    const svg = ["svg", "rect", "text", "image", "g", "line", "polyline", "circle", "title", "path"].includes(tag);
    const node = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (let i = 2; i < arguments.length; i++) {
      const child = arguments[i];
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fmt(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "n/a";
    if (value === 0) return "0";
    return Math.abs(value) >= 0.001 ? value.toFixed(4) : value.toExponential(2);
  }

  function showError(err) {
    const box = document.getElementById("status");
    if (box) {
      box.textContent = "Error: " + (err && err.message ? err.message : err);
      box.className = "error";
    }
  }

  const MAP_TITLES = {
    encoder_self: "encoder self-attention",
    decoder_self: "decoder self-attention",
    cross: "cross-attention",
  };

  return {
    load, imageKey, indexPageKey, bucketKey, decodeMap, mapRow, halfToNumber, words, wordBucket,
    hashState, hashOf, el, fmt, showError, MAP_TITLES, pageOf, setColours, ramp, colours,
  };
})();
