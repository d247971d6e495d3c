"use strict";
const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromHash) { sessionStorage.setItem("photoferry-token", fromHash); history.replaceState(null, "", location.pathname); }
let token = sessionStorage.getItem("photoferry-token");
let series = [];

const $ = (id) => document.getElementById(id);
function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"]; let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
}
async function api(method, path, body) {
  const response = await fetch(path, { method, headers: { "Authorization": "Bearer " + token, "Content-Type": "application/json" },
                                       body: body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 401) { askForToken("That token was not accepted."); throw new Error("unauthorised"); }
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.detail || response.statusText);
  return answer;
}
function askForToken(message) { $("login").style.display = "block"; $("login-error").textContent = message || ""; }
$("token-form").addEventListener("submit", (e) => {
  e.preventDefault(); token = $("token").value.trim(); sessionStorage.setItem("photoferry-token", token);
  $("login").style.display = "none"; refresh();
});

const SVG = "http://www.w3.org/2000/svg";
function svgNode(name, attributes, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}
function chart(svg, points, lines) {
  const w = svg.clientWidth || 800, h = svg.clientHeight || 180, pad = 64, top = 24, bottom = 20;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const values = points.flatMap((p) => lines.map((l) => p[l.key] || 0));
  const peak = Math.max(0, ...values);
  // Headroom above the highest line, so it never runs through the axis label.
  const max = peak > 0 ? peak * 1.2 : 1, t0 = points.length ? Date.parse(points[0].t) : 0;
  const span = Math.max(1, (points.length ? Date.parse(points[points.length - 1].t) : 1) - t0);
  const x = (t) => pad + (t - t0) / span * (w - pad - 8), y = (v) => h - bottom - (v / max) * (h - bottom - top);
  const nodes = [svgNode("line", { x1: pad, y1: h - bottom, x2: w - 8, y2: h - bottom, stroke: "#d6ded8" }),
                 svgNode("line", { x1: pad, y1: top, x2: pad, y2: h - bottom, stroke: "#d6ded8" }),
                 svgNode("text", { x: 2, y: top + 4 }, peak > 0 ? bytes(peak) + (lines[0].rate ? "/s" : "") : ""),
                 svgNode("text", { x: 2, y: h - bottom + 4 }, "0")];
  if (points.length) {
    for (const fraction of [0, 0.5, 1]) {
      const t = t0 + fraction * span;
      nodes.push(svgNode("text", { x: x(t), y: h - 4, "text-anchor": ["start", "middle", "end"][fraction * 2] },
                         new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })));
    }
  }
  for (const line of lines) {
    const coords = points.map((p) => `${x(Date.parse(p.t)).toFixed(1)},${y(p[line.key] || 0).toFixed(1)}`).join(" ");
    nodes.push(svgNode("polyline", { class: "series", "data-series": line.key, fill: "none", stroke: line.color,
                                     "stroke-width": 2.5, points: coords }));
  }
  svg.replaceChildren(...nodes);
}

const BAND_STATES = { off: "off", idle: "nothing to ship", measuring: "measuring", using_idle_uplink: "using idle uplink",
                      yielding: "yielding to other traffic", unmeasured: "no measurement" };

