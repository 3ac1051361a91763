// edge-t2t serve: the page. Everything comes from this server's JSON API; no other host is reached
// (the server's Content-Security-Policy forbids it anyway).
"use strict";

const $ = (id) => document.getElementById(id);
let current = null; // {kind: "text"|"like"|"example", params: URLSearchParams, hits: [...]}
let selected = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

function say(text) { $("message").textContent = text || ""; }

async function getJSON(url, options) {
  const resp = await fetch(url, options);
  // Signed out (the server restarted with a new token): the page itself then asks for the token.
  if (resp.status === 401) location.reload();
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) throw new Error((body && body.error) || `${resp.status} ${resp.statusText}`);
  return body;
}

function formParams() {
  const p = new URLSearchParams();
  p.set("q", $("q").value);
  p.set("k", $("k").value || "10");
  p.set("mode", $("mode").value);
  if ($("min-score").value !== "") p.set("min_score", $("min-score").value);
  if ($("explain").checked) p.set("explain", "1");
  return p;
}

function fillForm(p) {
  $("q").value = p.get("q") || "";
  if (p.get("k")) $("k").value = p.get("k");
  if (p.get("mode")) $("mode").value = p.get("mode");
  $("min-score").value = p.get("min_score") || "";
  $("explain").checked = p.get("explain") === "1";
}

function explainText(h) {
  const parts = [];
  for (const key of ["dense", "lexical", "structure"]) {
    if (h[key] !== undefined && h[key] !== null) parts.push(`${key} ${Number(h[key]).toFixed(3)}`);
  }
  for (const m of h.matched || []) {
    parts.push(`${m.constraint}: ${m.score >= 1 ? "yes" : m.score > 0 ? "partly" : "no"}`);
  }
  return parts.join("; ");
}

// A score above 1 is text + place (docs/search.md "Scores"): say so on each card when any hit has a
// place part. text_score is the score without its place part (search --json's field).
function scoreText(h, places) {
  const score = `score ${Number(h.score).toFixed(4)}`;
  if (!places || h.text_score === undefined) return score;
  const place = Math.max(0, h.score - h.text_score);
  return `${score} = text ${Number(h.text_score).toFixed(3)} + place ${place.toFixed(3)}`;
}

function showHits(title, data, kind, params) {
  current = { kind, params, hits: data.hits };
  $("results-title").textContent = `${title}: ${data.count} result${data.count === 1 ? "" : "s"}`;
  const places = data.hits.some((h) => h.structure > 0);
  $("score-legend").hidden = !places;
  const grid = $("results");
  grid.replaceChildren();
  for (const h of data.hits) {
    const thumb = el("img", { src: `/thumb/${h.id}`, alt: h.image, loading: "lazy" });
    // An indexed image whose file is not on this machine (e.g. imported captions): say so.
    thumb.addEventListener("error", () => thumb.replaceWith(el("div", { class: "ph", text: "image not available here" })));
    const card = el("div", { class: "hit", "data-id": String(h.id), "data-image": h.image, tabindex: "0" },
      thumb,
      el("div", { class: "meta", text: `#${h.rank}  ${scoreText(h, places)}` }),
      el("div", { class: "path", text: h.scene ? `${h.scene} chip ${h.window.join(",")}` : h.image }),
      el("div", { class: "text", text: h.text }),
      params && params.get("explain") === "1" ? el("div", { class: "why", text: explainText(h) }) : null);
    card.addEventListener("click", () => openImage(h.id));
    card.addEventListener("keydown", (e) => { if (e.key === "Enter") openImage(h.id); });
    grid.append(card);
  }
  // Exports re-run the same query on the server (GeoJSON merges overlapping chips, as `search --geojson`).
  const exportable = kind !== "example";
  $("exports").hidden = !exportable || data.count === 0;
  if (exportable) {
    const q = new URLSearchParams(params);
    $("export-csv").href = `/api/export.csv?${q}`;
    $("export-geojson").href = `/api/export.geojson?${q}`;
  }
  drawMap(data.hits);
}

// A plain map: the hits' outlines (WGS84 rings from the index), drawn as SVG, scaled to fit.
function drawMap(hits) {
  const placed = hits.filter((h) => h.outline && h.outline.length > 2);
  const box = $("map");
  box.replaceChildren();
  box.hidden = placed.length === 0;
  if (!placed.length) return;
  const ns = "http://www.w3.org/2000/svg";
  const pts = placed.flatMap((h) => h.outline);
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  const kx = Math.cos(((y0 + y1) / 2) * Math.PI / 180); // degrees of longitude shrink with latitude
  const W = 720, H = 360, pad = 20;
  const s = Math.min((W - 2 * pad) / Math.max((x1 - x0) * kx, 1e-9), (H - 2 * pad) / Math.max(y1 - y0, 1e-9));
  const px = (p) => [pad + (p[0] - x0) * kx * s, H - pad - (p[1] - y0) * s];
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("id", "map-svg");
  for (const h of placed.slice().reverse()) {
    const ring = h.outline.map(px);
    const poly = document.createElementNS(ns, "polygon");
    poly.setAttribute("points", ring.map((p) => p.map((v) => v.toFixed(1)).join(",")).join(" "));
    poly.setAttribute("data-id", String(h.id));
    const tip = document.createElementNS(ns, "title");
    tip.textContent = `#${h.rank} ${h.image}`;
    poly.append(tip);
    poly.addEventListener("click", () => openImage(h.id));
    const label = document.createElementNS(ns, "text");
    const cx = ring.reduce((a, p) => a + p[0], 0) / ring.length, cy = ring.reduce((a, p) => a + p[1], 0) / ring.length;
    label.setAttribute("x", cx.toFixed(1));
    label.setAttribute("y", cy.toFixed(1));
    label.textContent = String(h.rank);
    svg.append(poly, label);
  }
  const note = el("div", { class: "path", text: `lon ${x0.toFixed(5)}…${x1.toFixed(5)}, lat ${y0.toFixed(5)}…${y1.toFixed(5)} (north up)` });
  box.append(svg, note);
}

