
"use strict";
// The live stats page: reads snapshots from /stats/ws (one a second, cumulative counters), derives rates from
// their deltas and keeps the last 5 minutes of each series here, in the page. No framework, no external resource.
(function () {
  const POINTS = 300;
  const STALE_MS = 5000;
  const $ = (id) => document.getElementById(id);
  // The SVG namespace, taken from the page's own charts.
  const SVG = $("chart-active").namespaceURI;

  // Series of the last POINTS snapshots: the totals, and each place's by its key.
  const totals = { active: [], handshakes: [], messagesIn: [], messagesOut: [], bytesIn: [], bytesOut: [] };
  const placeSeries = new Map();
  let previous = null;

  function push(series, value) {
    series.push(value);
    if (series.length > POINTS) series.shift();
  }

  function rate(now, before, dt) {
    if (before === undefined || dt <= 0) return 0;
    const delta = now - before;
    return delta > 0 ? delta / dt : 0;
  }

  function human(n) {
    if (n >= 1e9) return (n / 1e9).toFixed(1) + " G";
    if (n >= 1e6) return (n / 1e6).toFixed(1) + " M";
    if (n >= 1e3) return (n / 1e3).toFixed(1) + " k";
    return n >= 10 || n === 0 ? Math.round(n).toString() : n.toFixed(1);
  }

  function humanBytes(n) {
    if (n >= 1 << 30) return (n / (1 << 30)).toFixed(1) + " GiB";
    if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + " MiB";
    if (n >= 1 << 10) return (n / (1 << 10)).toFixed(1) + " KiB";
    return Math.round(n) + " B";
  }

  // Draws one or two series into an SVG whose viewBox is 300 wide, scaled to their common maximum.
  function draw(svg, first, second) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const height = svg.viewBox.baseVal.height;
    const all = second ? first.concat(second) : first;
    const max = Math.max(1, ...all);
    const line = (series, cls) => {
      if (series.length === 0) return;
      const offset = POINTS - series.length;
      const points = series.map((v, i) => {
        const x = ((offset + i) * 300) / (POINTS - 1);
        const y = height - 1 - (v / max) * (height - 2);
        return x.toFixed(1) + "," + y.toFixed(1);
      });
      const polyline = document.createElementNS(SVG, "polyline");
      polyline.setAttribute("points", points.join(" "));
      if (cls) polyline.setAttribute("class", cls);
      svg.appendChild(polyline);
    };
    line(first, "");
    if (second) line(second, "second");
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function badge(row, text) {
    const td = cell(row, "");
    if (text) {
      const span = document.createElement("span");
      span.className = "badge " + text;
      span.textContent = text;
      td.appendChild(span);
    }
  }

  function health(server) {
    if (!server) return "";
    if (server.ejected) return "ejected";
    return server.up ? "up" : "down";
  }

  function placeKey(p) {
    return JSON.stringify([p.listener, p.route, p.upstream, p.server]);
  }

  function render(snapshot) {
    const dt = previous ? (snapshot.time - previous.time) / 1000 : 0;
    const before = new Map();
    if (previous) for (const p of previous.places) before.set(placeKey(p), p);

    const servers = new Map();
    for (const s of snapshot.servers) servers.set(JSON.stringify([s.upstream, s.server]), s);

    let handshakes = 0, messagesIn = 0, messagesOut = 0, bytesIn = 0, bytesOut = 0;
    const rows = [];
    const seen = new Set();
    for (const p of snapshot.places) {
      const key = placeKey(p);
      seen.add(key);
      const b = before.get(key) || {};
      const r = {
        handshakes: rate(p.sessions, b.sessions, dt),
        messagesIn: rate(p.messages_in, b.messages_in, dt),
        messagesOut: rate(p.messages_out, b.messages_out, dt),
        bytesIn: rate(p.bytes_in, b.bytes_in, dt),
        bytesOut: rate(p.bytes_out, b.bytes_out, dt),
      };
      handshakes += r.handshakes;
      messagesIn += r.messagesIn;
      messagesOut += r.messagesOut;
      bytesIn += r.bytesIn;
      bytesOut += r.bytesOut;
      if (!placeSeries.has(key)) placeSeries.set(key, []);
      const series = placeSeries.get(key);
      push(series, p.active);

      const row = document.createElement("tr");
      cell(row, p.listener);
      cell(row, p.route);
      cell(row, p.upstream);
      cell(row, p.server);
      cell(row, String(p.active), "num");
      cell(row, human(r.handshakes), "num");
      cell(row, human(r.messagesIn), "num");
      cell(row, human(r.messagesOut), "num");
      cell(row, humanBytes(r.bytesIn), "num");
      cell(row, humanBytes(r.bytesOut), "num");
      const server = servers.get(JSON.stringify([p.upstream, p.server]));
      badge(row, health(server));
      badge(row, server && server.draining ? "draining" : "");
      const chart = cell(row, "");
      const svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("class", "spark");
      svg.setAttribute("viewBox", "0 0 300 20");
      svg.setAttribute("preserveAspectRatio", "none");
      chart.appendChild(svg);
      draw(svg, series);
      rows.push(row);
    }
    for (const key of placeSeries.keys()) if (!seen.has(key)) placeSeries.delete(key);

    const places = $("places");
    if (rows.length) places.replaceChildren(...rows);
    else places.replaceChildren(emptyRow(13, "no session yet"));

    const serverRows = snapshot.servers.map((s) => {
      const row = document.createElement("tr");
      cell(row, s.upstream);
      cell(row, s.server);
      badge(row, health(s));
      badge(row, s.draining ? "draining" : "");
      cell(row, String(s.connections), "num");
      return row;
    });
    $("servers").replaceChildren(...(serverRows.length ? serverRows : [emptyRow(5, "no upstream server")]));

    $("sessions-active").textContent = String(snapshot.active);
    push(totals.active, snapshot.active);
    draw($("chart-active"), totals.active);
    if (previous) {
      push(totals.handshakes, handshakes);
      push(totals.messagesIn, messagesIn);
      push(totals.messagesOut, messagesOut);
      push(totals.bytesIn, bytesIn);
      push(totals.bytesOut, bytesOut);
      $("total-handshakes").textContent = human(handshakes);
      $("total-messages").textContent = human(messagesIn) + " / " + human(messagesOut);
      $("total-bytes").textContent = humanBytes(bytesIn) + " / " + humanBytes(bytesOut);
      draw($("chart-handshakes"), totals.handshakes);
      draw($("chart-messages"), totals.messagesIn, totals.messagesOut);
      draw($("chart-bytes"), totals.bytesIn, totals.bytesOut);
    }
    previous = snapshot;
  }

  function emptyRow(span, text) {
    const row = document.createElement("tr");
    const td = cell(row, text, "dim");
    td.colSpan = span;
    return row;
  }

  function status(state, text) {
    $("status").className = "status " + state;
    $("status-text").textContent = text;
  }

  // The socket: the token the page was loaded with (if any) goes along; reconnects with backoff, 1 s to 30 s.
  let backoff = 1000;
  let everOpened = false;
  function connect() {
    const params = new URLSearchParams(location.search);
    const token = params.get("token");
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = scheme + "//" + location.host + "/stats/ws" + (token ? "?token=" + encodeURIComponent(token) : "");
    status("connecting", "connecting…");
    let socket;
    try {
      socket = new WebSocket(url);
    } catch (e) {
      retry(null);
      return;
    }
    let watchdog = null;
    const feed = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => socket.close(), STALE_MS);
    };
    socket.onopen = () => {
      everOpened = true;
      feed();
    };
    socket.onmessage = (event) => {
      if (typeof event.data !== "string") return;
      let snapshot;
      try {
        snapshot = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      feed();
      backoff = 1000;
      status("live", "live · " + new Date(snapshot.time).toLocaleTimeString());
      render(snapshot);
    };
    socket.onclose = () => {
      clearTimeout(watchdog);
      previous = null;
      retry(everOpened ? null : "cannot connect (is the admin token in the address, as ?token=…?)");
    };
  }

  function retry(hint) {
    const wait = backoff;
    backoff = Math.min(backoff * 2, 30000);
    status("down", (hint || "disconnected") + " · retrying in " + Math.round(wait / 1000) + " s");
    setTimeout(connect, wait);
  }

  connect();
})();
