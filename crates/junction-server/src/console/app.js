// Junction console: plain JavaScript over the REST API (/api/v1), no build step and no
// assets from elsewhere. Every view has a fixed part (forms, built once) and a live part
// that refreshes every two seconds. Text from the cluster is only ever set as text.
"use strict";

const API = "/api/v1";
const REFRESH_MS = 2000;

// ---------------------------------------------------------------------------------------
// Small helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function enc(s) { return encodeURIComponent(s); }

function fmtNum(n) { return n === undefined || n === null ? "–" : Number(n).toLocaleString("en-US"); }

function fmtBytes(n) {
  if (!n) return "0 B";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

function fmtMs(ms) {
  if (!ms) return "0 s";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 120000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 7200000) return `${Math.round(ms / 60000)} min`;
  return `${(ms / 3600000).toFixed(1)} h`;
}

function fmtTime(ms) { return ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "–"; }

function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty || "None.");
  return h("table", {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { class: x.endsWith("#") ? "num" : "" }, x.replace(/#$/, ""))))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => (c instanceof Node && c.tagName === "TD" ? c : h("td", {}, c)))))));
}

function num(v) { return h("td", { class: "num" }, fmtNum(v)); }

function flash(text, error) {
  const f = document.getElementById("flash");
  f.textContent = text;
  f.className = error ? "flash error" : "flash";
  f.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { f.hidden = true; }, error ? 12000 : 5000);
}

// ---------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(problem) {
    super(problem.detail || problem.title || "request failed");
    this.problem = problem;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem("junction-token");
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(API + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { detail: text }; }
  if (!r.ok) {
    if (r.status === 401) document.getElementById("auth").hidden = false;
    throw new ApiError(data || { status: r.status, detail: r.statusText });
  }
  return data;
}

async function act(what, fn) {
  try {
    await fn();
    flash(what);
    await refreshNow();
  } catch (e) {
    flash(`${e.message}${e.problem && e.problem.reason ? ` (${e.problem.reason})` : ""}`, true);
  }
}

// ---------------------------------------------------------------------------------------
// Views: { title, nav, setup(root, args) -> update() }

const views = {};

views.cluster = {
  nav: "cluster",
  setup(root) {
    const live = h("div", { id: "cluster-live" });
    root.append(h("h1", {}, "Cluster"), live);
    return async () => {
      const c = await api("GET", "/cluster");
      const leaders = new Map();
      for (const s of c.stations) for (const p of s.partition_info) {
        leaders.set(p.leader, (leaders.get(p.leader) || 0) + 1);
      }
      live.replaceChildren(
        h("div", { class: "cards" },
          card("Nodes alive", `${c.nodes.filter((n) => n.alive).length} / ${c.nodes.length}`),
          card("Metadata leader", c.metadata_leader === null ? "none" : `node ${c.metadata_leader}`),
          card("Metadata term", c.metadata_term),
          card("Stations", c.stations.length),
          card("Cluster id", c.cluster_id || "–")),
        h("h2", {}, "Nodes"),
        table(["Node", "Address", "Liveness", "Replicas#", "Partition leaders#"],
          c.nodes.map((n) => [
            `node ${n.id}${n.id === c.metadata_leader ? " (metadata leader)" : ""}`,
            n.addr,
            h("span", { class: n.alive ? "pill ok" : "pill bad" }, n.alive ? "alive" : "unreachable"),
            num(n.partition_replicas), num(n.partition_leaders)])),
        h("h2", {}, "Partition leaders"),
        table(["Station", "Partition#", "Raft group#", "Leader", "Term#", "Replicas"],
          c.stations.flatMap((s) => s.partition_info.map((p) => [
            stationLink(s), num(p.partition), num(p.group_id),
            p.leader === null ? h("span", { class: "pill bad" }, "no leader") : `node ${p.leader}`,
            num(p.term), p.replicas.join(", ")])), "No stations."));
    };
  },
};

function card(k, v) { return h("div", { class: "card" }, h("div", { class: "v" }, v), h("div", { class: "k" }, k)); }

function stationLink(s) {
  return h("a", { href: `#/station/${enc(s.tenant)}/${enc(s.name)}` }, `${s.tenant}/${s.name}`);
}

