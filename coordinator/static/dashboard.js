// The fedledger dashboard: polls v1/dashboard and v1/health and redraws the page from them.
// Plain ES2020, no dependencies, no build step; every text goes in through textContent.
"use strict";

const POLL_MS = 2000;
const TOKEN_UNIT = 10n ** 18n; // token units in one FLR (the ERC-20 has 18 decimals)
const SVG_NS = "http://www.w3.org/2000/svg"; // the namespace name of SVG elements, not a resource
const ENDED = ["finalized", "failed"]; // a round's last statuses
const CHART = { width: 640, height: 240, left: 64, right: 16, top: 16, bottom: 36 };

const view = {
  metric: null, // the metric the chart draws; null: the task's own until the user picks one
  data: null, // the last v1/dashboard answer
  dataText: "", // ... as text, to redraw only when it changed
  opened: new Set(), // rounds whose details the user opened
  closed: new Set(), // ... or closed
};

// ------------------------------------------------------------------ helpers

function el(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

function svg(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Token units (a decimal string) as an exact number of FLR: "12500000000000000000" -> "12.5".
function tokens(units) {
  const value = BigInt(units);
  const sign = value < 0n ? "-" : "";
  const magnitude = value < 0n ? -value : value;
  const fraction = (magnitude % TOKEN_UNIT).toString().padStart(18, "0").replace(/0+$/, "");
  return sign + (magnitude / TOKEN_UNIT).toString() + (fraction ? "." + fraction : "");
}

function signed(x, places) {
  return (x >= 0 ? "+" : "") + x.toFixed(places);
}

// Unix seconds as "2026-12-02 20:30:15" (UTC, so that every reader sees the same).
function utc(seconds) {
  return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19);
}

function timeLeft(seconds) {
  const left = Math.round(seconds - Date.now() / 1000);
  if (left <= 0) return "deadline passed";
  const minutes = Math.floor(left / 60);
  return "closes in " + (minutes ? `${minutes} min ` : "") + `${left % 60} s`;
}

function metricsText(metrics) {
  const names = Object.keys(metrics).sort();
  return names.map((name) => `${name} ${metrics[name].toFixed(4)}`).join(", ");
}

function statusCell(status) {
  return el("td", { class: `status status-${status}` }, status);
}

async function getJson(path) {
  const response = await fetch(path, {
    cache: "no-store",
    headers: { Accept: "application/json" },
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error(body && body.code ? body.message : `HTTP ${response.status}`);
    error.code = body && body.code ? body.code : null; // the API's stable error code
    throw error;
  }
  return body;
}

// ------------------------------------------------------------------- health

function renderHealth(outcome) {
  const status = document.getElementById("health-status");
  const chain = document.getElementById("health-chain");
  const ledger = document.getElementById("health-ledger");
  if (outcome.status === "rejected") {
    const error = outcome.reason;
    status.textContent = error.code
      ? `${error.code}: ${error.message}`
      : `no answer (${error.message})`;
    status.className = "bad";
    chain.textContent = "unknown";
    return;
  }
  const health = outcome.value;
  status.textContent = health.status;
  status.className = health.status === "ok" ? "good" : "bad";
  chain.textContent = `chain id ${health.chain_id}, current round ${health.round_id} (${health.training})`;
  ledger.textContent = health.ledger;
}

// -------------------------------------------------------------------- chart

function metricNames(data) {
  const names = new Set();
  for (const round of data.rounds)
    Object.keys(round.validation_metrics).forEach((n) => names.add(n));
  return [...names].sort();
}

function renderMetricChoice(data, names) {
  const choice = document.getElementById("metric-choice");
  choice.replaceChildren(
    ...names.map((name) => {
      const button = el("button", { type: "button", "aria-pressed": name === view.metric }, name);
      button.addEventListener("click", () => {
        view.metric = name;
        renderChart(data);
      });
      return button;
    }),
  );
}

function renderChart(data) {
  const names = metricNames(data);
  if (!names.includes(view.metric))
    view.metric = names.includes(data.metric) ? data.metric : (names[0] ?? null);
  document.getElementById("chart-metric").textContent = view.metric ?? data.metric;
  renderMetricChoice(data, names);
  const plot = document.getElementById("chart-plot");
  const settled = data.rounds.filter(
    (r) => r.status === "finalized" && view.metric in r.validation_metrics,
  );
  if (settled.length === 0) {
    plot.replaceChildren(el("p", { class: "muted" }, "no settled round yet"));
    return;
  }
  const values = settled.map((r) => r.validation_metrics[view.metric]);
  let low = Math.min(...values);
  let high = Math.max(...values);
  const pad = high > low ? (high - low) * 0.1 : Math.max(Math.abs(high) * 0.1, 0.05);
  low -= pad;
  high += pad;
  const lastRound = Math.max(data.total_rounds, ...data.rounds.map((r) => r.round_id));
  const { width, height, left, right, top, bottom } = CHART;
  const x = (roundId) =>
    lastRound > 1
      ? left + ((roundId - 1) / (lastRound - 1)) * (width - left - right)
      : (left + width - right) / 2;
  const y = (value) => top + ((high - value) / (high - low)) * (height - top - bottom);

  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": `${view.metric} of the global model per round`,
  });
  chart.append(
    svg("line", {
      class: "axis",
      x1: left,
      y1: height - bottom,
      x2: width - right,
      y2: height - bottom,
    }),
  );
  chart.append(svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: height - bottom }));
  for (const value of [low + pad, (low + high) / 2, high - pad]) {
    chart.append(
      svg("line", { class: "grid", x1: left, y1: y(value), x2: width - right, y2: y(value) }),
    );
    chart.append(
      svg(
        "text",
        { class: "tick", x: left - 6, y: y(value) + 4, "text-anchor": "end" },
        value.toFixed(3),
      ),
    );
  }
  const step = Math.max(1, Math.ceil(lastRound / 20));
  for (let roundId = 1; roundId <= lastRound; roundId += step) {
    chart.append(
      svg(
        "text",
        { class: "tick", x: x(roundId), y: height - bottom + 16, "text-anchor": "middle" },
        roundId,
      ),
    );
  }
  chart.append(
    svg(
      "text",
      { class: "label", x: (left + width - right) / 2, y: height - 4, "text-anchor": "middle" },
      "round",
    ),
  );
  for (const round of data.rounds.filter((r) => r.status === "failed")) {
    chart.append(
      svg(
        "text",
        {
          class: "failed-mark",
          x: x(round.round_id),
          y: height - bottom - 4,
          "text-anchor": "middle",
        },
        "×",
        svg("title", {}, `round ${round.round_id} failed: ${round.reason ?? ""}`),
      ),
    );
  }
  const points = settled.map(
    (r) => `${x(r.round_id).toFixed(1)},${y(r.validation_metrics[view.metric]).toFixed(1)}`,
  );
  chart.append(svg("polyline", { class: "line", points: points.join(" ") }));
  for (const round of settled) {
    const value = round.validation_metrics[view.metric];
    chart.append(
      svg(
        "circle",
        { class: "point", "data-round": round.round_id, cx: x(round.round_id), cy: y(value), r: 4 },
        svg("title", {}, `round ${round.round_id}: ${view.metric} ${value.toFixed(4)}`),
      ),
    );
  }
  plot.replaceChildren(chart);
}

