// Charts (plotly.js, served by the app) and small page behaviours. Everything
// here is progressive: the pages work without it.
(function () {
  "use strict";

  function readJSON(id) {
    var node = document.getElementById(id);
    if (!node) return null;
    try { return JSON.parse(node.textContent); } catch (e) { return null; }
  }

  // The same colour for a variant on every page and chart.
  var variantColors = { finetuned: "#3358d4", base: "#98a2b3", dataset: "#1a7f37" };
  var variantLabels = { finetuned: "fine-tuned", base: "base model", dataset: "stored answers" };
  var runColors = ["#3358d4", "#c4320a", "#1a7f37", "#a15c07", "#7c3aed", "#0e7490", "#be185d", "#4d7c0f", "#475467", "#b45309", "#1d4ed8", "#9f1239"];

  function layout(extra) {
    return Object.assign({
      margin: { l: 60, r: 30, t: 40, b: 50 }, font: { family: "system-ui, sans-serif", size: 12 },
      paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
      legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom" },
    }, extra || {});
  }
  var plotConfig = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["select2d", "lasso2d"] };

  function emptyNote(el, text) {
    if (window.Plotly && el.data) Plotly.purge(el);
    if (!el.querySelector(".muted")) { el.innerHTML = '<p class="muted">' + text + "</p>"; }
  }
  function clearNote(el) { if (el.querySelector(".muted")) el.innerHTML = ""; }

  // --- the live loss curve ---------------------------------------------------------

  // Exponential moving average with the start-up bias removed (as TensorBoard smooths).
  function smooth(values, weight) {
    var out = [], last = 0, n = 0;
    values.forEach(function (v) {
      if (v === null || v === undefined || !isFinite(v)) { out.push(null); return; }
      n += 1;
      last = last * weight + (1 - weight) * v;
      out.push(last / (1 - Math.pow(weight, n)));
    });
    return out;
  }

  // The step at which each whole epoch ends: where the epoch counter reaches 1, 2, ...
  function epochEnds(history) {
    var ends = [], next = 1;
    history.forEach(function (h) {
      if (typeof h.epoch !== "number") return;
      while (h.epoch + 1e-9 >= next) { ends.push({ step: h.step, epoch: next }); next += 1; }
    });
    return ends;
  }

  function drawLoss() {
    var el = document.getElementById("loss-chart");
    if (!el || !window.Plotly) return;
    var history = (readJSON("train-history") || []).filter(function (h) { return h && typeof h.step === "number"; });
    var train = history.filter(function (h) { return typeof h.loss === "number"; });
    var val = history.filter(function (h) { return typeof h.val_loss === "number"; });
    if (!train.length && !val.length) { emptyNote(el, el.dataset.empty || "No training steps yet."); return; }
    clearNote(el);
    var logScale = document.getElementById("loss-log-scale");
    var slider = document.getElementById("loss-smoothing");
    var weight = slider ? parseFloat(slider.value) : 0.6;
    var steps = train.map(function (h) { return h.step; });
    var losses = train.map(function (h) { return h.loss; });
    var traces = [
      { x: steps, y: losses, name: "loss (raw)", mode: train.length < 25 ? "lines+markers" : "lines", marker: { size: 5 }, line: { color: "#3358d4", width: 1 }, opacity: 0.35, hovertemplate: "step %{x}<br>loss %{y:.4f}<extra>raw</extra>" },
      { x: steps, y: smooth(losses, weight), name: "loss (smoothed)", mode: "lines", line: { color: "#3358d4", width: 2.5 }, hovertemplate: "step %{x}<br>loss %{y:.4f}<extra>smoothed</extra>" },
    ];
    if (val.length) {
      traces.push({ x: val.map(function (h) { return h.step; }), y: val.map(function (h) { return h.val_loss; }), name: "validation loss",
        mode: "lines+markers", line: { color: "#c4320a", width: 2 }, marker: { size: 7 }, hovertemplate: "step %{x}<br>validation loss %{y:.4f}<extra></extra>" });
    }
    var lr = train.filter(function (h) { return typeof h.learning_rate === "number"; });
    if (lr.length) {
      traces.push({ x: lr.map(function (h) { return h.step; }), y: lr.map(function (h) { return h.learning_rate; }), name: "learning rate", mode: "lines",
        yaxis: "y2", line: { color: "#98a2b3", dash: "dot", width: 1.5 }, hovertemplate: "step %{x}<br>learning rate %{y:.2e}<extra></extra>" });
    }
    var shapes = [], annotations = [];
    epochEnds(history).forEach(function (end) {
      shapes.push({ type: "line", xref: "x", yref: "paper", x0: end.step, x1: end.step, y0: 0, y1: 1, line: { color: "#cbd5e1", width: 1, dash: "dash" } });
      annotations.push({ xref: "x", yref: "paper", x: end.step, y: 1, yanchor: "bottom", text: "epoch " + end.epoch, showarrow: false, font: { size: 10, color: "#667085" } });
    });
    Plotly.react(el, traces, layout({
      uirevision: "loss", shapes: shapes, annotations: annotations, margin: { l: 64, r: 80, t: 56, b: 50 },
      legend: { orientation: "h", x: 0, y: 1.12, yanchor: "bottom" },
      xaxis: { title: { text: "optimizer step" }, automargin: true, rangemode: "tozero" },
      yaxis: { title: { text: "loss" }, automargin: true, type: logScale && logScale.checked ? "log" : "linear" },
      yaxis2: { title: { text: "learning rate" }, overlaying: "y", side: "right", showgrid: false, exponentformat: "e", tickformat: ".1e",
        automargin: true, rangemode: "tozero" },
    }), plotConfig);
  }

  // --- results: one small chart per metric, each on its own scale ------------------------

  function grid(n, maxColumns) {
    var columns = Math.min(n, maxColumns);
    return { columns: columns, rows: Math.ceil(n / columns) };
  }

  function axisName(prefix, i) { return prefix + (i === 0 ? "" : String(i + 1)); }

  function smallMultiples(el, panels, options) {
    // panels: [{title, subtitle, bars: [{variant, x: [...], y: [...]}]}]
    var g = grid(panels.length, options.columns);
    var traces = [], annotations = [], axes = {}, seen = {};
    panels.forEach(function (panel, i) {
      var xa = axisName("x", i), ya = axisName("y", i);
      panel.bars.forEach(function (bar) {
        traces.push({
          type: "bar", orientation: options.horizontal ? "h" : "v", name: variantLabels[bar.variant] || bar.variant, legendgroup: bar.variant,
          showlegend: !seen[bar.variant], marker: { color: variantColors[bar.variant] || "#475467" },
          x: options.horizontal ? bar.y : bar.x, y: options.horizontal ? bar.x : bar.y, xaxis: xa, yaxis: ya,
          text: bar.y.map(function (v) { return v === null || v === undefined ? "not measured" : v.toFixed(3); }),
          textposition: "outside", cliponaxis: false,
          hovertemplate: "%{" + (options.horizontal ? "y" : "x") + "}<br>" + (variantLabels[bar.variant] || bar.variant) + ": %{" + (options.horizontal ? "x" : "y") + ":.4f}<extra>" + panel.title + "</extra>",
        });
        seen[bar.variant] = true;
      });
      var valueAxis = { rangemode: "tozero", automargin: true, zeroline: true, zerolinecolor: "#cbd5e1" };
      var categoryAxis = { automargin: true, showticklabels: !!options.showCategories, type: "category" };
      if (options.horizontal) {
        axes[axisName("xaxis", i)] = valueAxis;
        axes[axisName("yaxis", i)] = Object.assign({}, categoryAxis, { autorange: "reversed" });
      } else {
        axes[axisName("xaxis", i)] = categoryAxis;
        axes[axisName("yaxis", i)] = valueAxis;
      }
      var measured = panel.bars.some(function (bar) { return bar.y.some(function (v) { return v !== null && v !== undefined; }); });
      if (!measured) {
        annotations.push({ xref: xa + " domain", yref: ya + " domain", x: 0.5, y: 0.5, showarrow: false, text: "not measured", font: { size: 13, color: "#a15c07" } });
      }
      annotations.push({ xref: xa + " domain", yref: ya + " domain", x: 0.5, y: 1, yanchor: "bottom", yshift: 4, showarrow: false,
        text: "<b>" + panel.title + "</b>" + (panel.subtitle ? "<br><span style='font-size:10px;color:#667085'>" + panel.subtitle + "</span>" : ""),
        font: { size: 12 } });
    });
    var height = g.rows * (options.panelHeight || 210) + 70;
    el.style.height = height + "px";
    el.style.minHeight = height + "px";
    Plotly.react(el, traces, layout(Object.assign({
      grid: { rows: g.rows, columns: g.columns, pattern: "independent", xgap: 0.18, ygap: 0.45 }, barmode: "group", height: height,
      annotations: annotations, margin: { l: options.horizontal ? 10 : 50, r: 20, t: 70, b: 30 },
      legend: { orientation: "h", x: 0, y: 1, yanchor: "top", yref: "container" },
    }, axes)), plotConfig);
  }

  // --- differences with their 95% intervals, as error bars ----------------------------------

  // A filled marker is a verdict of the paired test (better or worse, Holm-adjusted); a hollow one is not (no
  // significant difference, too few pairs): only a verdict is coloured, as in the tables.
  // Several runs on one chart are told apart by the marker's shape (and the legend), never by a colour.
  var verdictColors = { better: "#1a7f37", worse: "#c4320a" };
  var runSymbols = ["circle", "square", "diamond", "triangle-up", "star", "hexagon", "cross", "x", "pentagon", "hourglass", "bowtie"];

  function differencePlot(el, categories, series) {
    // series: [{name, delta: [...], low: [...], high: [...], verdict: [...], n_pairs: [...]}]
    function missing(v) { return v === null || v === undefined; }
    var traces = series.map(function (s, i) {
      var colors = s.verdict.map(function (v) { return verdictColors[v] || "#667085"; });
      var shape = runSymbols[i % runSymbols.length];
      return {
        type: "scatter", mode: "markers", name: s.name, y: categories, x: s.delta, showlegend: series.length > 1,
        error_x: {
          type: "data", symmetric: false, visible: true, thickness: 1.6, width: 5, color: "#475467",
          array: s.delta.map(function (d, j) { return missing(d) || missing(s.high[j]) ? 0 : s.high[j] - d; }),
          arrayminus: s.delta.map(function (d, j) { return missing(d) || missing(s.low[j]) ? 0 : d - s.low[j]; }),
        },
        marker: { size: 11, color: colors, line: { width: 2, color: colors },
          symbol: s.verdict.map(function (v) { return verdictColors[v] ? shape : shape + "-open"; }) },
        customdata: s.delta.map(function (d, j) {
          return [missing(s.low[j]) ? "n/a" : s.low[j].toFixed(4), missing(s.high[j]) ? "n/a" : s.high[j].toFixed(4), s.verdict[j] || "not compared", s.n_pairs[j]];
        }),
        hovertemplate: "%{y}<br>%{x:+.4f}, 95% CI [%{customdata[0]}, %{customdata[1]}]<br><b>%{customdata[2]}</b> (%{customdata[3]} pairs)<extra>" + (s.name || "") + "</extra>",
      };
    });
    var height = Math.max(160, categories.length * (26 + 16 * series.length) + 90);
    el.style.height = height + "px";
    el.style.minHeight = height + "px";
    Plotly.react(el, traces, layout({
      height: height, scattermode: "group", margin: { l: 10, r: 30, t: 30, b: 50 },
      xaxis: { title: { text: "difference (95% interval)" }, zeroline: true, zerolinecolor: "#111827", zerolinewidth: 1.5, automargin: true },
      yaxis: { type: "category", automargin: true, autorange: "reversed" },
      legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom" },
    }), plotConfig);
  }

  function drawResults() {
    var data = readJSON("results-chart-data");
    if (!data || !window.Plotly) return;
    document.querySelectorAll(".results-chart").forEach(function (el) {
      var table = data[el.dataset.dataset];
      if (!table || !table.metrics.length) { emptyNote(el, "Nothing measured."); return; }
      var variants = Object.keys(table.variants);
      var panels = table.metrics.map(function (metric, i) {
        return {
          title: metric, subtitle: table.model_independent[i] ? "same for every model (retrieval only)" : "",
          bars: variants.map(function (v) { return { variant: v, x: [variantLabels[v] || v], y: [table.variants[v][i]] }; }),
        };
      });
      smallMultiples(el, panels, { columns: 4, panelHeight: 200 });
    });
    document.querySelectorAll(".diff-chart").forEach(function (el) {
      var table = data[el.dataset.dataset];
      var rows = (table && table.differences) || [];
      if (!rows.length) { emptyNote(el, "No paired comparison recorded (it comes with the compare job)."); return; }
      clearNote(el);
      differencePlot(el, rows.map(function (r) { return r.metric; }), [{
        name: "fine-tuned − base", delta: rows.map(function (r) { return r.delta; }), low: rows.map(function (r) { return r.ci_low; }),
        high: rows.map(function (r) { return r.ci_high; }), verdict: rows.map(function (r) { return r.verdict; }), n_pairs: rows.map(function (r) { return r.n_pairs; }),
      }]);
    });
  }

  function drawCompare() {
    var el = document.getElementById("compare-chart");
    var data = readJSON("compare-chart-data");
    if (el && data && window.Plotly) {
      if (!data.panels.length) { emptyNote(el, "No scores to compare yet."); }
      else {
        var panels = data.panels.map(function (panel) {
          return { title: panel.title, bars: Object.keys(panel.values).map(function (v) { return { variant: v, x: data.runs, y: panel.values[v] }; }) };
        });
        // One column: the run labels of a second column would sit on the first one's bars.
        smallMultiples(el, panels, { columns: 1, horizontal: true, showCategories: true, panelHeight: Math.max(120, 30 * data.runs.length * Object.keys(data.panels[0].values).length + 50) });
      }
    }
    var diffEl = document.getElementById("compare-diff-chart");
    var diff = readJSON("compare-diff-data");
    if (diffEl && diff && window.Plotly && diff.categories.length) {
      differencePlot(diffEl, diff.categories, diff.runs.map(function (run) {
        return { name: run.run + " − " + diff.reference, delta: run.delta, low: run.low, high: run.high, verdict: run.verdict, n_pairs: run.n_pairs };
      }));
    }
    var lossEl = document.getElementById("compare-loss-chart");
    var losses = readJSON("compare-loss-data");
    if (lossEl && losses && window.Plotly) {
      if (!losses.length) { emptyNote(lossEl, "None of these runs trained."); return; }
      Plotly.react(lossEl, losses.map(function (run, i) {
        return { x: run.steps, y: run.loss, name: run.run, mode: "lines", line: { color: runColors[i % runColors.length], width: 2 } };
      }), layout({ xaxis: { title: { text: "optimizer step" }, automargin: true }, yaxis: { title: { text: "training loss" }, automargin: true } }), plotConfig);
    }
  }

  // --- the live run page ------------------------------------------------------------------

  var logsAtBottom = true;

  function syncRunPage() {
    var live = document.getElementById("run-live");
    if (!live) return;
    var logs = document.getElementById("run-logs");
    if (logs && logsAtBottom) logs.scrollTop = logs.scrollHeight;
    var repro = readJSON("run-repro-data");
    var details = document.getElementById("run-repro");
    if (repro && details && details.hidden) {
      document.getElementById("run-repro-text").textContent = JSON.stringify(repro, null, 2);
      details.hidden = false;
    }
    var resultsUrl = live.dataset.resultsUrl;
    var actions = document.getElementById("run-actions");
    if (resultsUrl && actions && !document.getElementById("results-link")) {
      var link = document.createElement("a");
      link.className = "button"; link.id = "results-link"; link.href = resultsUrl; link.textContent = "Results";
      actions.insertBefore(link, actions.firstChild);
    }
    if (live.dataset.status !== "pending") {  // "created and queued" is news until the run starts
      document.querySelectorAll('.messages [data-tags~="until-run-starts"]').forEach(function (li) {
        var list = li.parentNode; li.remove();
        if (list && !list.children.length) list.remove();
      });
    }
  }

  // A form that answers 400 with its errors (dataset upload) is swapped like a 200,
  // so the errors show in place and the chosen file (hx-preserve) stays chosen.
  document.addEventListener("htmx:beforeSwap", function (event) {
    if (event.detail.xhr.status === 400 && event.detail.elt.closest("[data-swap-errors]")) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
    }
  });

  // A server error on the New run form's buttons must not look like nothing happened.
  document.addEventListener("htmx:responseError", function (event) {
    var form = event.detail.elt.closest && event.detail.elt.closest("#run-form");
    var actions = form && form.querySelector(".actions");
    if (!actions) return;
    var old = actions.querySelector(".form-status");
    if (old) old.remove();
    var status = document.createElement("div");
    status.className = "form-status bad"; status.setAttribute("role", "alert");
    status.textContent = "The server could not answer (HTTP " + event.detail.xhr.status + "); nothing was created. Try again, or press Validate & launch.";
    actions.appendChild(status);
  });

  document.addEventListener("htmx:beforeSwap", function (event) {
    var logs = document.getElementById("run-logs");
    if (logs && event.detail.target && event.detail.target.contains(logs)) {
      logsAtBottom = logs.scrollHeight - logs.scrollTop - logs.clientHeight < 24;
    }
  });

  // --- dashboard: Compare needs two ticked runs -------------------------------------------

  // The runs in the order they were ticked: the first is the reference the others are paired with. The form
  // sends it as `runs`; without this script the boxes alone are sent, in page order.
  var tickOrder = [];

  function syncCompare(event) {
    var form = document.getElementById("compare-form");
    if (!form) return;
    var checked = Array.prototype.filter.call(form.querySelectorAll('input[name="run"]'), function (b) { return b.checked; })
      .map(function (b) { return b.value; });
    var box = event && event.target && event.target.name === "run" ? event.target : null;
    if (box) {
      tickOrder = tickOrder.filter(function (v) { return v !== box.value; });
      if (box.checked) tickOrder.push(box.value);
    }
    // Boxes ticked some other way (the browser restoring a page) follow in page order.
    tickOrder = tickOrder.filter(function (v) { return checked.indexOf(v) >= 0; })
      .concat(checked.filter(function (v) { return tickOrder.indexOf(v) < 0; }));
    var order = document.getElementById("compare-order");
    if (order) order.value = tickOrder.join(",");
    var ticked = tickOrder.length;
    var button = document.getElementById("compare-button");
    var hint = document.getElementById("compare-hint");
    if (button) button.disabled = ticked < 2;
    if (hint) {
      hint.textContent = ticked < 2 ? "Tick two or more runs to compare them (" + ticked + " ticked); the first you tick is the reference."
        : "Reference: #" + tickOrder[0] + " (ticked first); paired with it: " + tickOrder.slice(1).map(function (v) { return "#" + v; }).join(", ") + ".";
    }
  }

  // --- the New run form ---------------------------------------------------------------------

  function fieldLabel(field) {
    var label = field.querySelector("label");
    return (label ? label.textContent : field.id.replace(/^field-/, "")).trim();
  }

  function focusField(field) {
    field.scrollIntoView({ block: "center" });
    var input = field.querySelector("input:not([type=hidden]), select, textarea");
    if (input) input.focus({ preventScroll: true });
  }

  // Every problem, or "valid", next to the buttons: where the user is looking after pressing one.
  function syncErrors(form) {
    var actions = form.querySelector(".actions");
    if (!actions) return null;
    var old = actions.querySelector(".form-status");
    if (old) old.remove();
    var bad = Array.prototype.filter.call(form.querySelectorAll(".field"), function (f) {
      return f.classList.contains("has-error") || f.querySelector(".errorlist, .error");
    });
    var general = form.querySelector(".errorbox");
    var status = document.createElement("div");
    status.className = "form-status";
    status.setAttribute("role", bad.length || general ? "alert" : "status");
    if (bad.length) {
      status.classList.add("bad");
      status.appendChild(document.createTextNode(bad.length + " field" + (bad.length > 1 ? "s need" : " needs") + " fixing: "));
      bad.forEach(function (f, i) {
        var a = document.createElement("a");
        a.href = "#" + f.id; a.textContent = fieldLabel(f);
        a.addEventListener("click", function (e) { e.preventDefault(); focusField(f); });
        if (i) status.appendChild(document.createTextNode(", "));
        status.appendChild(a);
      });
    } else if (general) {
      status.classList.add("bad");
      status.textContent = "Not valid: see the message at the top of the form.";
    } else if (form.querySelector(".msg-success")) {
      status.classList.add("good");
      status.textContent = "✓ The config is valid.";
    } else {
      return null;
    }
    actions.appendChild(status);
    return bad[0] || general;
  }

  // How many optimizer steps the form's settings mean, as the trainer counts them.
  function syncSteps(form, finetune) {
    var rows = readJSON("train-dataset-rows") || {};
    var anchor = form.querySelector("#field-epochs");
    if (!anchor) return;
    var note = form.querySelector("#steps-implied");
    if (!note) {
      note = document.createElement("p");
      note.id = "steps-implied"; note.className = "hint steps-implied";
      (anchor.closest("fieldset") || anchor.parentNode).appendChild(note);
    }
    function num(name, fallback) {
      var input = form.querySelector('[name="' + name + '"]');
      var value = input ? parseFloat(input.value) : NaN;
      return isFinite(value) ? value : fallback;
    }
    var total = 0, chosen = 0;
    form.querySelectorAll('input[name="train_datasets"]:checked').forEach(function (box) {
      if (rows[box.value] !== undefined) { total += rows[box.value]; chosen += 1; }
    });
    var split = num("validation_split", 0);
    var trainRows = Math.max(0, Math.round(total * (1 - split)));
    var batch = num("batch_size", 0), accumulation = num("gradient_accumulation_steps", 1), epochs = num("epochs", 0), maxSteps = num("max_steps", 0);
    if (!finetune || !chosen || batch < 1 || epochs < 1 || accumulation < 1) {
      note.textContent = finetune ? "Pick a train dataset, a batch size and epochs to see how many optimizer steps this is." : "";
      return;
    }
    var perEpoch = Math.ceil(Math.ceil(trainRows / batch) / accumulation);
    var steps = perEpoch * epochs;
    var capped = maxSteps >= 1 && maxSteps < steps;
    note.textContent = "This trains for " + (capped ? maxSteps : steps) + " optimizer steps: " + trainRows + " rows, " + perEpoch +
      " steps per epoch × " + epochs + " epoch" + (epochs === 1 ? "" : "s") + (capped ? ", stopped at max steps " + maxSteps : "") + ".";
  }

  // A fine-tune's default name ("finetune-rag-qa") would mislabel an eval-only run:
  // switch the word with the kind, unless the user typed the name.
  function syncName(form, finetune) {
    var name = form.querySelector('input[name="name"]');
    if (!name || name.dataset.touched === "true") return;
    var from = finetune ? /\beval(-only)?\b/ : /\bfine-?tune\b/;
    if (from.test(name.value)) name.value = name.value.replace(from, finetune ? "finetune" : "eval");
  }

  function syncRunForm(event) {
    var form = document.getElementById("run-form");
    if (!form) return;
    var kind = form.querySelector('input[name="kind"]:checked');
    // Each kind's config sections (runs/kinds/): a section's fields show only for a kind that uses it.
    var sections = readJSON("kind-sections") || {};
    var uses = (kind && sections[kind.value]) || sections.finetune || [];
    form.querySelectorAll("[data-section]").forEach(function (el) {
      el.style.display = uses.some(function (s) { return s === el.dataset.section || s.indexOf(el.dataset.section + ".") === 0; }) ? "" : "none";
    });
    var finetune = uses.indexOf("training") >= 0;
    var url = form.querySelector('[name="judge_base_url"]');
    var model = form.querySelector('[name="judge_model"]');
    var judged = !!(url && model && url.value.trim() && model.value.trim());
    form.querySelectorAll(".judge-metrics input[type=checkbox]").forEach(function (box) {
      box.disabled = !judged;
      if (!judged) box.checked = false;
    });
    var note = document.getElementById("judge-note");
    if (note) note.style.display = judged ? "none" : "";
    if (event && event.target && event.target.name === "kind") syncName(form, finetune);
    syncSteps(form, finetune);
  }

  function afterFormRender() {
    var form = document.getElementById("run-form");
    if (!form) return;
    var first = syncErrors(form);
    if (first && form.dataset.focused !== "true") { form.dataset.focused = "true"; focusField(first); }
  }

  function drawAll() { drawLoss(); drawResults(); drawCompare(); syncRunPage(); syncCompare(); syncRunForm(); afterFormRender(); }

  document.addEventListener("DOMContentLoaded", drawAll);
  document.addEventListener("htmx:afterSettle", drawAll);
  document.addEventListener("change", function (event) {
    if (event.target.closest("#run-form")) syncRunForm(event);
    if (event.target.closest("#compare-form")) syncCompare(event);
    if (event.target.id === "loss-log-scale") drawLoss();
  });
  document.addEventListener("input", function (event) {
    if (event.target.closest("#run-form")) {
      if (event.target.name === "name") event.target.dataset.touched = "true";
      syncRunForm();
    }
    if (event.target.id === "loss-smoothing") drawLoss();
  });
})();