views.stations = {
  nav: "stations",
  setup(root) {
    const live = h("div", {});
    const form = h("form", { class: "inline", id: "create-station" },
      h("label", {}, "Tenant", h("input", { name: "tenant", value: "default", size: 10 })),
      h("label", {}, "Name", h("input", { name: "name", required: true, size: 16 })),
      h("label", {}, "Partitions", h("input", { name: "partitions", type: "number", min: 1, max: 1024, value: 1, size: 4 })),
      h("label", {}, "Storage", h("select", { name: "storage" }, h("option", { value: "file" }, "file"), h("option", { value: "memory" }, "memory"))),
      h("label", {}, "Max age (s)", h("input", { name: "max_age_s", type: "number", min: 0, size: 6 })),
      h("button", { type: "submit" }, "Create station"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const f = new FormData(form);
      const name = `${f.get("tenant")}/${f.get("name")}`;
      if (!confirm(`Create station ${name}?`)) return;
      const policy = { storage: f.get("storage") };
      if (f.get("max_age_s")) policy.retention = { max_age_ms: Number(f.get("max_age_s")) * 1000 };
      act(`Station ${name} created`, () => api("POST", "/stations", {
        tenant: f.get("tenant") || undefined, name: f.get("name"),
        partitions: Number(f.get("partitions")) || 1, policy,
      }));
    });
    root.append(h("h1", {}, "Stations"), live, h("h2", {}, "New station"), form);
    return async () => {
      const c = await api("GET", "/cluster");
      live.replaceChildren(table(
        ["Station", "Partitions#", "Replication#", "Storage", "Retention", "Messages#", "Size", ""],
        c.stations.map((s) => [
          stationLink(s), num(s.partitions), num(s.replication_factor), s.policy.storage,
          retentionText(s.policy),
          num(s.partition_info.reduce((a, p) => a + p.messages, 0)),
          fmtBytes(s.partition_info.reduce((a, p) => a + p.bytes, 0)),
          h("button", { class: "danger", type: "button", "data-delete": `${s.tenant}/${s.name}`, onclick: () => {
            if (!confirm(`Delete station ${s.tenant}/${s.name} and all its messages?`)) return;
            act(`Station ${s.tenant}/${s.name} deleted`, () => api("DELETE", `/stations/${enc(s.tenant)}/${enc(s.name)}`));
          } }, "Delete")]),
        "No stations yet."));
    };
  },
};

function retentionText(p) {
  const r = p.retention || {};
  const parts = [];
  if (r.max_age_ms) parts.push(`age ${fmtMs(r.max_age_ms)}`);
  if (r.max_bytes) parts.push(`size ${fmtBytes(r.max_bytes)}`);
  if (r.max_messages) parts.push(`${fmtNum(r.max_messages)} msgs`);
  if (r.ack) parts.push("until acked");
  if (p.compaction === "key") parts.push("compacted");
  return parts.length ? parts.join(", ") : "unlimited";
}

const rates = new Map();

function rate(key, value) {
  const now = performance.now();
  const prev = rates.get(key);
  rates.set(key, { value, now });
  if (!prev || now <= prev.now) return null;
  return Math.max(0, ((value - prev.value) * 1000) / (now - prev.now));
}

