/* geocap view: the index of a dump's images, paged, searchable by image id and caption words.
 * State lives in the location hash: #q=<query>&p=<page, from 1>. A new page or query shows
 * its list from the top (the scroll position of the previous list means nothing there). */
"use strict";

(function () {
  const G = Geocap;
  let manifest = null;

  async function entryOf(id) {
    const page = G.pageOf(manifest, id);
    if (page < 0) return null;
    const entries = await G.load(G.indexPageKey(page));
    return entries.find(function (e) { return e.id === id; }) || null;
  }

  async function idsOfWord(word) {
    const bucket = await G.load(G.bucketKey(G.wordBucket(word, manifest.word_buckets)));
    const deltas = bucket[word];
    if (!deltas) return [];
    const ids = new Array(deltas.length);
    let id = 0;
    for (let i = 0; i < deltas.length; i++) { id += deltas[i]; ids[i] = id; }
    return ids;
  }

  /** Image ids matching the query: the image of that id (when the query is a number) first,
   * then the images whose captions hold every word of the query, by id. */
  async function search(query) {
    const out = [];
    const trimmed = query.trim();
    if (/^\d+$/.test(trimmed)) {
      const entry = await entryOf(Number(trimmed));
      if (entry) out.push(entry.id);
    }
    const words = Array.from(new Set(G.words(trimmed)));
    if (words.length) {
      let matches = null;
      for (const word of words) {
        const ids = await idsOfWord(word);
        if (matches === null) matches = ids;
        else {
          const keep = new Set(ids);
          matches = matches.filter(function (id) { return keep.has(id); });
        }
        if (!matches.length) break;
      }
      for (const id of matches) if (!out.includes(id)) out.push(id);
    }
    return out;
  }

  function renderEntry(entry) {
    const caps = G.el("ul", { class: "captions" });
    for (const [kind, text] of entry.caps) {
      caps.append(G.el("li", { class: "caption" }, G.el("span", { class: "kind kind-" + kind, text: kind }), " ", text));
    }
    return G.el("li", { class: "entry", "data-id": entry.id },
      G.el("a", { class: "image-link", href: "image.html#id=" + entry.id, text: "image " + entry.id }),
      G.el("span", { class: "meta" }, " · " + (entry.patches
        ? entry.patches[0] + " patches" + (entry.patches[1] ? " + " + entry.patches[1] + " special token" +
          (entry.patches[1] > 1 ? "s" : "") : "")
        : entry.n + " objects") + " · " + entry.caps.length + " captions" +
        (entry.img ? "" : " · no image file")),
      caps);
  }

  function renderPager(page, pages, query) {
    const nav = document.getElementById("pager");
    nav.replaceChildren();
    if (pages <= 1) return;
    const link = function (label, target, id) {
      if (target < 1 || target > pages || target === page) return G.el("span", { class: "disabled", id: id, text: label });
      return G.el("a", { id: id, href: G.hashOf({ q: query, p: target }), text: label });
    };
    nav.append(link("« first", 1, "first-page"), " ", link("‹ previous", page - 1, "prev-page"), " ",
      G.el("span", { id: "page-number", text: "page " + page + " of " + pages }), " ",
      link("next ›", page + 1, "next-page"), " ", link("last »", pages, "last-page"));
  }

  let renderSerial = 0;
  let shownList = null;        // "query|page" of the list shown

  async function render() {
    const serial = ++renderSerial;
    const state = G.hashState();
    const query = state.q || "";
    let page = Math.max(1, parseInt(state.p || "1", 10) || 1);
    document.getElementById("query").value = query;
    const status = document.getElementById("status");
    const list = document.getElementById("results");
    let entries, pages, total;
    if (!query.trim()) {
      pages = manifest.pages.length;
      page = Math.min(page, pages);
      entries = await G.load(G.indexPageKey(page - 1));
      total = manifest.images;
      if (serial !== renderSerial) return;
      status.textContent = total + " images, " + manifest.records + " records";
    } else {
      const ids = await search(query);
      pages = Math.max(1, Math.ceil(ids.length / manifest.page_size));
      page = Math.min(page, pages);
      const shown = ids.slice((page - 1) * manifest.page_size, page * manifest.page_size);
      entries = (await Promise.all(shown.map(entryOf))).filter(Boolean);
      total = ids.length;
      if (serial !== renderSerial) return;
      status.textContent = total + (total === 1 ? " image matches " : " images match ") + JSON.stringify(query.trim());
    }
    status.className = "";
    list.replaceChildren.apply(list, entries.map(renderEntry));
    renderPager(page, pages, query);
    const shown = query.trim() + "|" + page;
    if (shownList !== null && shown !== shownList) window.scrollTo(0, 0);
    shownList = shown;
    document.body.setAttribute("data-ready", "index");
  }

  function renderHeader() {
    document.getElementById("title").textContent = "geocap attention viewer: " + manifest.title;
    document.title = "geocap view: " + manifest.title;
    const links = document.getElementById("links");
    if (manifest.report_href) links.append(G.el("a", { id: "report-link", href: manifest.report_href, text: "analysis report" }));
    if (manifest.box_embedding && manifest.box_embedding.startsWith("patches:")) {
      links.append(G.el("span", { id: "box-embedding", "data-embedding": "patches",
        text: "image tokens: the patches of " + manifest.box_embedding.slice(8) +
          " (a patch encoder: no box geometry)" }));
    } else if (manifest.box_embedding) {
      const what = { ort: "ORT's (|offset| between box centres: mirror images look alike)",
                     signed: "signed (offsets between box centres with their sign)",
                     none: "none (a model without geometry)" }[manifest.box_embedding] || manifest.box_embedding;
      if (links.childNodes.length) links.append(" · ");      // not "analysis reportbox embedding"
      links.append(G.el("span", { id: "box-embedding", "data-embedding": manifest.box_embedding,
                                  text: "box embedding: " + what }));
    }
    const notices = document.getElementById("notices");
    for (const name of Object.keys(G.MAP_TITLES)) {
      const missing = manifest.missing[name];
      if (!missing) continue;
      const text = missing === manifest.records
        ? "This dump has no " + G.MAP_TITLES[name] + " maps."
        : missing + " of " + manifest.records + " records have no " + G.MAP_TITLES[name] + " maps.";
      notices.append(G.el("p", { class: "notice missing", "data-map": name, text: text }));
    }
  }

  async function start() {
    try {
      manifest = await G.load("manifest.js");
      G.setColours(manifest);
      renderHeader();
      document.getElementById("search-form").addEventListener("submit", function (event) {
        event.preventDefault();
        const target = G.hashOf({ q: document.getElementById("query").value.trim(), p: 1 });
        if (target === location.hash) render().catch(G.showError);
        else location.hash = target;
      });
      document.getElementById("clear-button").addEventListener("click", function () {
        location.hash = G.hashOf({ p: 1 });
      });
      window.addEventListener("hashchange", function () { render().catch(G.showError); });
      await render();
    } catch (err) {
      G.showError(err);
    }
  }

  start();
})();
