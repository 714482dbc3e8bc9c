// selfalign search page: plain JS, no build step. Images load through fetch() so the bearer token (if any)
// travels in a header, never in a URL; every text from the server is set with textContent (no HTML injection).
"use strict";

const $ = (id) => document.getElementById(id);
const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
                 "#469990", "#808000"];
const state = { token: "", query: "", urls: [], run: 0 };

function readToken() {
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    sessionStorage.setItem("selfalign-token", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);  // keep it out of the address bar
  }
  state.token = sessionStorage.getItem("selfalign-token") || "";
  $("token").value = state.token;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    if (response.status === 401) $("token-box").open = true;
    throw new Error(message);
  }
  return response;
}

async function blobUrl(path) {
  const url = URL.createObjectURL(await (await api(path)).blob());
  state.urls.push(url);
  return url;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function clearResults() {
  state.urls.forEach((u) => URL.revokeObjectURL(u));
  state.urls = [];
  $("results").replaceChildren();
  $("captions").replaceChildren();
  $("captions").hidden = true;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function loadInto(img, path, run) {
  blobUrl(path).then((url) => { if (run === state.run) img.src = url; })
    .catch(() => { img.alt = "image unavailable"; });
}

function renderImages(hits, withExplain) {
  const run = state.run;
  const list = $("results");
  hits.forEach((hit, i) => {
    const item = el("li", "result");
    item.tabIndex = 0;
    item.dataset.id = hit.id;
    item.title = hit.image_id + " (score " + hit.score.toFixed(3) + ")";
    const img = el("img", "thumb");
    img.alt = hit.image_id;
    img.decoding = "async";
    loadInto(img, hit.thumbnail, run);
    const meta = el("div", "meta");
    meta.append(el("span", "name", (i + 1) + ". " + hit.image_id), el("span", "score", hit.score.toFixed(3)));
    item.append(img, meta);
    const open = () => openExplain(hit, withExplain ? state.query : "");
    item.addEventListener("click", open);
    item.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); }
    });
    list.append(item);
  });
}

function renderCaptions(hits) {
  const run = state.run;
  const list = $("captions");
  list.hidden = false;
  hits.forEach((hit) => {
    const item = el("li");
    const img = el("img");
    img.alt = hit.image_id || "";
    loadInto(img, "/api/thumbnails/" + hit.image, run);
    item.append(img, el("span", "text", hit.text), el("span", "score", hit.score.toFixed(3)));
    item.addEventListener("click", () => openExplain({ id: hit.image, image_id: hit.image_id }, hit.text));
    list.append(item);
  });
}