views.station = {
  nav: "stations",
  setup(root, [tenant, name]) {
    const path = `/stations/${enc(tenant)}/${enc(name)}`;
    const live = h("div", {});
    root.append(
      h("h1", {}, `Station ${tenant}/${name}`),
      h("div", { class: "actions" },
        h("a", { href: `#/messages/${enc(tenant)}/${enc(name)}` }, "Browse messages"), " · ",
        h("a", { href: `#/dead-letters/${enc(tenant)}/${enc(name)}` }, "Dead letters")),
      live);
    return async () => {
      const [s, g] = await Promise.all([api("GET", path), api("GET", `${path}/groups`)]);
      const groups = await Promise.all(g.groups.map((x) => api("GET", `${path}/groups/${enc(x.group)}`).catch(() => x)));
      const produced = s.partition_info.reduce((a, p) => a + p.next_offset, 0);
      const consumed = groups.reduce((a, x) => a + (x.partitions || []).reduce((b, p) => b + p.committed + p.acked_beyond, 0), 0);
      const inRate = rate(`in:${tenant}/${name}`, produced);
      const outRate = rate(`out:${tenant}/${name}`, consumed);
      live.replaceChildren(
        h("div", { class: "cards" },
          card("Produce rate", inRate === null ? "measuring…" : `${inRate.toFixed(1)} msg/s`),
          card("Consume rate (all groups)", outRate === null ? "measuring…" : `${outRate.toFixed(1)} msg/s`),
          card("Messages", fmtNum(s.partition_info.reduce((a, p) => a + p.messages, 0))),
          card("Size", fmtBytes(s.partition_info.reduce((a, p) => a + p.bytes, 0))),
          card("Policy", `${s.policy.storage}, ${retentionText(s.policy)}`)),
        h("h2", {}, "Partitions"),
        table(["Partition#", "Leader", "Term#", "Replicas", "Start offset#", "Next offset#", "Messages#", "Size"],
          s.partition_info.map((p) => [num(p.partition),
            p.leader === null ? h("span", { class: "pill bad" }, "no leader") : `node ${p.leader}`,
            num(p.term), p.replicas.join(", "), num(p.start_offset), num(p.next_offset), num(p.messages),
            fmtBytes(p.bytes)])),
        h("h2", {}, "Consumer groups"),
        table(["Group", "Mode", "Members#", "Lag#", "Oldest unacked"],
          groups.map((x) => [
            h("a", { href: `#/group/${enc(tenant)}/${enc(name)}/${enc(x.group)}` }, x.group),
            (x.settings && x.settings.mode) || "partitioned", num(x.members.length), num(x.lag),
            fmtMs(Math.max(0, ...(x.partitions || []).map((p) => p.oldest_unacked_age_ms)))]),
          "No consumer groups."));
    };
  },
};