async function refresh() {
  if (!token) { askForToken(); return; }
  let s;
  try {
    s = await api("GET", "/api/status");
    if (!series.length) series = await api("GET", "/api/history");
  } catch (e) { return; }
  series.push({ t: s.now, backlog_bytes: s.backlog_bytes, backlog_objects: s.backlog_objects,
                ingest: s.ingest_bytes_per_s, egress: s.egress_bytes_per_s, cap: s.cap_bytes_per_s,
                ceiling: s.scavenging.ceiling_bytes_per_s || 0 });
  const cutoff = Date.now() - 12 * 3600 * 1000;
  series = series.filter((p) => Date.parse(p.t) >= cutoff);
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  $("backlog-bytes").textContent = bytes(s.backlog_bytes);
  $("backlog-objects").textContent = s.backlog_objects + " photos not yet in S3";
  $("oldest").textContent = s.oldest_unshipped_age_s == null ? s.text.oldest_unshipped_age : "oldest waiting " + s.text.oldest_unshipped_age;
  $("eta").textContent = s.text.eta_drain;
  $("eta").className = "big " + (s.eta_drain_s == null && s.backlog_bytes ? "bad" : "");
  $("rates").textContent = `in ${bytes(s.ingest_bytes_per_s)}/s · out ${bytes(s.egress_bytes_per_s)}/s · cap ${bytes(s.cap_bytes_per_s)}/s`;
  const share = s.store_fill;  // photo budget or disk, whichever is fuller
  $("used").textContent = `${(share * 100).toFixed(1)} %`;
  $("used-bar").style.width = Math.min(100, share * 100) + "%";
  $("used-bar").classList.toggle("full", share >= s.high_watermark);
  $("full-eta").textContent = `${bytes(s.store_used_bytes)} of ${bytes(s.store_capacity_bytes)}` +
    (s.store_disk_total_bytes == null ? "" : ` · disk ${bytes(s.store_disk_free_bytes)} free of ${bytes(s.store_disk_total_bytes)}`) +
    ` · full ${s.text.store_full}`;
  const lag = s.fresh.lag;
  $("fresh-lag").textContent = s.fresh.share <= 0 ? "oldest first" : (lag.photos ? `p99 ${lag.p99_s.toFixed(1)} s` : "–");
  $("fresh").textContent = s.fresh.share <= 0 ? "fresh photos wait behind the backlog (share 0)" :
    `up to ${Math.round(s.fresh.share * 100)} % of the cap for photos younger than ${Math.round(s.fresh.window_s / 60)} min · ` +
    `fresh ${bytes(s.fresh.egress_bytes_per_s)}/s, backlog ${bytes(s.backlog_class.egress_bytes_per_s)}/s` +
    (lag.photos ? ` · ${lag.photos} shipped lately, p50 ${lag.p50_s.toFixed(1)} s` : "");
  $("admission").textContent = s.admission.open ? "taking uploads" : `refusing uploads: ${s.admission.reason}`;
  $("admission").className = s.admission.open ? "ok" : "bad";
  $("shipping").textContent = s.shipping.replace("_", " ");
  $("shipping").className = "big " + (s.shipping === "running" ? "ok" : "bad");
  $("shippers").textContent = s.shippers.length + " shipper(s)" + (s.link_limited ? " · the link is slower than the cap" : "") +
    (s.control.rate_override ? ` · rate set to ${bytes(s.control.rate_override)}/s` : "") +
    (s.control.paused_until ? ` · paused until ${new Date(s.control.paused_until).toLocaleString()}` : "");
  const band = s.scavenging;
  $("scavenging").textContent = BAND_STATES[band.state] || band.state;
  $("scavenging").className = "big " + ({ using_idle_uplink: "ok", unmeasured: "bad" }[band.state] || "");
  $("scavenging-detail").textContent = s.text.scavenging;
  $("devices").textContent = s.devices;
  $("silent").textContent = s.silent_devices.length ? "silent: " + s.silent_devices.slice(0, 20).join(", ") : "none silent";
  $("parked").textContent = s.parked;
  document.body.dataset.loaded = "yes";
  chart($("backlog-chart"), series, [{ key: "backlog_bytes", color: "#24412f" }]);
  const rates = [{ key: "cap", color: "#c77700", rate: true }, { key: "egress", color: "#2f6fb3", rate: true },
                 { key: "ingest", color: "#7a9a84", rate: true }];
  // The ceiling only where a band was ever in force: a line along the axis says nothing.
  if (series.some((p) => p.ceiling > 0)) rates.push({ key: "ceiling", color: "#7b4fb0", rate: true });
  chart($("egress-chart"), series, rates);
}
$("pause").addEventListener("click", () => api("POST", "/api/shipping/pause").then(refresh, alert));
$("resume").addEventListener("click", () => api("POST", "/api/shipping/resume").then(refresh, alert));
$("set-rate").addEventListener("click", () => api("PUT", "/api/shipping/rate", { rate: $("rate").value.trim() }).then(refresh, (e) => alert(e.message)));
$("schedule").addEventListener("click", () => api("PUT", "/api/shipping/rate", { rate: null }).then(refresh, alert));
$("set-ceiling").addEventListener("click", () => api("PUT", "/api/shipping/rate", { ceiling: $("ceiling").value.trim() }).then(refresh, (e) => alert(e.message)));
$("ceiling-off").addEventListener("click", () => api("PUT", "/api/shipping/rate", { ceiling: "off" }).then(refresh, (e) => alert(e.message)));
$("ceiling-schedule").addEventListener("click", () => api("PUT", "/api/shipping/rate", { ceiling: null }).then(refresh, (e) => alert(e.message)));
refresh();
setInterval(refresh, 5000);
