// Charts (plotly.js, served by the app) and small form behaviours. Everything
// here is progressive: the pages work without it.
(function () {
  "use strict";

  function readJSON(id) {
    var node = document.getElementById(id);
    if (!node) return null;
    try { return JSON.parse(node.textContent); } catch (e) { return null; }
  }

  var layoutBase = {
    margin: { l: 50, r: 20, t: 30, b: 50 }, font: { family: "system-ui, sans-serif", size: 12 },
    paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)", legend: { orientation: "h", y: 1.12 },
  };
  var config = { responsive: true, displaylogo: false };
  var variantColors = { base: "#98a2b3", finetuned: "#3358d4", dataset: "#1a7f37" };

  function emptyNote(el, text) {
    if (!el.querySelector(".muted")) { el.innerHTML = '<p class="muted">' + text + "</p>"; }
  }

  function drawLoss() {
    var el = document.getElementById("loss-chart");
    var history = readJSON("train-history");
    if (!el || !window.Plotly) return;
    if (!history || !history.length) { emptyNote(el, el.dataset.empty || "No training steps yet."); return; }
    if (el.querySelector(".muted")) el.innerHTML = "";
    var steps = history.map(function (h) { return h.step; });
    Plotly.react(el, [
      { x: steps, y: history.map(function (h) { return h.loss; }), name: "loss", mode: "lines", line: { color: "#3358d4" } },
      { x: steps, y: history.map(function (h) { return h.learning_rate; }), name: "learning rate", mode: "lines", yaxis: "y2", line: { color: "#98a2b3", dash: "dot" } },
    ], Object.assign({}, layoutBase, {
      xaxis: { title: { text: "step" } }, yaxis: { title: { text: "loss" } },
      yaxis2: { title: { text: "learning rate" }, overlaying: "y", side: "right", showgrid: false, tickformat: ".1e" },
    }), config);
  }

  function drawResults() {
    var data = readJSON("results-chart-data");
    if (!data || !window.Plotly) return;
    document.querySelectorAll(".results-chart").forEach(function (el) {
      var byVariant = data[el.dataset.dataset] || {};
      var traces = ["base", "finetuned", "dataset"].filter(function (v) { return byVariant[v]; }).map(function (v) {
        var metrics = Object.keys(byVariant[v]);
        return { type: "bar", name: v, x: metrics, y: metrics.map(function (m) { return byVariant[v][m]; }), marker: { color: variantColors[v] } };
      });
      if (!traces.length) { emptyNote(el, "Nothing measured."); return; }
      Plotly.react(el, traces, Object.assign({}, layoutBase, { barmode: "group", yaxis: { title: { text: "score" }, rangemode: "tozero" } }), config);
    });
  }

  function drawCompare() {
    var el = document.getElementById("compare-chart");
    var data = readJSON("compare-chart-data");
    if (!el || !data || !window.Plotly) return;
    var runs = Object.keys(data);
    if (!runs.length) { emptyNote(el, "No scores to compare yet."); return; }
    var traces = runs.map(function (run) {
      var keys = Object.keys(data[run]);
      return { type: "bar", name: run, x: keys, y: keys.map(function (k) { return data[run][k]; }) };
    });
    Plotly.react(el, traces, Object.assign({}, layoutBase, { barmode: "group", yaxis: { title: { text: "score" }, rangemode: "tozero" } }), config);
  }

  function syncRunForm() {
    var form = document.getElementById("run-form");
    if (!form) return;
    var kind = form.querySelector('input[name="kind"]:checked');
    var finetune = !kind || kind.value === "finetune";
    form.querySelectorAll("[data-finetune-only]").forEach(function (el) { el.style.display = finetune ? "" : "none"; });
    var url = form.querySelector('[name="judge_base_url"]');
    var model = form.querySelector('[name="judge_model"]');
    var judged = !!(url && model && url.value.trim() && model.value.trim());
    form.querySelectorAll(".judge-metrics input[type=checkbox]").forEach(function (box) {
      box.disabled = !judged;
      if (!judged) box.checked = false;
    });
    var note = document.getElementById("judge-note");
    if (note) note.style.display = judged ? "none" : "";
  }

  function drawAll() { drawLoss(); drawResults(); drawCompare(); syncRunForm(); }

  document.addEventListener("DOMContentLoaded", drawAll);
  document.addEventListener("htmx:afterSettle", drawAll);
  document.addEventListener("change", function (event) { if (event.target.closest("#run-form")) syncRunForm(); });
  document.addEventListener("input", function (event) { if (event.target.closest("#run-form")) syncRunForm(); });
})();