views.group = {
  nav: "stations",
  setup(root, [tenant, name, group]) {
    const path = `/stations/${enc(tenant)}/${enc(name)}/groups/${enc(group)}`;
    const live = h("div", {});
    const seek = h("form", { class: "inline", id: "seek" },
      h("label", {}, "Seek to", h("select", { name: "to" },
        h("option", { value: "earliest" }, "earliest"), h("option", { value: "latest" }, "latest"),
        h("option", { value: "offset" }, "offset"), h("option", { value: "time" }, "time (ISO or ms)"))),
      h("label", {}, "Value", h("input", { name: "value", size: 24 })),
      h("label", {}, "Partition (empty: all)", h("input", { name: "partition", type: "number", min: 0, size: 5 })),
      h("button", { type: "submit" }, "Seek"));
    seek.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const f = new FormData(seek);
      const body = {};
      const to = f.get("to");
      if (to === "earliest" || to === "latest") body.position = to;
      else if (to === "offset") body.offset = Number(f.get("value"));
      else body.time_ms = /^\d+$/.test(f.get("value")) ? Number(f.get("value")) : Date.parse(f.get("value"));
      if (f.get("partition") !== "") body.partition = Number(f.get("partition"));
      if (!confirm(`Move group ${group} to ${to} ${f.get("value") || ""}?`)) return;
      act(`Group ${group} moved`, () => api("POST", `${path}/seek`, body));
    });
    const clone = h("form", { class: "inline", id: "clone" },
      h("label", {}, "Clone as", h("input", { name: "to", required: true, size: 16 })),
      h("button", { type: "submit" }, "Clone"));
    clone.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const to = new FormData(clone).get("to");
      if (!confirm(`Create group ${to} with ${group}'s settings and positions?`)) return;
      act(`Group ${to} created`, () => api("POST", `${path}/clone`, { to }));
    });
    const del = h("button", { class: "danger", type: "button", id: "delete-group", onclick: () => {
      if (!confirm(`Delete group ${group}? Its positions are lost.`)) return;
      act(`Group ${group} deleted`, async () => {
        await api("DELETE", path);
        location.hash = `#/station/${enc(tenant)}/${enc(name)}`;
      });
    } }, "Delete group");
    const budget = h("form", { class: "inline", id: "budget" },
      h("label", {}, "Budget: messages", h("input", { name: "max_messages", type: "number", min: 1, size: 10 })),
      h("label", {}, "age (s)", h("input", { name: "max_age_s", type: "number", min: 1, size: 8 })),
      h("button", { type: "submit" }, "Set budget"));
    budget.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const f = new FormData(budget);
      const body = {};
      if (f.get("max_messages") !== "") body.max_messages = Number(f.get("max_messages"));
      if (f.get("max_age_s") !== "") body.max_age_ms = Number(f.get("max_age_s")) * 1000;
      if (!confirm(`Set group ${group}'s isolation budget to ${budgetText(body)}? Past it, ack retention stops waiting for the group.`)) return;
      act(`Budget of ${group} set`, () => api("PUT", `${path}/budget`, body));
    });
    root.append(h("h1", {}, `Group ${group} of ${tenant}/${name}`), live,
      h("h2", {}, "Actions"), seek, clone, budget, h("div", { class: "actions" }, del));
    return async () => {
      const [g, parked] = await Promise.all([api("GET", path), api("GET", `${path}/parked`)]);
      const s = g.settings || {};
      const keyBody = (k) => (k.key_encoding === "base64"
        ? { partition: k.partition, key_base64: k.key } : { partition: k.partition, key: k.key });
      live.replaceChildren(
        h("div", { class: "cards" },
          card("Lag (messages)", h("span", { id: "group-lag" }, fmtNum(g.lag))),
          card("Oldest unacked", fmtMs(Math.max(0, ...g.partitions.map((p) => p.oldest_unacked_age_ms)))),
          card("Mode", s.mode || "partitioned"),
          card("Members", g.members.length),
          card("Generation", g.generation)),
        h("p", { class: "muted" }, `ack wait ${fmtMs(s.ack_wait_ms)}, at most ${s.max_deliveries} deliveries `
          + `(then ${s.on_max_deliveries === "park" ? "park the key" : "dead-letter"}), `
          + `${s.max_in_flight} in flight, ${s.max_in_flight_per_key} per key, session ${fmtMs(s.session_timeout_ms)}`),
        h("h2", {}, "Members"),
        table(["Member", "Client", "Joined", "Partitions"],
          g.members.map((m) => [m.member_id, m.client, fmtTime(m.joined_at_ms), m.partitions.join(", ")]), "No members."),
        h("h2", {}, "Partitions"),
        table(["Partition#", "Member", "Epoch#", "Committed#", "Acked beyond#", "End#", "Lag#", "Lag (time)",
          "Retention"],
          g.partitions.map((p) => [num(p.partition), p.member_id || "–", num(p.epoch), num(p.committed),
            num(p.acked_beyond), num(p.high_watermark), num(p.lag),
            p.known ? fmtMs(p.oldest_unacked_age_ms) : h("span", { class: "pill bad" }, "unknown"),
            p.detached_at_ms === null || p.detached_at_ms === undefined ? "held"
              : h("span", {}, h("span", { class: "pill bad" }, `detached ${fmtTime(p.detached_at_ms)}`), " ",
                h("button", { class: "plain", type: "button", "data-attach": p.partition, onclick: () => {
                  if (!confirm(`Attach group ${group} again in partition ${p.partition}? Ack retention waits for it again.`)) return;
                  act(`Group ${group} attached`, () => api("POST", `${path}/attach`, { partition: p.partition }));
                } }, "Attach"))])),
        h("p", { class: "muted", id: "budget-now" }, `Isolation budget: ${budgetText(g.partitions[0] && g.partitions[0].budget)}`),
        h("h2", {}, "Parked keys"),
        table(["Partition#", "Key", "Head offset#", "Head payload", ""],
          parked.keys.map((k) => [num(k.partition), k.key, num(k.head_offset),
            k.head ? show(k.head.payload, k.head.payload_encoding, "text") : "–",
            h("span", {},
              h("button", { class: "plain", type: "button", "data-resume": k.key, onclick: () => {
                if (!confirm(`Resume key ${k.key}: deliver its head again?`)) return;
                act(`Key ${k.key} resumed`, () => api("POST", `${path}/parked/resume`, keyBody(k)));
              } }, "Resume"), " ",
              h("button", { class: "danger", type: "button", "data-skip": k.key, onclick: () => {
                if (!confirm(`Skip key ${k.key}'s head to the dead-letter station?`)) return;
                act(`Key ${k.key} skipped`, () => api("POST", `${path}/parked/skip`, keyBody(k)));
              } }, "Skip"))]),
          "No parked keys."));
    };
  },
};

