// A campaign's charts, drawn with the vendored Chart.js (static/vendor/) from its story:
// the JSON of GET /api/campaigns/{id}/story on the page, or the same JSON inlined in
// report.html (docs/page.md, "Charts"). The same file serves both; it only draws and
// never fetches anything. Texts are set with textContent, never as HTML.
"use strict";

(function () {
  const COLORS = {
    sent: "#2e7d32", failed: "#c62828", unknown: "#ef6c00", retried: "#1565c0", in_flight: "#9e9e9e",
    pending: "#6d4c41", invalid: "#8e24aa", duplicate: "#78909c", suppressed: "#455a64",
    delivered: "#1b5e20", sent_at_carrier: "#66bb6a", undelivered: "#d84315",
    not_found: "#fbc02d", ambiguous: "#ff8f00", not_checked: "#bdbdbd",
  };
  const OUTCOMES = ["sent", "failed", "unknown", "retried", "in_flight"];
  const STATUSES = ["sent", "failed", "unknown", "pending", "invalid", "duplicate", "suppressed"];
  const FUNNEL = ["sent", "delivered", "sent_at_carrier", "undelivered", "failed", "not_found", "ambiguous", "not_checked"];
  const TITLES = {
    rate: "Requests per second, by outcome",
    progress: "Progress",
    statuses: "Statuses",
    funnel: "Delivery: what became of the sent SMS",
    reasons: "Top failure reasons",
    waiting: "People waiting for their send window",
  };
  const ORDER = ["rate", "progress", "statuses", "funnel", "reasons", "waiting"];

  const words = (name) => name.replace(/_/g, " ");

  function clock(seconds, withDate) {
    const text = new Date(seconds * 1000).toISOString();
    return (withDate ? text.slice(5, 10) + " " : "") + text.slice(11, 19);
  }

  function timeAxis(start, end) {
    const withDate = end - start > 86400;
    return {
      type: "linear",
      min: start,
      max: end,
      title: { display: true, text: "time (UTC)" },
      // Whole seconds only: a short campaign's axis would say the same second twice.
      ticks: { maxTicksLimit: 8, callback: (value) => (value % 1 ? "" : clock(value, withDate)) },
    };
  }

  function base(extra) {
    return {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      plugins: { legend: { position: "bottom" } },
      ...extra,
    };
  }

  function rateChart(story) {
    const rate = story.rate;
    // A bucket's value holds from its start to the next one's; the last one's to its end.
    const points = (values) => values.map((y, i) => ({ x: rate.start + i * rate.step, y }))
      .concat(values.length ? [{ x: rate.start + values.length * rate.step, y: values[values.length - 1] }] : []);
    const shown = OUTCOMES.filter((o, i) => i === 0 || (rate.series[o] || []).some((v) => v > 0));
    const end = rate.start === null ? 1 : rate.start + Math.max(rate.series.sent.length, 1) * rate.step;
    return {
      type: "line",
      data: {
        datasets: shown.map((o, i) => ({
          label: words(o),
          data: rate.start === null ? [] : points(rate.series[o]),
          borderColor: COLORS[o],
          backgroundColor: COLORS[o] + "55",
          fill: i === 0 ? "origin" : "-1", // stacked areas
          stepped: true,
          pointRadius: 0,
          borderWidth: 1.5,
        })),
      },
      options: base({
        parsing: false,
        normalized: true,
        scales: {
          x: timeAxis(rate.start === null ? 0 : rate.start, end),
          y: { stacked: true, beginAtZero: true, title: { display: true, text: "requests / s" } },
        },
      }),
    };
  }

  function progressChart(story) {
    const p = story.progress;
    const times = p.settled.map((_, i) => p.start + (i + 1) * p.step);
    const datasets = [{
      label: "people settled",
      data: p.start === null ? [] : [{ x: p.start, y: 0 }, ...p.settled.map((y, i) => ({ x: times[i], y }))]
        .concat(p.running && times.length ? [{ x: Math.max(story.generated_at, times[times.length - 1]), y: p.settled_now }] : []),
      borderColor: COLORS.sent,
      backgroundColor: COLORS.sent + "33",
      fill: true,
      pointRadius: 0,
    }];
    let end = times.length ? times[times.length - 1] : 1;
    if (p.running) end = Math.max(end, story.generated_at);
    if (p.eta_at && times.length) {
      datasets.push({
        label: "at the recent rate (ETA)",
        data: [{ x: story.generated_at, y: p.settled_now }, { x: p.eta_at, y: p.total }],
        borderColor: COLORS.retried,
        borderDash: [6, 4],
        pointRadius: 2,
      });
      end = Math.max(end, p.eta_at);
    }
    const start = p.start === null ? 0 : p.start;
    datasets.push({
      label: "to settle",
      data: [{ x: start, y: p.total }, { x: end, y: p.total }],
      borderColor: "#616161",
      borderDash: [2, 3],
      pointRadius: 0,
    });
    return {
      type: "line",
      data: { datasets },
      options: base({
        parsing: false,
        scales: { x: timeAxis(start, end), y: { beginAtZero: true, title: { display: true, text: "people" } } },
      }),
    };
  }

  function barChart(labels, values, colors, title, horizontal) {
    return {
      type: "bar",
      data: { labels, datasets: [{ label: title, data: values, backgroundColor: colors }] },
      options: base({
        indexAxis: horizontal ? "y" : "x",
        plugins: { legend: { display: false } },
        scales: { [horizontal ? "x" : "y"]: { beginAtZero: true, ticks: { precision: 0 } } },
      }),
    };
  }

  function statusesChart(story) {
    const names = STATUSES.concat(Object.keys(story.statuses).filter((s) => !STATUSES.includes(s)));
    return barChart(names.map(words), names.map((s) => story.statuses[s] || 0),
      names.map((s) => COLORS[s] || "#607d8b"), "people", true);
  }

  function funnelChart(story) {
    return barChart(FUNNEL.map(words), FUNNEL.map((s) => story.funnel[s] || 0),
      FUNNEL.map((s) => COLORS[s]), "people", true);
  }

  function reasonsChart(story) {
    const cut = (text) => (text.length > 48 ? text.slice(0, 47) + "…" : text);
    return barChart(story.reasons.map((r) => cut(r.reason)), story.reasons.map((r) => r.count),
      story.reasons.map((r) => (r.kind.startsWith("delivery") ? COLORS.undelivered : COLORS.failed)), "people", true);
  }

  function waitingChart(story) {
    return barChart(story.waiting.map((w) => w.opens), story.waiting.map((w) => w.people),
      story.waiting.map(() => COLORS.pending), "people", false);
  }

  const BUILD = {
    rate: rateChart, progress: progressChart, statuses: statusesChart,
    funnel: funnelChart, reasons: reasonsChart, waiting: waitingChart,
  };

  // The figure of one chart: made when the container has none (the page), found when the
  // file already carries it with its text (report.html).
  function figure(root, name) {
    let node = root.querySelector(`figure[data-chart="${name}"]`);
    if (node) return node;
    node = document.createElement("figure");
    node.className = "chart";
    node.dataset.chart = name;
    const title = document.createElement("h3");
    title.textContent = TITLES[name];
    const box = document.createElement("div");
    box.className = "chart-box";
    const canvas = document.createElement("canvas");
    canvas.setAttribute("role", "img");
    box.append(canvas);
    const caption = document.createElement("figcaption");
    caption.className = "chart-text";
    node.append(title, box, caption);
    root.append(node);
    return node;
  }

  function reasonsTable(node, reasons) {
    let table = node.querySelector("table.reasons");
    if (!table) {
      table = document.createElement("table");
      table.className = "reasons";
      node.append(table);
    }
    table.replaceChildren();
    const head = table.createTHead().insertRow();
    for (const h of ["People", "Where", "Reason"]) head.append(Object.assign(document.createElement("th"), { textContent: h }));
    const body = table.createTBody();
    for (const r of reasons) {
      const row = body.insertRow();
      row.insertCell().textContent = String(r.count);
      row.insertCell().textContent = r.kind;
      row.insertCell().textContent = r.reason;
    }
    table.hidden = reasons.length === 0;
  }

  function drawStory(root, story) {
    for (const name of ORDER) {
      const node = figure(root, name);
      const text = story.text[name];
      node.querySelector(".chart-text").textContent = text;
      const canvas = node.querySelector("canvas");
      canvas.setAttribute("aria-label", `${TITLES[name]}: ${text}`);
      const config = BUILD[name](story);
      const chart = Chart.getChart(canvas);
      if (chart) {
        chart.data = config.data;
        chart.options = config.options;
        chart.update("none");
      } else {
        new Chart(canvas, config);
      }
      if (name === "reasons") reasonsTable(node, story.reasons);
    }
  }

  window.drawStory = drawStory;
})();
