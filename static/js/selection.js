// The run page's checkpoint-selection curve: the selection metric of each scored checkpoint with its 95%
// interval, the chosen one marked. Redrawn whenever the polled status fragment brings new scores.
(function () {
  "use strict";

  function draw() {
    var el = document.getElementById("selection-chart");
    var node = document.getElementById("selection-data");
    if (!el || !node || !window.Plotly) return;
    var data;
    try { data = JSON.parse(node.textContent); } catch (e) { return; }
    var points = ((data && data.points) || []).filter(function (p) { return typeof p.mean === "number"; });
    if (!points.length) {
      if (!el.querySelector(".muted")) el.innerHTML = '<p class="muted">' + (el.dataset.empty || "No checkpoint scored yet.") + "</p>";
      return;
    }
    if (el.querySelector(".muted")) el.innerHTML = "";
    var steps = points.map(function (p) { return p.step; });
    var means = points.map(function (p) { return p.mean; });
    var traces = [{
      x: steps, y: means, name: data.metric, mode: "lines+markers", line: { color: "#1a7f37", width: 2 }, marker: { size: 7 },
      error_y: { type: "data", symmetric: false, visible: true, color: "#1a7f37", thickness: 1.2, width: 4,
        array: points.map(function (p) { return p.ci_high === null ? 0 : p.ci_high - p.mean; }),
        arrayminus: points.map(function (p) { return p.ci_low === null ? 0 : p.mean - p.ci_low; }) },
      customdata: points.map(function (p) { return [p.ci_low, p.ci_high, p.n]; }),
      hovertemplate: "step %{x}<br>" + data.metric + " %{y:.4f}<br>95% [%{customdata[0]:.4f}, %{customdata[1]:.4f}] over %{customdata[2]} rows<extra></extra>",
    }];
    var chosen = points.filter(function (p) { return p.step === data.chosen_step; });
    if (chosen.length) {
      traces.push({ x: [chosen[0].step], y: [chosen[0].mean], name: "chosen", mode: "markers",
        marker: { size: 15, symbol: "star", color: "#c4320a" }, hovertemplate: "chosen: step %{x}<extra></extra>" });
    }
    Plotly.react(el, traces, {
      margin: { l: 64, r: 30, t: 40, b: 50 }, font: { family: "system-ui, sans-serif", size: 12 },
      paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)", uirevision: "selection",
      legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom" },
      xaxis: { title: { text: "optimizer step" }, rangemode: "tozero", automargin: true },
      yaxis: { title: { text: data.metric + " (selection rows)" }, automargin: true },
    }, { responsive: true, displaylogo: false });
  }

  document.addEventListener("DOMContentLoaded", draw);
  document.addEventListener("htmx:afterSettle", draw);
  window.addEventListener("load", draw);
})();