async function searchText(event) {
  event.preventDefault();
  const q = $("q").value.trim();
  if (!q) return;
  state.query = q;
  state.run += 1;
  clearResults();
  setStatus("Searching…");
  const started = performance.now();
  try {
    const params = new URLSearchParams({ q, k: $("k").value });
    const data = await (await api("/api/search?" + params)).json();
    renderImages(data.results, true);
    const ms = Math.round(performance.now() - started);
    setStatus(data.results.length + " images for “" + q + "” (" + ms + " ms). " +
              "Click one to see which region each word matches.");
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function searchImage() {
  const file = $("file").files[0];
  if (!file) return;
  state.query = "";
  state.run += 1;
  clearResults();
  const target = $("target").value;
  setStatus("Searching with " + file.name + "…");
  try {
    const form = new FormData();
    form.append("file", file);
    form.append("k", $("k").value);
    form.append("target", target);
    const data = await (await api("/api/search/image", { method: "POST", body: form })).json();
    if (target === "captions") renderCaptions(data.results); else renderImages(data.results, false);
    setStatus(data.results.length + (target === "captions" ? " captions" : " images") + " for " + file.name + ".");
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    $("file").value = "";
  }
}

// ---- explanation: each query word's best region drawn over the image ---------------------------------
function highlight(region) {
  document.querySelectorAll("#boxes rect, #labels .label").forEach((n) => {
    n.classList.toggle("dim", region !== null && n.dataset.region !== String(region));
  });
  document.querySelectorAll("#legend li").forEach((n) => {
    n.classList.toggle("active", region !== null && n.dataset.region === String(region));
  });
}

function drawRegions(words) {
  const svg = $("boxes");
  const labels = $("labels");
  const groups = new Map();  // one box per region, labelled with every word that chose it
  words.forEach((w) => {
    if (!groups.has(w.region)) groups.set(w.region, { box: w.box, words: [] });
    groups.get(w.region).words.push(w);
  });
  let c = 0;
  groups.forEach((group, region) => {
    group.colour = COLOURS[c++ % COLOURS.length];
    const [x1, y1, x2, y2] = group.box;
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    rect.setAttribute("x", x1); rect.setAttribute("y", y1);
    rect.setAttribute("width", Math.max(x2 - x1, 0.002)); rect.setAttribute("height", Math.max(y2 - y1, 0.002));
    rect.setAttribute("stroke", group.colour);
    rect.dataset.region = region;
    svg.append(rect);
    const label = el("span", "label" + (y1 < 0.08 ? " inside" : ""),
                     group.words.map((w) => w.word).join(" · "));
    label.style.left = (x1 * 100) + "%";
    label.style.top = (y1 * 100) + "%";
    label.style.background = group.colour;
    label.dataset.region = region;
    labels.append(label);
  });
  return groups;
}

async function openExplain(hit, query) {
  const run = state.run;
  $("boxes").replaceChildren();
  $("labels").replaceChildren();
  $("legend").replaceChildren();
  $("explain-img").removeAttribute("src");
  $("explain-title").textContent = hit.image_id || "Image " + hit.id;
  $("explain-note").textContent = query ? "Aligning “" + query + "”…" : "";
  $("explain").hidden = false;
  $("close").focus();
  try {
    const [url, data] = await Promise.all([
      blobUrl("/api/images/" + hit.id),
      query ? api("/api/explain?" + new URLSearchParams({ q: query, id: hit.id })).then((r) => r.json()) : null,
    ]);
    if (run !== state.run || $("explain").hidden) return;
    $("explain-img").src = url;
    if (!data) {
      $("explain-note").textContent = "Word regions are shown for text queries.";
      return;
    }
    const groups = drawRegions(data.words);
    $("explain-note").textContent = "Score " + data.score.toFixed(3) +
      ". Each word of the query and the region it aligns with best (cosine of local features):";
    data.words.forEach((w) => {
      const item = el("li");
      item.dataset.region = w.region;
      const chip = el("span", "chip");
      chip.style.background = groups.get(w.region).colour;
      item.append(chip, el("span", w.known ? "" : "unknown", w.word + (w.known ? "" : " (unknown word)")),
                  el("span", "score", w.score.toFixed(2)));
      item.addEventListener("mouseenter", () => highlight(w.region));
      item.addEventListener("mouseleave", () => highlight(null));
      item.addEventListener("click", () => highlight(item.classList.contains("active") ? null : w.region));
      $("legend").append(item);
    });
  } catch (e) {
    $("explain-note").textContent = e.message;
  }
}

function closeExplain() { $("explain").hidden = true; }

async function showInfo() {
  try {
    const info = await (await api("/api/info")).json();
    setStatus(info.images + " images" + (info.has_captions ? " and " + info.captions + " captions" : "") +
              " indexed. Type a description, or search by image.");
    if (!info.has_captions) $("target").querySelector("[value=captions]").disabled = true;
  } catch (e) {
    setStatus(e.message, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  readToken();
  $("search-form").addEventListener("submit", searchText);
  $("file").addEventListener("change", searchImage);
  $("token").addEventListener("change", () => {
    state.token = $("token").value.trim();
    sessionStorage.setItem("selfalign-token", state.token);
    showInfo();
  });
  $("close").addEventListener("click", closeExplain);
  $("explain").addEventListener("click", (e) => { if (e.target === $("explain")) closeExplain(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeExplain(); });
  showInfo();
  $("q").focus();
});
