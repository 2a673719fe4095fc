"""The leaderboard page: one self-contained HTML document (no CDN: no internet at run time).

The page fetches the leaderboard JSON (``v1/leaderboard`` under the app's route prefix, put
in ``data-api`` by the server) and draws, with DOM calls only (node ids are untrusted
text, never parsed as HTML):

- a table of nodes × tasks: the headline metric's mean ± stderr with an error bar, n,
  error rate and p50/p95 latency, plus each node's latest verdicts; a pair the loop cannot
  measure says so in its cell, with the reason; a configured lm-eval group is a column of
  its own (its score from its subtasks' buffers) whose subtask columns are folded under
  it: a click on the group's header shows or hides them;
- per task, an SVG line chart of each node's score over time.

It refreshes every 30 s. ``body[data-state]`` turns ``ready`` (or ``error``) once drawn, which
the Chromium test waits for.
"""

from __future__ import annotations

import html

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>testbench leaderboard</title>
<style>
  :root { --fg: #1d232a; --muted: #5f6b76; --line: #d9dee3; --bg: #fbfcfd; }
  body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
         background: var(--bg); margin: 24px 32px; }
  h1 { font-size: 22px; margin: 0 0 4px; }
  h2 { font-size: 16px; margin: 28px 0 8px; }
  #status { color: var(--muted); margin-bottom: 16px; }
  table { border-collapse: collapse; background: #fff; box-shadow: 0 1px 2px #0001; }
  th, td { border: 1px solid var(--line); padding: 6px 10px; vertical-align: top; }
  th { background: #f1f4f7; text-align: left; font-weight: 600; }
  td.cell .score { font-variant-numeric: tabular-nums; font-weight: 600; }
  td.cell .stderr { font-variant-numeric: tabular-nums; color: var(--muted); }
  td.cell .paired { font-variant-numeric: tabular-nums; font-size: 0.85em; }
  td.cell .meta { color: var(--muted); font-size: 12px; }
  td.empty { color: var(--muted); text-align: center; }
  th button.fold { font: inherit; border: 0; background: none; padding: 0; cursor: pointer; }
  th.sub, td.sub { background: #fafbfc; }
  .unmeasurable { color: #8c1d1d; font-size: 12px; max-width: 28em; }
  .verdict { display: inline-block; border-radius: 3px; padding: 0 6px; margin: 0 4px 2px 0;
             font-size: 12px; background: #eceff3; }
  .verdict.pass { background: #dcf5e3; color: #13612e; }
  .verdict.fail { background: #fbe0e0; color: #8c1d1d; }
  .verdict.unknown { background: #fff3cd; color: #6b5200; }
  .node-status { display: block; font-size: 11px; font-weight: normal; }
  .node-status.flagged { color: #8c1d1d; }
  .node-status.unverified { color: #6b5200; }
  .charts { display: flex; flex-wrap: wrap; gap: 24px; }
  figure.chart { margin: 0; background: #fff; box-shadow: 0 1px 2px #0001; padding: 8px; }
  figure.chart figcaption { font-weight: 600; margin: 0 0 4px 4px; }
  svg text { font: 11px system-ui, sans-serif; fill: var(--muted); }
  .legend span { display: inline-block; margin-right: 12px; font-size: 12px; }
  .legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px;
              vertical-align: -1px; }
</style>
</head>
<body data-api="__API__" data-state="loading">
<h1>testbench leaderboard</h1>
<div id="status">loading…</div>
<table id="scores"><thead></thead><tbody></tbody></table>
<h2>Scores over time</h2>
<div id="charts" class="charts"></div>
<script>
"use strict";
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}
const fmt = (x, d) => (x === null || x === undefined) ? "–" : Number(x).toFixed(d);

function errorBar(mean, stderr) {
  const w = 120, h = 10, s = svg("svg", {width: w, height: h, class: "errbar",
                                         viewBox: `0 0 ${w} ${h}`});
  s.appendChild(svg("rect", {x: 0, y: 4, width: w, height: 2, fill: "#e3e7eb"}));
  if (mean === null) return s;
  const x = v => Math.max(0, Math.min(1, v)) * w;
  if (stderr !== null) {
    s.appendChild(svg("line", {x1: x(mean - stderr), x2: x(mean + stderr), y1: 5, y2: 5,
                               stroke: "#5f6b76", "stroke-width": 2}));
  }
  s.appendChild(svg("circle", {cx: x(mean), cy: 5, r: 3.5, fill: "#1f77b4"}));
  return s;
}

const openGroups = new Set();  // groups whose subtask columns are shown

function drawTable(data) {
  const thead = document.querySelector("#scores thead");
  const tbody = document.querySelector("#scores tbody");
  thead.replaceChildren(); tbody.replaceChildren();
  const head = el("tr");
  head.appendChild(el("th", {}, "node"));
  head.appendChild(el("th", {}, "model"));
  // groups first, each followed by its subtasks (folded unless opened), then the rest
  const groups = new Map((data.groups || []).map(g => [g.group, g]));
  const nested = new Set((data.groups || []).flatMap(g => g.subtasks));
  const columns = [];
  const addColumn = (name, parents) => {
    columns.push({name, parents, group: groups.has(name)});
    if (groups.has(name)) for (const c of groups.get(name).subtasks)
      addColumn(c, parents.concat([name]));
  };
  for (const g of groups.keys()) if (!nested.has(g)) addColumn(g, []);
  for (const t of data.tasks) if (!nested.has(t) && !groups.has(t)) addColumn(t, []);
  const shown = col => col.parents.every(p => openGroups.has(p));
  for (const col of columns) {
    const th = el("th", {"data-task": col.name, class: col.parents.length ? "sub" : ""});
    if (col.group) {
      const button = el("button", {class: "fold", "data-group": col.name,
                                   "aria-expanded": String(openGroups.has(col.name))},
                        (openGroups.has(col.name) ? "▾ " : "▸ ") + col.name);
      button.addEventListener("click", () => {
        if (openGroups.has(col.name)) openGroups.delete(col.name);
        else openGroups.add(col.name);
        drawTable(data);
      });
      th.appendChild(button);
    } else {
      th.textContent = (col.parents.length ? "└ " : "") + col.name;
    }
    if (!shown(col)) th.hidden = true;
    head.appendChild(th);
  }
  head.appendChild(el("th", {}, "verdicts"));
  thead.appendChild(head);
  const cells = new Map(data.cells.concat(data.group_cells || [])
                        .map(c => [c.node_id + "\\u0000" + c.task, c]));
  const stuck = new Map((data.unmeasurable || []).map(u => [u.node_id + "\\u0000" + u.task, u]));
  for (const node of data.nodes) {
    const row = el("tr", {"data-node": node.node_id});
    const head = el("th", {}, node.node_id);
    if (node.status && node.status !== "unchecked")
      head.appendChild(el("span", {class: "node-status " + node.status}, node.status));
    row.appendChild(head);
    row.appendChild(el("td", {}, node.model || "–"));
    for (const col of columns) {
      const task = col.name, before = row.children.length;
      const c = cells.get(node.node_id + "\\u0000" + task);
      const u = stuck.get(node.node_id + "\\u0000" + task);
      // a pair that cannot be measured as configured: why, and since when
      const why = u && el("div", {class: "unmeasurable", "data-node": u.node_id,
                                  "data-task": task,
                                  title: `${u.attempts} failed attempts since ` +
                                         new Date(u.since * 1000).toLocaleString()},
                          `cannot be measured: ${u.reason}`);
      if (!c && why) {
        const td = el("td", {class: "stuck"});
        td.appendChild(why);
        row.appendChild(td);
      } else if (!c) {
        row.appendChild(el("td", {class: "empty"}, "–"));
      } else {
        const td = el("td", {class: "cell", "data-node": c.node_id, "data-task": task,
                             "data-mean": c.mean === null ? "" : String(c.mean)});
        td.title = Object.entries(c.metrics)
          .map(([k, m]) => `${k}: ${fmt(m.mean, 4)} ± ${fmt(m.stderr, 4)}`).join("\\n");
        const line = el("div");
        line.appendChild(el("span", {class: "score"}, fmt(c.mean, 4)));
        line.appendChild(document.createTextNode(" ± "));
        line.appendChild(el("span", {class: "stderr"}, fmt(c.stderr, 4)));
        line.appendChild(el("span", {class: "meta"}, "  " + (c.metric || "")));
        td.appendChild(line);
        td.appendChild(errorBar(c.mean, c.stderr));
        // the paired estimate against the trusted reference, labelled apart from the raw one
        const p = c.metric && c.paired && c.paired[c.metric];
        if (p) td.appendChild(el("div", {class: "paired", "data-paired": String(p.mean),
                                         title: `reference full-task score ${fmt(p.reference_mean, 4)}` +
                                                ` + mean per-doc difference over ${p.n} docs ` +
                                                `(${p.differing_docs} differ)`},
          `paired ${fmt(p.mean, 4)} ± ${fmt(p.stderr, 4)}`));
        td.appendChild(el("div", {class: "meta"},
          `n ${c.n} · errors ${fmt(100 * c.error_rate, 1)}% · ` +
          `p50 ${fmt(c.latency_p50_s, 3)} s · p95 ${fmt(c.latency_p95_s, 3)} s`));
        if (why) td.appendChild(why);
        row.appendChild(td);
      }
      const added = row.children[before];
      if (col.parents.length) added.classList.add("sub");
      if (!shown(col)) added.hidden = true;
    }
    const verdicts = el("td", {class: "verdicts"});
    if (!node.verdicts.length) verdicts.textContent = "–";
    for (const v of node.verdicts) {
      // an unknown check is unverified, never shown as a pass
      const cls = v.passed === true ? "pass" : v.passed === false ? "fail" : "unknown";
      verdicts.appendChild(el("span", {class: "verdict " + cls, title: v.reason},
                              `${v.kind}: ${v.label}`));
    }
    row.appendChild(verdicts);
    tbody.appendChild(row);
  }
}

function drawChart(task, series, colorOf) {
  const W = 460, H = 240, L = 44, R = 12, T = 12, B = 34;
  const fig = el("figure", {class: "chart", "data-task": task});
  fig.appendChild(el("figcaption", {}, `${task} (${series[0].metric}, mean of last ` +
                                       `${series[0].window})`));
  const s = svg("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img"});
  const ts = series.flatMap(x => x.points.map(p => p[0]));
  let t0 = Math.min(...ts), t1 = Math.max(...ts);
  if (t1 <= t0) { t0 -= 1; t1 += 1; }
  const x = t => L + (t - t0) / (t1 - t0) * (W - L - R);
  const y = v => T + (1 - Math.max(0, Math.min(1, v))) * (H - T - B);
  for (const v of [0, 0.25, 0.5, 0.75, 1]) {
    s.appendChild(svg("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#eceff3"}));
    const label = svg("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"});
    label.textContent = v.toFixed(2);
    s.appendChild(label);
  }
  for (const [t, anchor] of [[t0, "start"], [t1, "end"]]) {
    const label = svg("text", {x: x(t), y: H - 12, "text-anchor": anchor});
    label.textContent = new Date(t * 1000).toLocaleString();
    s.appendChild(label);
  }
  for (const one of series) {
    const pts = one.points.map(p => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
    const line = svg("polyline", {points: pts, fill: "none", stroke: colorOf(one.node_id),
                                  "stroke-width": 2, "data-node": one.node_id,
                                  "data-points": one.points.length});
    s.appendChild(line);
    const last = one.points[one.points.length - 1];
    s.appendChild(svg("circle", {cx: x(last[0]), cy: y(last[1]), r: 3,
                                 fill: colorOf(one.node_id)}));
  }
  fig.appendChild(s);
  const legend = el("div", {class: "legend"});
  for (const one of series) {
    const item = el("span");
    item.appendChild(el("i", {style: `background:${colorOf(one.node_id)}`}));
    item.appendChild(document.createTextNode(one.node_id));
    legend.appendChild(item);
  }
  fig.appendChild(legend);
  return fig;
}

function drawCharts(data) {
  const box = document.getElementById("charts");
  box.replaceChildren();
  const order = data.nodes.map(n => n.node_id);
  const colorOf = id => COLORS[Math.max(0, order.indexOf(id)) % COLORS.length];
  for (const task of data.tasks) {
    const series = data.series.filter(s => s.task === task && s.points.length);
    if (series.length) box.appendChild(drawChart(task, series, colorOf));
  }
  if (!box.children.length) box.appendChild(el("div", {class: "meta"}, "no samples yet"));
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const resp = await fetch(document.body.dataset.api, {headers: {Accept: "application/json"}});
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const data = await resp.json();
    drawTable(data);
    drawCharts(data);
    const stuck = (data.unmeasurable || []).length;
    status.textContent = `${data.nodes.length} nodes × ${data.tasks.length} tasks · ` +
      (stuck ? `${stuck} pairs cannot be measured · ` : "") +
      `updated ${new Date(data.generated_at * 1000).toLocaleString()}`;
    document.body.dataset.state = "ready";
  } catch (err) {
    status.textContent = `could not load the leaderboard: ${err.message}`;
    document.body.dataset.state = "error";
  }
}
refresh();
setInterval(refresh, 30000);
</script>
</body>
</html>
"""


def leaderboard_page(api_url: str) -> str:
    """The page, reading its data from ``api_url``."""
    return _PAGE.replace("__API__", html.escape(api_url, quote=True))