function budgetText(b) {
  if (!b) return "none";
  const parts = [];
  if (b.max_messages) parts.push(`${fmtNum(b.max_messages)} messages`);
  if (b.max_bytes) parts.push(fmtBytes(b.max_bytes));
  if (b.max_age_ms) parts.push(fmtMs(b.max_age_ms));
  return parts.length ? parts.join(", ") : "none";
}

function bytesOf(text, encoding) {
  if (encoding === "base64") return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  return new TextEncoder().encode(text);
}

function show(text, encoding, as) {
  if (text === null || text === undefined) return h("span", { class: "muted" }, "none");
  if (as === "hex") {
    return h("pre", { class: "payload" }, Array.from(bytesOf(text, encoding), (b) => b.toString(16).padStart(2, "0")).join(" "));
  }
  if (as === "json" && encoding === "text") {
    try { return h("pre", { class: "payload" }, JSON.stringify(JSON.parse(text), null, 2)); } catch (_) { /* not JSON: as text */ }
  }
  return h("pre", { class: "payload" }, encoding === "base64" ? `base64: ${text}` : text);
}

function headersText(m) {
  return Object.entries(m.headers || {}).map(([k, v]) => `${k}: ${v}`)
    .concat(Object.entries(m.headers_base64 || {}).map(([k, v]) => `${k} (base64): ${v}`)).join("\n");
}

views.messages = {
  nav: "stations",
  setup(root, [tenant, name]) {
    const state = { partition: 0, from: "", as: "text" };
    const live = h("div", { id: "messages-live" });
    const form = h("form", { class: "inline", id: "browse" },
      h("label", {}, "Partition", h("input", { name: "partition", type: "number", min: 0, value: 0, size: 4 })),
      h("label", {}, "From offset, or time (ISO)", h("input", { name: "from", size: 22, placeholder: "earliest" })),
      h("label", {}, "Show as", h("select", { name: "as" },
        h("option", { value: "text" }, "text"), h("option", { value: "json" }, "JSON"), h("option", { value: "hex" }, "hex"))),
      h("button", { type: "submit" }, "Show"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const f = new FormData(form);
      state.partition = Number(f.get("partition")) || 0;
      state.from = String(f.get("from") || "").trim();
      state.as = f.get("as");
      refreshNow();
    });
    root.append(h("h1", {}, `Messages of ${tenant}/${name}`),
      h("p", {}, h("a", { href: `#/station/${enc(tenant)}/${enc(name)}` }, "← station")), form, live);
    return async () => {
      let q = "max=50";
      if (/^\d+$/.test(state.from)) q += `&from=${state.from}`;
      else if (state.from) q += `&from_time_ms=${Date.parse(state.from)}`;
      const r = await api("GET", `/stations/${enc(tenant)}/${enc(name)}/partitions/${state.partition}/messages?${q}`);
      live.replaceChildren(
        h("p", { class: "muted" }, `Partition ${state.partition}: offsets ${fmtNum(r.start_offset)} to ${fmtNum(r.high_watermark)}`),
        table(["Offset#", "Time", "Key", "Headers", "Payload"],
          r.messages.map((m) => [num(m.offset), fmtTime(m.timestamp_ms), show(m.key, m.key_encoding, state.as === "hex" ? "hex" : "text"),
            h("pre", { class: "payload" }, headersText(m)), show(m.payload, m.payload_encoding, state.as)]),
          "No messages here."));
    };
  },
};