// ------------------------------------------------------------------- tables

function renderProgress(data) {
  document.getElementById("task").textContent = `· ${data.task}`;
  const latest = data.rounds.length ? data.rounds[data.rounds.length - 1] : null;
  document.getElementById("progress").textContent = latest
    ? `training ${data.training}: round ${latest.round_id} of ${data.total_rounds}, ${latest.status}`
    : `training ${data.training}: no round opened yet`;
}

function deadlineText(round) {
  return round.status === "open"
    ? `${utc(round.deadline)} (${timeLeft(round.deadline)})`
    : utc(round.deadline);
}

function renderRounds(data) {
  const rows = [...data.rounds]
    .reverse()
    .map((round) =>
      el(
        "tr",
        { "data-round": round.round_id },
        el("td", { class: "round" }, round.round_id),
        statusCell(round.status),
        el(
          "td",
          { class: "deadline", "data-deadline": round.deadline, "data-status": round.status },
          deadlineText(round),
        ),
        el("td", { class: "uploads num" }, round.uploads),
        el("td", { class: "metrics" }, metricsText(round.validation_metrics)),
        el(
          "td",
          { class: "gain num" },
          round.validation_gain === null ? "" : signed(round.validation_gain, 4),
        ),
        el(
          "td",
          { class: "paid num", title: `${round.total_reward} token units` },
          ENDED.includes(round.status) ? tokens(round.total_reward) : "",
        ),
        el("td", { class: "flagged num" }, round.flagged),
        el("td", { class: "reason" }, round.reason ?? ""),
      ),
    );
  document.querySelector("#rounds tbody").replaceChildren(...rows);
}

function epsilonText(epsilon, retired, budget) {
  if (epsilon === null) return retired ? "retired" : "";
  const spent = budget === null ? epsilon.toFixed(3) : `${epsilon.toFixed(3)} of ${budget}`;
  return retired ? `${spent} (retired)` : spent;
}

