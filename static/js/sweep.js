// A sweep's charts: the optimisation history (each trial's selection score with its interval, and the best so far)
// and a parallel-coordinates chart (one line per trial across its parameters and its score, each axis scaled to
// its own range), drawn from the polled status fragment's data.
(function () {
  "use strict";

  function base(extra) {
    return Object.assign({
      margin: { l: 64, r: 30, t: 36, b: 56 }, font: { family: "system-ui, sans-serif", size: 12 },
      paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)", showlegend: false,
    }, extra);
  }
  var config = { responsive: true, displaylogo: false };

  function note(el, text) { if (text && !el.querySelector(".muted")) el.innerHTML = '<p class="muted">' + text + "</p>"; }

  function draw() {
    var node = document.getElementById("sweep-data");
    var history = document.getElementById("sweep-history");
    var parallel = document.getElementById("sweep-parallel");
    if (!node || !history || !window.Plotly) return;
    var data;
    try { data = JSON.parse(node.textContent); } catch (e) { return; }
    var done = (data.trials || []).filter(function (t) { return t.score && typeof t.score.mean === "number"; });
    if (!done.length) { note(history, history.dataset.empty); return; }
    if (history.querySelector(".muted")) history.innerHTML = "";
    done.sort(function (a, b) { return a.trial - b.trial; });
    var best = [], top = -Infinity;
    done.forEach(function (t) { top = Math.max(top, t.score.mean); best.push(top); });
    var winner = data.winner ? data.winner.winner : null;
    Plotly.react(history, [
      { x: done.map(function (t) { return t.trial; }), y: done.map(function (t) { return t.score.mean; }), mode: "markers", name: "trial",
        marker: { size: done.map(function (t) { return t.child === winner ? 15 : 8; }), color: done.map(function (t) { return t.child === winner ? "#c4320a" : "#3358d4"; }),
                  symbol: done.map(function (t) { return t.child === winner ? "star" : "circle"; }) },
        error_y: { type: "data", symmetric: false, color: "#98a2b3", thickness: 1, width: 3,
                   array: done.map(function (t) { return t.score.ci_high - t.score.mean; }), arrayminus: done.map(function (t) { return t.score.mean - t.score.ci_low; }) },
        hovertemplate: "trial %{x}<br>" + data.metric + " %{y:.4f}<extra></extra>" },
      { x: done.map(function (t) { return t.trial; }), y: best, mode: "lines", name: "best so far", line: { color: "#1a7f37", shape: "hv" } },
    ], base({ title: { text: "optimisation history", font: { size: 13 } }, xaxis: { title: { text: "trial" }, dtick: 1 },
             yaxis: { title: { text: "selection " + data.metric } } }), config);

    if (!parallel) return;
    var params = Object.keys(done[0].params || {});
    var axes = params.concat(["score"]);
    var value = function (t, axis) { return axis === "score" ? t.score.mean : t.params[axis]; };
    var numeric = {};
    axes.forEach(function (axis) { numeric[axis] = done.every(function (t) { return typeof value(t, axis) === "number"; }); });
    var scale = {};
    axes.forEach(function (axis) {
      if (numeric[axis]) {
        var vals = done.map(function (t) { return value(t, axis); });
        var lo = Math.min.apply(null, vals), hi = Math.max.apply(null, vals);
        var log = axis.indexOf("learning_rate") >= 0 && lo > 0;
        scale[axis] = function (v) {
          if (hi === lo) return 0.5;
          return log ? (Math.log(v) - Math.log(lo)) / (Math.log(hi) - Math.log(lo)) : (v - lo) / (hi - lo);
        };
      } else {
        var levels = Array.from(new Set(done.map(function (t) { return String(value(t, axis)); }))).sort();
        scale[axis] = function (v) { return levels.length < 2 ? 0.5 : levels.indexOf(String(v)) / (levels.length - 1); };
      }
    });
    var scores = done.map(function (t) { return t.score.mean; });
    var smin = Math.min.apply(null, scores), smax = Math.max.apply(null, scores);
    var traces = done.map(function (t) {
      var share = smax === smin ? 1 : (t.score.mean - smin) / (smax - smin);
      return {
        x: axes.map(function (_, i) { return i; }), y: axes.map(function (axis) { return scale[axis](value(t, axis)); }),
        mode: "lines+markers", line: { width: t.child === winner ? 4 : 2, color: "rgba(51, 88, 212, " + (0.25 + 0.75 * share).toFixed(2) + ")" },
        marker: { size: 5 }, text: axes.map(function (axis) { return axis + " = " + value(t, axis); }),
        hovertemplate: "trial " + t.trial + "<br>%{text}<extra></extra>",
      };
    });
    Plotly.react(parallel, traces, base({
      title: { text: "parameters and score, one line per trial (darker: higher score; thick: the winner)", font: { size: 13 } },
      xaxis: { tickmode: "array", tickvals: axes.map(function (_, i) { return i; }), ticktext: axes.map(function (a) { return a.replace("training.", ""); }) },
      yaxis: { title: { text: "each axis scaled to its range" }, range: [-0.05, 1.05], showticklabels: false },
    }), config);
  }

  document.addEventListener("DOMContentLoaded", draw);
  document.addEventListener("htmx:afterSettle", draw);
  window.addEventListener("load", draw);
})();