views.deadLetters = {
  nav: "stations",
  setup(root, [tenant, name]) {
    const path = `/stations/${enc(tenant)}/${enc(name)}`;
    const live = h("div", { id: "dead-letters-live" });
    const all = h("button", { type: "button", id: "resend-all", onclick: () => {
      if (!confirm(`Resend every dead letter of ${tenant}/${name} to the station?`)) return;
      act("Dead letters resent", async () => {
        const r = await api("POST", `${path}/dead-letters/resend`, {});
        flash(`${r.resent} dead letters resent`);
      });
    } }, "Resend all");
    root.append(h("h1", {}, `Dead letters of ${tenant}/${name}`),
      h("p", {}, h("a", { href: `#/station/${enc(tenant)}/${enc(name)}` }, "← station")),
      h("div", { class: "actions" }, all), live);
    return async () => {
      const r = await api("GET", `${path}/dead-letters?max=200`);
      live.replaceChildren(table(["DLS offset#", "Time", "Group", "Why", "Deliveries#", "From", "Payload", ""],
        r.dead_letters.map((d) => [num(d.offset), fmtTime(d.timestamp_ms), d.group || "–", d.reason || "–",
          num(d.deliveries), `${d.from_station || "?"} p${d.from_partition ?? "?"} @${d.from_offset ?? "?"}`,
          show(d.message.payload, d.message.payload_encoding, "text"),
          h("button", { class: "plain", type: "button", "data-resend": d.offset, onclick: () => {
            if (!confirm(`Resend dead letter ${d.offset} to ${tenant}/${name}?`)) return;
            act(`Dead letter ${d.offset} resent`, () => api("POST", `${path}/dead-letters/resend`,
              { from_offset: d.offset, to_offset: d.offset + 1 }));
          } }, "Resend")]),
        "No dead letters."));
    };
  },
};

views.api = {
  nav: "api",
  setup(root) {
    const live = h("div", {});
    root.append(h("h1", {}, "REST API"),
      h("p", {}, "The OpenAPI 3.1 document: ", h("a", { href: `${API}/openapi.json` }, `${API}/openapi.json`),
        ". Errors are RFC 9457 problem documents (application/problem+json)."), live);
    let done = false;
    return async () => {
      if (done) return;
      const doc = await api("GET", "/openapi.json");
      const rows = [];
      for (const [path, item] of Object.entries(doc.paths)) {
        for (const m of ["get", "post", "put", "delete"]) {
          const op = item[m];
          if (!op) continue;
          const body = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
          const ok = Object.entries(op.responses || {}).find(([code]) => code.startsWith("2"));
          const ref = (c) => (c && c.schema && c.schema.$ref ? c.schema.$ref.split("/").pop() : "");
          rows.push([h("span", { class: "method" }, m), h("code", {}, path), (op.tags || []).join(", "),
            op.summary || op.description || "", ref(body),
            ok ? ref(ok[1].content && ok[1].content["application/json"]) : ""]);
        }
      }
      live.replaceChildren(table(["Method", "Path", "Tag", "What", "Body", "Answer"], rows));
      done = true;
    };
  },
};

// ---------------------------------------------------------------------------------------
// Routing and refresh

const routes = [
  [/^#?\/?$/, "cluster"],
  [/^#\/stations$/, "stations"],
  [/^#\/station\/([^/]+)\/([^/]+)$/, "station"],
  [/^#\/group\/([^/]+)\/([^/]+)\/([^/]+)$/, "group"],
  [/^#\/messages\/([^/]+)\/([^/]+)$/, "messages"],
  [/^#\/dead-letters\/([^/]+)\/([^/]+)$/, "deadLetters"],
  [/^#\/api$/, "api"],
];

let update = null;
let generation = 0;

async function refreshNow() {
  if (!update) return;
  const mine = generation;
  try {
    await update();
    if (mine === generation) document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    if (mine === generation) flash(e.message, true);
  }
}

function navigate() {
  generation++;
  const hash = location.hash || "#/";
  const root = document.getElementById("view");
  root.replaceChildren();
  for (const [re, name] of routes) {
    const m = hash.match(re);
    if (!m) continue;
    const view = views[name];
    for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === view.nav);
    update = view.setup(root, m.slice(1).map(decodeURIComponent));
    refreshNow();
    return;
  }
  update = null;
  root.append(h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/" }, "Back to the cluster")));
}

async function whoami() {
  try {
    const w = await api("GET", "/whoami");
    document.getElementById("who").textContent = w.auth_enabled
      ? `tenant ${w.tenant} · ${w.role}${w.key_id ? ` · key ${w.key_id}` : ""}`
      : `tenant ${w.tenant} · authentication off`;
  } catch (e) {
    document.getElementById("who").textContent = "not signed in";
  }
}

document.getElementById("token-save").addEventListener("click", () => {
  sessionStorage.setItem("junction-token", document.getElementById("token").value.trim());
  document.getElementById("auth").hidden = true;
  whoami();
  refreshNow();
});

window.addEventListener("hashchange", navigate);
setInterval(() => { if (!document.hidden) refreshNow(); }, REFRESH_MS);
whoami();
navigate();