function renderTotals(data) {
  const rows = data.organisations.map((org) =>
    el(
      "tr",
      { "data-organisation": org.organisation },
      el("td", { class: "organisation" }, el("code", {}, org.organisation)),
      el("td", { class: "value num" }, signed(org.value, 6)),
      el("td", { class: "reward num", title: `${org.reward} token units` }, tokens(org.reward)),
      el("td", { class: "rounds-flagged num" }, org.rounds_flagged),
      el("td", { class: "flags" }, org.flag_reasons.join(", ")),
      el(
        "td",
        { class: "epsilon dp num" },
        epsilonText(org.epsilon, org.retired, data.epsilon_budget),
      ),
    ),
  );
  document.querySelector("#totals tbody").replaceChildren(...rows);
}

function renderRoundDetail(round, budget, latest) {
  const rows = round.organisations.map((org) =>
    el(
      "tr",
      { "data-organisation": org.organisation },
      el("td", { class: "organisation" }, el("code", {}, org.organisation)),
      el("td", { class: `status status-${org.status}` }, org.status),
      el(
        "td",
        { class: "value num" },
        round.status === "finalized"
          ? `${signed(org.value, 6)} ± ${org.value_stderr.toFixed(6)}`
          : "",
      ),
      el(
        "td",
        { class: "reward num", title: `${org.reward} token units` },
        round.status === "finalized" ? tokens(org.reward) : "",
      ),
      el("td", { class: "flags" }, org.flag_reasons.join(", ")),
      el("td", { class: "note" }, org.note ?? ""),
      el(
        "td",
        { class: "epsilon dp num" },
        epsilonText(org.epsilon, org.status === "retired", budget),
      ),
    ),
  );
  const open = view.opened.has(round.round_id) || (latest && !view.closed.has(round.round_id));
  const details = el(
    "details",
    { id: `round-${round.round_id}`, "data-round": round.round_id, open: open ? "" : null },
    el(
      "summary",
      {},
      `Round ${round.round_id}: ${round.status}`,
      round.status === "finalized" ? `, paid ${tokens(round.total_reward)} FLR` : "",
      round.flagged ? `, ${round.flagged} flagged` : "",
      round.reason ? ` (${round.reason})` : "",
    ),
    el(
      "table",
      { class: "round-organisations" },
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          el("th", {}, "organisation"),
          el("th", {}, "upload"),
          el("th", {}, "Shapley value ± s.e."),
          el("th", {}, "reward (FLR)"),
          el("th", {}, "flags"),
          el("th", {}, "why flagged"),
          el("th", { class: "dp" }, "epsilon spent"),
        ),
      ),
      el("tbody", {}, ...rows),
    ),
  );
  details.addEventListener("toggle", () => {
    (details.open ? view.opened : view.closed).add(round.round_id);
    (details.open ? view.closed : view.opened).delete(round.round_id);
  });
  return details;
}

function renderDetails(data) {
  const newest = data.rounds.length ? data.rounds[data.rounds.length - 1].round_id : null;
  const blocks = [...data.rounds]
    .reverse()
    .map((round) => renderRoundDetail(round, data.epsilon_budget, round.round_id === newest));
  document.getElementById("round-details").replaceChildren(...blocks);
}

function renderCountdowns() {
  for (const cell of document.querySelectorAll("#rounds td.deadline")) {
    const round = { deadline: Number(cell.dataset.deadline), status: cell.dataset.status };
    cell.textContent = deadlineText(round);
  }
}

function render(data) {
  const privacy =
    data.epsilon_budget !== null ||
    data.rounds.some((r) => r.organisations.some((o) => o.epsilon !== null));
  document.body.classList.toggle("no-dp", !privacy);
  renderProgress(data);
  renderChart(data);
  renderRounds(data);
  renderTotals(data);
  renderDetails(data);
}

// --------------------------------------------------------------------- poll

async function poll() {
  const [dashboard, health] = await Promise.allSettled([
    getJson("v1/dashboard"),
    getJson("v1/health"),
  ]);
  renderHealth(health);
  const updated = document.getElementById("updated");
  if (dashboard.status === "fulfilled") {
    const text = JSON.stringify(dashboard.value);
    if (text !== view.dataText) {
      view.data = dashboard.value;
      view.dataText = text;
      render(view.data);
    } else {
      renderCountdowns();
    }
    updated.textContent = `updated ${utc(Date.now() / 1000)} UTC; refreshes every ${POLL_MS / 1000} s`;
    updated.className = "muted";
  } else {
    const error = dashboard.reason;
    const why = error.code ? `${error.code}: ${error.message}` : error.message;
    updated.textContent = `could not refresh at ${utc(Date.now() / 1000)} UTC: ${why}`;
    updated.className = "bad";
  }
  setTimeout(poll, POLL_MS);
}

poll();