async function runText(params, push) {
  if (!(params.get("q") || "").trim()) return;
  if (push) history.pushState(null, "", `/?${params}`);
  say("searching…");
  try {
    const data = await getJSON(`/api/search?${params}`);
    say("");
    showHits(`“${params.get("q")}”`, data, "text", params);
  } catch (e) { say(e.message); }
}

async function runLike(id, push) {
  const p = new URLSearchParams({ like: String(id), k: $("k").value || "10" });
  if ($("min-score").value !== "") p.set("min_score", $("min-score").value);
  if (push) history.pushState(null, "", `/?${p}`);
  say("searching…");
  try {
    const q = new URLSearchParams(p);
    q.set("id", String(id));
    q.delete("like");
    const data = await getJSON(`/api/similar?${q}`);
    say("");
    showHits(`More like image ${id}`, data, "like", p);
  } catch (e) { say(e.message); }
}

async function runExample(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  form.append("k", $("k").value || "10");
  say(`describing ${file.name}…`);
  try {
    const data = await getJSON("/api/search-by-image", { method: "POST", body: form });
    say("");
    showHits(`Like ${file.name}`, data, "example", null);
  } catch (e) { say(e.message); }
}

async function openImage(id) {
  selected = id;
  for (const c of document.querySelectorAll(".hit")) c.classList.toggle("selected", c.dataset.id === String(id));
  try {
    const d = await getJSON(`/api/image?id=${encodeURIComponent(id)}`);
    $("detail").hidden = false;
    $("detail-title").textContent = d.chip ? `${d.chip.scene}, chip ${d.chip.window.join(",")}` : d.image;
    const pics = $("detail-pictures");
    pics.replaceChildren(el("img", { id: "detail-image", src: `/image/${id}`, alt: d.image }));
    if (d.chip) {
      pics.append(el("div", { class: "path", text: "its place in the scene (outlined in red):" }),
        el("img", { id: "detail-scene", src: `/image/${id}/scene`, alt: `scene ${d.chip.scene}` }));
    }
    const list = $("variants");
    list.replaceChildren();
    for (const v of d.variants) {
      const feats = (v.features || []).map((f) => [f.size, f.name, f.position].filter(Boolean).join(" ")).join("; ");
      list.append(el("li", {}, el("strong", { text: v.one_sentence || "" }),
        feats ? el("div", { class: "path", text: feats }) : null, el("div", { text: v.caption || "" })));
    }
  } catch (e) { say(e.message); }
}

async function loadStatus() {
  try {
    const info = await getJSON("/api/info");
    const c = info.counts;
    const rows = [
      ["index", info.index],
      ["images", `${c.images_ok} ok, ${c.images_failed} failed`],
      ["texts", `${c.texts} (${c.vectors} in the vector snapshot)`],
      ["embedder", `${info.embedder.name || "?"} dim ${info.embedder.dim || "?"}`],
      ["vectors", `${info.dtype}, text mode ${info.text_mode}`],
      ...info.descriptions.map((d) => ["descriptions", `${d.images} images by ${d.model}${d.test_model ? " [TEST MODEL]" : ""}`]),
    ];
    if (info.last_run) rows.push(["last run", `${info.last_run.status}, finished ${info.last_run.finished ? new Date(info.last_run.finished * 1000).toLocaleString() : "-"}`]);
    const table = el("table", { id: "status-table" });
    for (const [k, v] of rows) table.append(el("tr", {}, el("td", { text: k }), el("td", { text: String(v) })));
    $("status-body").replaceChildren(table);
  } catch (e) { $("status-body").textContent = e.message; }
}

function fromLocation() {
  const p = new URLSearchParams(location.search);
  fillForm(p);
  if (p.get("like")) runLike(p.get("like"), false);
  else if (p.get("q")) runText(formParams(), false);
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); runText(formParams(), true); });
  $("upload").addEventListener("change", (e) => runExample(e.target.files[0]));
  $("more-like").addEventListener("click", () => { if (selected !== null) runLike(selected, true); });
  $("close-detail").addEventListener("click", () => { $("detail").hidden = true; });
  document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    runExample(e.dataTransfer.files[0]);
  });
  window.addEventListener("popstate", fromLocation);
  fromLocation();
  loadStatus();
});
