// streamsrv live board: follows GET /events (Server-Sent Events carrying the Redis messages)
// and draws active calls, their transcripts, alerts, recently ended calls and the post-call
// queue. No build step, no dependency. Everything a caller said is set with textContent.
"use strict";

const board = (() => {
  const calls = new Map(); // call_id -> call state
  const alerts = []; // newest first
  const conversations = new Map(); // conversation -> its post-call transcript, once there
  let opened = null; // call id shown large
  let source = null;
  let lastEventId = "";
  let drawQueued = false;
  const DRAW_EVERY_MS = 150; // at most ~7 redraws a second, however busy the calls are
  const ENDED_KEPT = 300; // ended calls the page remembers
  const stats = { draws: 0, lastDrawMs: 0, maxDrawMs: 0 };
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else if (k === "onclick") node.addEventListener("click", v);
      else node.setAttribute(k, v);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function call(id) {
    let c = calls.get(id);
    if (!c) {
      c = {
        id, startedAt: null, endedAt: null, ended: false, reason: null, context: {},
        language: null, probability: null, finals: new Map(), partial: null, dtmf: [],
        lastSeq: 0, alerts: [], jobId: null, postcall: null, postcallState: null,
      };
      calls.set(id, c);
    }
    return c;
  }

  // -- messages ----------------------------------------------------------------------------

  function receive(m) {
    if (!m || typeof m !== "object" || !m.call_id) return;
    const c = call(m.call_id);
    if (typeof m.seq === "number") {
      if (m.seq <= c.lastSeq) return; // replayed after a reconnect: already here
      c.lastSeq = m.seq;
    }
    switch (m.type) {
      case "call_started":
        c.startedAt = m.started_at;
        if (m.context) c.context = { ...c.context, ...m.context };
        if (m.language) c.language = m.language;
        break;
      case "call_context":
        c.context = { ...c.context, ...m.context };
        break;
      case "language_detected":
        c.language = m.language;
        c.probability = m.probability;
        break;
      case "partial":
        if (!c.finals.has(m.segment)) c.partial = { segment: m.segment, text: m.text, start: m.start };
        break;
      case "final":
        c.finals.set(m.segment, { segment: m.segment, text: m.text, start: m.start, end: m.end });
        if (m.language && !c.context.language) c.language = m.language;
        if (m.role && !c.context.role) c.context.role = m.role;
        if (c.partial && c.partial.segment <= m.segment) c.partial = null;
        break;
      case "dtmf":
        c.dtmf.push({ digit: m.digit, at: m.at });
        break;
      case "alert":
        c.alerts.push(m);
        alerts.unshift(m);
        if (alerts.length > 200) alerts.pop();
        drawAlerts();
        break;
      case "call_ended":
        c.ended = true;
        c.endedAt = m.ended_at;
        c.reason = m.reason;
        c.jobId = m.job_id;
        c.partial = null;
        break;
      case "postcall_done":
        c.postcallState = "done";
        fetchResults(c);
        break;
      case "postcall_failed":
        c.postcallState = "failed: " + m.error;
        break;
      default:
        return;
    }
    redrawSoon();
  }

  function redrawSoon() {
    if (!drawQueued) {
      drawQueued = true;
      setTimeout(() => requestAnimationFrame(draw), DRAW_EVERY_MS);
    }
  }

  function forgetOldCalls() {
    const ended = [...calls.values()].filter((c) => c.ended).sort((a, b) => b.endedAt - a.endedAt);
    for (const c of ended.slice(ENDED_KEPT)) if (c.id !== opened) calls.delete(c.id);
  }

  // -- the feed ------------------------------------------------------------------------------

  function connect() {
    const url = lastEventId ? "/events?last_event_id=" + encodeURIComponent(lastEventId) : "/events";
    source = new EventSource(url);
    source.onopen = () => {
      setLink("live");
      for (const c of calls.values()) if (c.ended && c.postcallState === "done" && !c.postcall) fetchResults(c);
    };
    source.onmessage = (e) => {
      if (e.lastEventId) lastEventId = e.lastEventId;
      let m;
      try { m = JSON.parse(e.data); } catch { return; }
      receive(m);
    };
    source.onerror = () => {
      setLink("reconnecting");
      if (source.readyState === EventSource.CLOSED) {
        // The server refused (503 while Redis is away): EventSource gives up, we do not.
        source = null;
        setTimeout(connect, 2000);
      }
    };
  }

  function setLink(state) {
    const link = $("link");
    link.dataset.state = state;
    link.textContent = state;
  }

  async function fetchJson(url) {
    const r = await fetch(url, { headers: { Accept: "application/json" } });
    if (!r.ok) throw new Error(url + ": " + r.status);
    return r.json();
  }

  async function fetchResults(c) {
    try {
      const view = await fetchJson("/calls/" + encodeURIComponent(c.id));
      c.postcall = view;
      if (view.job && view.job.status) c.postcallState = view.job.status;
      const conversation = c.context.conversation;
      if (conversation && !conversations.has(conversation)) {
        const merged = await fetchJson("/conversations/" + encodeURIComponent(conversation));
        if (merged.postcall) conversations.set(conversation, merged.postcall);
      }
      redrawSoon();
    } catch { /* shown when it can be read */ }
  }

  async function pollQueue() {
    try {
      drawQueue(await fetchJson("/queue"));
    } catch {
      $("queue-counts").replaceChildren(el("dt", { class: "empty" }, "queue not readable now"));
    }
  }

  // -- drawing -------------------------------------------------------------------------------

  function groupOf(c) {
    return c.context.conversation ? "conv:" + c.context.conversation : c.id;
  }

  function legs(group) {
    return [...calls.values()].filter((c) => groupOf(c) === group);
  }

  function roleClass(role) {
    return role === "caller" ? "role-caller" : role === "agent" ? "role-agent" : "role-other";
  }

  function lines(members) {
    const out = [];
    for (const c of members) {
      const base = c.startedAt || 0;
      const role = c.context.role || (members.length > 1 ? c.id.slice(0, 8) : "");
      const flagged = new Map(c.alerts.map((a) => [a.segment, a]));
      for (const f of c.finals.values()) {
        if (!f.text) continue;
        out.push({ at: base + f.start, rel: f.start, role, kind: "final", text: f.text, segment: f.segment, call: c.id, alert: flagged.get(f.segment) });
      }
      if (c.partial) {
        const p = c.partial;
        out.push({ at: base + p.start, rel: p.start, role, kind: "partial", text: p.text, segment: p.segment, call: c.id, alert: flagged.get(p.segment) });
      }
      for (const d of c.dtmf) out.push({ at: base + d.at, rel: d.at, role, kind: "dtmf", text: "key " + d.digit, call: c.id });
    }
    out.sort((a, b) => a.at - b.at);
    return out;
  }

  function clock(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const m = Math.floor(s / 60);
    return m + ":" + String(s % 60).padStart(2, "0");
  }

  function duration(c) {
    if (!c.startedAt) return "";
    return clock((c.ended ? c.endedAt : Date.now() / 1000) - c.startedAt);
  }

  function highlighted(text, alert) {
    if (!alert) return [text];
    const needle = (alert.matched || alert.phrase || "").toString();
    const at = needle ? text.toLowerCase().indexOf(needle.toLowerCase()) : -1;
    if (at < 0) return [text];
    return [text.slice(0, at), el("mark", {}, text.slice(at, at + needle.length)), text.slice(at + needle.length)];
  }

  function matches(members) {
    const q = $("search").value.trim().toLowerCase();
    const lang = $("language").value;
    if ($("alerts-only").checked && !members.some((c) => c.alerts.length)) return false;
    if (lang && !members.some((c) => (c.context.language || c.language) === lang)) return false;
    if (!q) return true;
    return members.some((c) => {
      const ctx = c.context;
      const hay = [c.id, ctx.caller, ctx.agent, ctx.queue, ctx.role, ctx.conversation, c.language,
        ...Object.values(ctx.tags || {}), ...[...c.finals.values()].map((f) => f.text),
        c.partial ? c.partial.text : ""].join(" ").toLowerCase();
      return hay.includes(q);
    });
  }

  function row(group, members) {
    const first = members[0];
    const ctx = Object.assign({}, ...members.map((c) => c.context));
    const alerted = members.some((c) => c.alerts.length);
    const all = lines(members);
    const last = all.filter((l) => l.kind !== "dtmf").slice(-1)[0];
    const language = members.map((c) => c.context.language || c.language).find(Boolean);
    return el("li", {
      "data-group": group, "data-call": first.id, class: [alerted ? "alerted" : "", opened && members.some((c) => c.id === opened) ? "open" : ""].join(" "),
      onclick: () => open(first.id),
    },
      el("div", { class: "meta" },
        members.map((c) => el("span", { class: "badge " + roleClass(c.context.role) }, c.context.role || "call")),
        language ? el("span", { class: "badge", "data-field": "language" }, language) : null,
        ctx.caller ? el("span", {}, "caller " + ctx.caller) : null,
        ctx.agent ? el("span", {}, "agent " + ctx.agent) : null,
        ctx.queue ? el("span", {}, "queue " + ctx.queue) : null,
        el("span", { class: "duration", "data-call": first.id }, duration(first)),
        alerted ? el("span", { class: "badge alert" }, "alert") : null,
        first.ended && first.postcallState ? el("span", { class: "badge" }, "post-call " + first.postcallState) : null,
      ),
      el("div", { class: "last", "data-kind": last ? last.kind : "" }, last ? last.text : "…"),
    );
  }

  function draw() {
    const began = performance.now();
    drawQueued = false;
    forgetOldCalls();
    const groups = new Map();
    for (const c of calls.values()) {
      const g = groupOf(c);
      if (!groups.has(g)) groups.set(g, []);
      groups.get(g).push(c);
    }
    const active = [];
    const ended = [];
    const languages = new Set();
    for (const [g, members] of groups) {
      for (const c of members) if (c.context.language || c.language) languages.add(c.context.language || c.language);
      if (!matches(members)) continue;
      (members.every((c) => c.ended) ? ended : active).push([g, members]);
    }
    const startOf = (ms) => Math.min(...ms.map((c) => c.startedAt || Infinity));
    active.sort((a, b) => startOf(b[1]) - startOf(a[1]));
    ended.sort((a, b) => Math.max(...b[1].map((c) => c.endedAt || 0)) - Math.max(...a[1].map((c) => c.endedAt || 0)));
    $("active").replaceChildren(...active.map(([g, m]) => row(g, m)));
    $("ended").replaceChildren(...ended.slice(0, 100).map(([g, m]) => row(g, m)));
    $("no-active").hidden = active.length > 0;
    const running = [...calls.values()].filter((c) => !c.ended).length;
    $("active-count").textContent = "(" + running + ")";
    $("counts").textContent = running + " active · " + alerts.length + (alerts.length === 1 ? " alert" : " alerts");
    const select = $("language");
    for (const lang of [...languages].sort()) {
      if (![...select.options].some((o) => o.value === lang)) select.append(el("option", { value: lang }, lang));
    }
    drawDetail();
    stats.draws += 1;
    stats.lastDrawMs = performance.now() - began;
    stats.maxDrawMs = Math.max(stats.maxDrawMs, stats.lastDrawMs);
  }

  function drawDetail() {
    const detail = $("detail");
    if (!opened || !calls.has(opened)) return;
    const c = calls.get(opened);
    const members = legs(groupOf(c));
    const ctx = Object.assign({}, ...members.map((m) => m.context));
    const keep = detail.scrollHeight - detail.scrollTop - detail.clientHeight < 40;
    detail.replaceChildren(
      el("h3", {}, ctx.conversation ? "Conversation " + ctx.conversation : "Call " + c.id),
      el("div", { class: "meta" },
        members.map((m) => el("div", {},
          el("span", { class: "badge " + roleClass(m.context.role) }, m.context.role || "call"), " ",
          m.id, " · ", (m.context.language || m.language || "language not known yet"),
          m.probability ? " (" + Math.round(m.probability * 100) + "%)" : "", " · ",
          m.ended ? "ended (" + (m.reason || "") + "), " + duration(m) : "live " + duration(m))),
        ctx.caller ? el("div", {}, "Caller: " + ctx.caller) : null,
        ctx.agent ? el("div", {}, "Agent: " + ctx.agent) : null,
        ctx.queue ? el("div", {}, "Queue: " + ctx.queue) : null,
        Object.keys(ctx.tags || {}).length ? el("div", {}, "Tags: " + Object.entries(ctx.tags).map(([k, v]) => k + "=" + v).join(", ")) : null,
      ),
      el("div", { class: "transcript" }, lines(members).map((l) => el("div", {
        class: "line" + (l.alert ? " alert" : ""), "data-kind": l.kind, "data-call": l.call,
        "data-at": l.at.toFixed(3),
        "data-segment": l.segment === undefined ? null : String(l.segment),
      },
        el("span", { class: "at" }, clock(l.rel)),
        el("span", { class: "who " + roleClass(l.role) }, l.role),
        el("span", { class: "text" }, highlighted(l.text, l.alert)),
      ))),
      ...results(members),
    );
    if (keep) detail.scrollTop = detail.scrollHeight;
  }

  function results(members) {
    const parts = [];
    const conversation = members.map((m) => m.context.conversation).find(Boolean);
    const merged = conversation && conversations.get(conversation);
    if (merged) parts.push(el("h4", {}, "Post-call transcript of the conversation"), el("pre", {}, merged.transcript));
    for (const m of members) {
      const r = m.postcall && m.postcall.results;
      if (!r) continue;
      const who = members.length > 1 ? " (" + (m.context.role || m.id.slice(0, 8)) + ")" : "";
      const model = r.model ? " · " + r.model + (r.language ? ", " + r.language : "") : "";
      if (r.transcript) parts.push(el("h4", {}, "Post-call transcript" + who + model), el("pre", {}, r.transcript));
      if (r.translation) parts.push(el("h4", {}, "Translation to English" + who), el("pre", {}, r.translation));
      if (r.insights) parts.push(el("h4", {}, "Insights" + who), el("pre", {}, JSON.stringify(r.insights, null, 2)));
    }
    return parts.length ? [el("section", { class: "results" }, parts)] : [];
  }

  function drawAlerts() {
    $("alerts").hidden = alerts.length === 0;
    $("alert-list").replaceChildren(...alerts.slice(0, 50).map((a) => {
      const c = calls.get(a.call_id);
      return el("li", { "data-call": a.call_id, onclick: () => open(a.call_id) },
        el("b", {}, a.label || a.phrase), " · ", (c && c.context.role) || "call", " ",
        a.call_id.slice(0, 8), ": “", a.text, "”");
    }));
  }

  function drawQueue(q) {
    $("queue-counts").replaceChildren(
      ...[["queued", q.queued], ["running", q.running], ["failed", q.failed], ["done/hour", q.done_last_hour]]
        .flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-field": k }, v)]));
    $("queue-failed").replaceChildren(...(q.failed_recent || []).slice(0, 10).map((f) =>
      el("li", {}, "job " + f.job_id + (f.call_id ? " (" + f.call_id.slice(0, 8) + ")" : "") + ": " + f.error)));
    $("queue-workers").replaceChildren(...(q.workers || []).map((w) =>
      el("li", {}, "worker " + w.worker + ": " + w.running + " running, seen " + new Date(w.last_seen).toLocaleTimeString())));
  }

  function open(id) {
    opened = id;
    history.replaceState(null, "", "#call=" + id);
    const c = calls.get(id);
    if (c && c.ended && !c.postcall) fetchResults(c);
    draw();
  }

  function tick() {
    for (const node of document.querySelectorAll(".duration")) {
      const c = calls.get(node.dataset.call);
      if (c && !c.ended) node.textContent = duration(c);
    }
  }

  function start() {
    const m = location.hash.match(/^#call=([0-9a-f-]{36})$/);
    if (m) opened = m[1];
    for (const id of ["search", "language", "alerts-only"]) $(id).addEventListener("input", redrawSoon);
    connect();
    pollQueue();
    setInterval(pollQueue, 5000);
    setInterval(tick, 1000);
  }

  document.addEventListener("DOMContentLoaded", start);
  return { calls, alerts, open, stats, get source() { return source; } };
})();
