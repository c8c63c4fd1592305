// dpsync status page: polls /v1/status and updates the server-rendered page in place.
// It follows the rules of crates/site/src/web/view.rs (rank, groups, texts, paging);
// every value from the server goes into the page as text, never as markup.
"use strict";

(function () {
  const PAGE = Number(document.body.dataset.pageSize) || 50;
  const pages = new Map(); // package id -> page index
  let filter = "";
  let lastOk = Date.now();
  let timer = null;

  const RANK = { failed: 0, validation_failed: 0, retrying: 1, in_progress: 2, validating: 2, removing: 2,
    waiting_window: 3, pending: 3, installed: 5, removed: 6 };
  const rank = (s) => (s in RANK ? RANK[s] : 4);
  const group = (s) => ["failing", "failing", "active", "waiting", "other", "installed", "other"][rank(s)];

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let v = Math.max(0, n), u = 0;
    while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
    return u === 0 ? Math.round(v) + " B" : v.toFixed(1) + " " + units[u];
  }
  function span(ms) {
    const s = Math.floor(Math.max(0, ms) / 1000);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    if (s < 86400) return Math.floor(s / 3600) + " h";
    return Math.floor(s / 86400) + " d";
  }
  const ago = (now, at) => (now - at < 1000 ? "just now" : span(now - at) + " ago");
  const took = (ms) => (ms < 10000 ? (Math.max(0, ms) / 1000).toFixed(1) + " s" : span(ms));
  const num = (v) => (typeof v === "number" ? v : null);

  function sorted(targets) {
    return (targets || []).slice().sort((a, b) =>
      rank(a.state) - rank(b.state) || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }
  function count(targets, c) {
    for (const t of targets || []) {
      c[group(t.state)]++;
      count(t.targets, c);
    }
    return c;
  }
  const zero = () => ({ installed: 0, active: 0, waiting: 0, failing: 0, other: 0 });
  function countsText(c) {
    const parts = [[c.failing, "failing"], [c.active, "in progress"], [c.waiting, "waiting"],
      [c.installed, "installed"], [c.other, "other"]].filter((p) => p[0] > 0).map((p) => p[0] + " " + p[1]);
    return parts.length ? parts.join(" · ") : "no targets";
  }

  function progress(t, now) {
    const p = t.progress;
    if (!p || typeof p !== "object") return null;
    const phase = String(p.phase || "").replace(/_/g, " ");
    const planned = num(p.bytes_planned) || 0, done = num(p.bytes_done) || 0;
    if (planned <= 0) return { fraction: null, text: phase };
    const fraction = Math.min(1, Math.max(0, done / planned));
    let text = bytes(done) + " / " + bytes(planned);
    const secs = (now - (num(p.started_ms) || now)) / 1000;
    if (secs > 0.5 && done > 0) {
      const rate = done / secs;
      text += " · " + bytes(rate) + "/s · " + span(((planned - done) / rate) * 1000) + " left";
    }
    return { fraction, text };
  }
  function next(t, now) {
    const when = (at) => (at > now ? "in " + span(at - now) : "now");
    if (num(t.next_window_at) !== null) return "window opens " + when(t.next_window_at);
    let retry = num(t.next_retry_at);
    if (retry === null && t.state === "retrying") retry = num(t.next_attempt_at);
    return retry === null ? "" : "retry " + when(retry);
  }
  function versions(t) {
    const i = num(t.installed_version), d = num(t.desired_version) > 0 ? t.desired_version : null;
    if (i !== null && d !== null && d !== i && t.state !== "removed") return "v" + i + " → v" + d;
    if (i !== null) return "v" + i;
    if (d !== null && t.state !== "removed" && t.state !== "removing") return "– → v" + d;
    return "–";
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function setText(e, text) {
    if (e.textContent !== text) e.textContent = text;
  }
  function setAttr(e, name, value) {
    if (value === null) { if (e.hasAttribute(name)) e.removeAttribute(name); }
    else if (e.getAttribute(name) !== value) e.setAttribute(name, value);
  }

  function newRow() {
    const tr = el("tr", "row");
    const name = el("td", "name");
    tr.append(name, el("td", "kind"), el("td", "state"), el("td", "ver"), el("td", "prog"), el("td", "err"),
      el("td", "next"));
    tr.children[2].append(el("span", "pill"));
    const bar = el("progress");
    bar.max = 1;
    bar.hidden = true;
    tr.children[4].append(bar, el("span", "ptext"));
    const ebox = el("div", "ebox");
    ebox.append(el("span", "eage"), el("span", "etext"));
    tr.children[5].append(ebox);
    return tr;
  }
  function updateRow(tr, t, now, parent) {
    const state = String(t.state || "");
    tr.classList.toggle("nested", !!parent);
    setAttr(tr, "data-target", t.name);
    setAttr(tr, "data-state", state);
    setAttr(tr, "data-group", group(state));
    const c = tr.children;
    let via = c[0].querySelector(".via");
    const label = t.name;
    if (parent) {
      if (!via) { via = el("span", "via"); c[0].textContent = ""; c[0].append(via, document.createTextNode("")); }
      setText(via, parent + " › ");
      if (c[0].lastChild.nodeValue !== label) c[0].lastChild.nodeValue = label;
    } else if (c[0].textContent !== label || via) {
      c[0].textContent = label;
    }
    setAttr(c[0], "title", t.name);
    setText(c[1], String(t.kind || ""));
    const pill = c[2].firstChild;
    setAttr(pill, "class", "pill g-" + group(state));
    setText(pill, state.replace(/_/g, " "));
    setText(c[3], versions(t));
    const p = progress(t, now), bar = c[4].firstChild;
    if (p && p.fraction !== null) {
      bar.hidden = false;
      if (bar.value !== p.fraction) bar.value = p.fraction;
      setAttr(bar, "title", Math.round(p.fraction * 100) + " %");
    } else bar.hidden = true;
    setText(c[4].lastChild, p ? p.text : "");
    const err = typeof t.last_error === "string" && t.last_error ? t.last_error : null;
    setAttr(c[5], "title", err);
    const ebox = c[5].firstChild;
    setText(ebox.lastChild, err || "");
    const at = num(t.last_error_at) !== null ? t.last_error_at : num(t.updated_at);
    setText(ebox.firstChild, err && at !== null ? ago(now, at) : "");
    setText(c[6], next(t, now));
  }
  function updateBody(tbody, t, now) {
    setAttr(tbody, "data-name", t.name);
    const rows = [t].concat(sorted(t.targets));
    while (tbody.rows.length < rows.length) tbody.append(newRow());
    while (tbody.rows.length > rows.length) tbody.lastElementChild.remove();
    rows.forEach((r, i) => updateRow(tbody.rows[i], r, now, i === 0 ? null : t.name));
  }

  function matches(t) {
    if (!filter) return true;
    const hay = (t.name + " " + t.state + " " + (t.last_error || "")).toLowerCase();
    return hay.includes(filter) || (t.targets || []).some(matches);
  }

  function newSection(id) {
    const s = el("section", "pkg");
    s.id = "pkg-" + id;
    s.dataset.package = id;
    const head = el("div", "pkg-head");
    const h2 = el("h2");
    h2.append(el("span", "pkg-id", id), document.createTextNode(" "), el("span", "pkg-name"));
    const dl = el("dl", "facts");
    for (const [label, cls] of [["source version", "f-version"], ["content root", "f-root mono"],
      ["source site", "f-site"], ["last refresh", "f-refresh"], ["schedule", "f-schedule"], ["targets", "f-counts"]]) {
      const d = el("div");
      d.append(el("dt", "", label), el("dd", cls));
      dl.append(d);
    }
    head.append(h2, dl);
    const table = el("table", "targets");
    const cg = el("colgroup");
    for (const c of ["name", "kind", "state", "ver", "prog", "err", "next"]) cg.append(el("col", "c-" + c));
    const thead = el("thead"), tr = el("tr");
    for (const h of ["Target", "Kind", "State", "Version", "Progress", "Last error", "Next"]) tr.append(el("th", "", h));
    thead.append(tr);
    table.append(cg, thead);
    const pager = el("div", "pager");
    const prevButton = el("button", "prev", "‹ Previous"), nextButton = el("button", "next", "Next ›");
    prevButton.type = nextButton.type = "button";
    pager.append(prevButton, el("span", "range"), nextButton);
    s.append(head, table, pager);
    return s;
  }
  function wirePager(s) {
    if (s.dataset.wired) return;
    s.dataset.wired = "1";
    const id = s.dataset.package;
    s.querySelector(".pager .prev").addEventListener("click", () => { pages.set(id, Math.max(0, (pages.get(id) || 0) - 1)); render(); });
    s.querySelector(".pager .next").addEventListener("click", () => { pages.set(id, (pages.get(id) || 0) + 1); render(); });
  }

  function refreshText(p, now) {
    const r = p.last_refresh;
    if (!r || typeof r !== "object") return ["never", ""];
    const at = num(r.at) !== null ? ago(now, r.at) : "";
    const dur = num(r.duration_ms) !== null ? " · took " + took(r.duration_ms) : "";
    return r.ok ? ["ok · " + at + dur, "ok"] : ["failed · " + at + dur + ": " + (r.error || ""), "bad"];
  }

  function updateSection(s, p, now) {
    const id = p.package;
    setText(s.querySelector(".pkg-name"), String(p.name || ""));
    setText(s.querySelector(".f-version"), "v" + (num(p.source_version) || 0));
    const root = String(p.content_root || "");
    const rootEl = s.querySelector(".f-root");
    setText(rootEl, root.slice(0, 12));
    setAttr(rootEl, "title", root);
    setText(s.querySelector(".f-site"), String(p.source_site || ""));
    const [rt, rc] = refreshText(p, now);
    const rEl = s.querySelector(".f-refresh");
    setText(rEl, rt);
    setAttr(rEl, "title", rt);
    setAttr(rEl, "class", "f-refresh " + rc);
    const sched = typeof p.schedule === "string" ? p.schedule : typeof p.refresh_every === "string" ? p.refresh_every : null;
    setText(s.querySelector(".f-schedule"), sched ? "every " + sched : "manual");
    setText(s.querySelector(".f-counts"), countsText(count(p.targets, zero())));

    const all = sorted(p.targets).filter(matches);
    const last = Math.max(0, Math.ceil(all.length / PAGE) - 1);
    const page = Math.min(pages.get(id) || 0, last);
    pages.set(id, page);
    const shown = all.slice(page * PAGE, page * PAGE + PAGE);
    const table = s.querySelector("table.targets");
    const bodies = new Map();
    for (const b of table.tBodies) bodies.set(b.dataset.name, b);
    let after = table.tHead;
    for (const t of shown) {
      let b = bodies.get(t.name);
      if (b) bodies.delete(t.name);
      else b = el("tbody", "t");
      updateBody(b, t, now);
      if (after.nextElementSibling !== b) after.after(b);
      after = b;
    }
    for (const b of bodies.values()) b.remove();
    const pager = s.querySelector(".pager");
    pager.hidden = all.length <= PAGE;
    setText(pager.querySelector(".range"), all.length === 0 ? "no target matches"
      : page * PAGE + 1 + "–" + (page * PAGE + shown.length) + " of " + all.length);
    pager.querySelector(".prev").disabled = page === 0;
    pager.querySelector(".next").disabled = page >= last;
  }

  let data = null;
  function render() {
    if (!data) return;
    const now = Date.now();
    const main = document.getElementById("packages");
    const existing = new Map();
    for (const s of main.querySelectorAll("section.pkg")) existing.set(s.dataset.package, s);
    const empty = main.querySelector(".empty");
    if (empty && data.length) empty.remove();
    let after = null;
    const total = zero();
    for (const p of data) {
      let s = existing.get(p.package);
      if (s) existing.delete(p.package);
      else s = newSection(p.package);
      wirePager(s);
      updateSection(s, p, now);
      count(p.targets, total);
      if (after === null ? main.firstElementChild !== s : after.nextElementSibling !== s) {
        if (after === null) main.prepend(s); else after.after(s);
      }
      after = s;
    }
    for (const s of existing.values()) s.remove();
    for (const k of ["installed", "active", "waiting", "failing"]) setText(document.getElementById("n-" + k), String(total[k]));
  }

  function tick() {
    const stale = Date.now() - lastOk;
    setText(document.getElementById("updated"), ago(Date.now(), lastOk));
    document.getElementById("live").classList.toggle("stale", stale > 15000);
  }

  let busy = false;
  async function poll() {
    if (busy) return;
    busy = true;
    clearTimeout(timer);
    let delay = 2000;
    try {
      const started = Date.now();
      const resp = await fetch("/v1/status", { headers: { Accept: "application/json" }, cache: "no-store" });
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      data = await resp.json();
      lastOk = Date.now();
      render();
      // A large site is polled less often: the answer costs the server too.
      delay = Math.min(30000, Math.max(2000, (Date.now() - started) * 10));
    } catch (e) {
      delay = 5000;
    }
    busy = false;
    tick();
    // A tab nobody looks at asks rarely; it asks at once when shown again.
    timer = setTimeout(poll, document.hidden ? Math.max(delay, 30000) : delay);
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const s of document.querySelectorAll("section.pkg")) wirePager(s);
    const f = document.getElementById("filter");
    f.addEventListener("input", () => { filter = f.value.trim().toLowerCase(); for (const k of pages.keys()) pages.set(k, 0); render(); });
    setInterval(tick, 1000);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) poll();
    });
    if (timer === null) poll();
  });
})();
