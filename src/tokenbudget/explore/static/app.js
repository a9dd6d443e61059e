// tokenbudget explore: the page's behaviour. Every number comes from the server's JSON API.
"use strict";

const $ = (id) => document.getElementById(id);
const PANELS = ["a", "b"];
const state = { info: null, kind: "keep", results: { a: null, b: null }, busy: 0, timingTimer: null };

// -- talking to the server ------------------------------------------------------------------
async function api(path, options) {
  const response = await fetch(path, options);
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    throw new Error(`the server answered ${response.status} ${response.statusText} without a message`);
  }
  if (!response.ok) {
    throw new Error(data && data.error ? data.error : `the server answered ${response.status}`);
  }
  return data;
}

function postJSON(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setBusy(delta) {
  state.busy += delta;
  document.body.dataset.busy = String(state.busy);
}

// -- the request of one panel ---------------------------------------------------------------
function request(panel) {
  return {
    image: $("image").value,
    method: $(`method-${panel}`).value,
    kind: state.kind,
    value: Number($("slider").value),
  };
}

// One request in flight per panel; while it runs only the latest new request waits (a dragged
// slider sends its last position, not every step).
function makeRunner(panel) {
  let running = false;
  let queued = null;
  async function go(body) {
    running = true;
    setBusy(1);
    try {
      const result = await postJSON("/api/run", body);
      state.results[panel] = result;
      showResult(panel, result);
      clearError();
    } catch (err) {
      showError(err.message);
    } finally {
      running = false;
      setBusy(-1);
      if (queued) {
        const next = queued;
        queued = null;
        go(next);
      } else {
        scheduleTiming();
      }
    }
  }
  return (body) => {
    if (running) queued = body;
    else go(body);
  };
}
const runners = { a: makeRunner("a"), b: makeRunner("b") };

function refresh() {
  for (const panel of PANELS) {
    $(`time-${panel}`).textContent = "-";
    runners[panel](request(panel));
  }
}

// -- showing results ------------------------------------------------------------------------
function fixed(x, digits) {
  return Number(x).toFixed(digits);
}

function showResult(panel, r) {
  $(`picture-${panel}`).src = r.picture;
  const tokens = r.tokens_per_layer;
  // per-image: the mean budget is `keep`; this image's own budget is the level its glance picked
  const own = r.per_image ? `; this image: ${fixed(r.per_image.per_image_speedup, 2)}\u00d7 level` : "";
  $(`tokens-${panel}`).textContent = `${tokens[0]} \u2192 ${tokens[tokens.length - 1]} (keep ${fixed(r.keep, 3)}${own})`;
  $(`groups-${panel}`).textContent = `${r.groups} of ${state.info.grid[0] * state.info.grid[1]} patches`;
  $(`flops-${panel}`).textContent = `${fixed(r.ideal_speedup, 2)}\u00d7 (${fixed(r.gflops, 2)} of ${fixed(state.info.gflops_full, 2)} GFLOPs)`;
  $(`cosine-${panel}`).textContent = `${fixed(r.cosine, 4)} (class ${fixed(r.cosine_class, 3)}, mean ${fixed(r.cosine_mean, 3)})`;
  $("status").textContent = `${r.method}: answered in ${Math.round(r.request_ms)} ms on the server`;
  drawChart();
}

function drawChart() {
  const svg = $("chart");
  const info = state.info;
  const width = 520, height = 220, left = 44, right = 12, top = 14, bottom = 30;
  const layers = info.num_layers;
  const x = (i) => left + (i / layers) * (width - left - right);
  const y = (n) => top + (1 - n / info.input_tokens) * (height - top - bottom);
  const parts = [
    `<line class="axis" x1="${left}" y1="${y(0)}" x2="${width - right}" y2="${y(0)}"/>`,
    `<line class="axis" x1="${left}" y1="${top}" x2="${left}" y2="${y(0)}"/>`,
    `<text x="${left - 6}" y="${y(info.input_tokens) + 4}" text-anchor="end">${info.input_tokens}</text>`,
    `<text x="${left - 6}" y="${y(0) + 4}" text-anchor="end">0</text>`,
    `<text x="${x(0)}" y="${height - 10}" text-anchor="middle">in</text>`,
    `<text x="${x(layers)}" y="${height - 10}" text-anchor="middle">${layers}</text>`,
    `<text x="${(left + width) / 2}" y="${height - 10}" text-anchor="middle">block</text>`,
  ];
  const rows = [];
  PANELS.forEach((panel, k) => {
    const r = state.results[panel];
    if (!r) return;
    const points = r.tokens_per_layer.map((n, i) => `${x(i)},${y(n)}`).join(" ");
    parts.push(`<polyline class="series-${panel}" points="${points}"/>`);
    parts.push(`<text class="legend-${panel}" x="${width - right - 4}" y="${top + 12 + 14 * k}" text-anchor="end">${panel.toUpperCase()}: ${r.method}</text>`);
    rows.push(r);
  });
  svg.innerHTML = parts.join("");
  const table = $("token-table");
  if (!rows.length) return;
  let html = `<tr><th>block</th>${rows.map((r, k) => `<th>${PANELS[k].toUpperCase()}: ${r.method}</th>`).join("")}</tr>`;
  for (let i = 0; i <= layers; i++) {
    html += `<tr><td>${i === 0 ? "in" : i}</td>${rows.map((r) => `<td>${r.tokens_per_layer[i]}</td>`).join("")}</tr>`;
  }
  table.innerHTML = html;
}

// -- measured speed (after the panels settle: it holds the model for about a dozen forwards) ---
function scheduleTiming() {
  clearTimeout(state.timingTimer);
  if (!$("measure").checked || state.busy) return;
  state.timingTimer = setTimeout(measureAll, 400);
}

async function measureAll() {
  for (const panel of PANELS) {
    if (state.busy) return; // a newer run came in: it reschedules the timing when it ends
    const body = request(panel);
    const cell = $(`time-${panel}`);
    cell.textContent = "measuring ...";
    setBusy(1);
    try {
      const t = await postJSON("/api/time", body);
      if (JSON.stringify(request(panel)) !== JSON.stringify(body)) {
        cell.textContent = "-";
        continue;
      }
      const [q1, q3] = t.speedup_quartiles;
      cell.textContent = `${fixed(t.unpatched_ms, 1)} \u2192 ${fixed(t.patched_ms, 1)} ms, ${fixed(t.speedup, 2)}\u00d7 [${fixed(q1, 2)}, ${fixed(q3, 2)}], ${t.samples} pairs, ${t.threads} threads`;
    } catch (err) {
      cell.textContent = "-";
      showError(err.message);
    } finally {
      setBusy(-1);
    }
  }
}

// -- controls -------------------------------------------------------------------------------
function setSliderRange(kind, value) {
  const slider = $("slider");
  if (kind === "keep") {
    slider.min = String(Math.ceil(state.info.keep_range[0] * 100) / 100);
    slider.max = "1";
    slider.step = "0.01";
  } else {
    slider.min = "1";
    slider.max = String(Math.floor(state.info.speedup_range[1] * 20) / 20);
    slider.step = "0.05";
  }
  slider.value = String(Math.min(Math.max(value, Number(slider.min)), Number(slider.max)));
  showBudget();
}

function showBudget() {
  const value = Number($("slider").value);
  $("budget-value").textContent = state.kind === "keep" ? fixed(value, 2) : `${fixed(value, 2)}\u00d7`;
}

function selectImage() {
  $("crop").src = `/api/crop?image=${encodeURIComponent($("image").value)}`;
  refresh();
}

async function upload(file) {
  setBusy(1);
  try {
    const r = await api("/api/upload", { method: "POST", body: file });
    const option = document.createElement("option");
    option.value = r.image;
    option.textContent = `upload: ${file.name}`;
    $("image").appendChild(option);
    $("image").value = r.image;
    clearError();
    selectImage();
  } catch (err) {
    showError(err.message);
  } finally {
    setBusy(-1);
  }
}

async function start() {
  try {
    state.info = await api("/api/info");
  } catch (err) {
    showError(`cannot reach the explorer's server: ${err.message}`);
    return;
  }
  const info = state.info;
  $("model").textContent = `${info.model}: ${info.image_size[0]} px, ${info.grid[0]}\u00d7${info.grid[1]} patches + ${info.num_prefix} prefix, ${info.num_layers} blocks`;
  for (const id of info.samples) {
    const option = document.createElement("option");
    option.value = id;
    option.textContent = id.replace("skimage:", "");
    $("image").appendChild(option);
  }
  PANELS.forEach((panel, k) => {
    const select = $(`method-${panel}`);
    for (const method of info.methods) {
      const option = document.createElement("option");
      option.value = option.textContent = method;
      select.appendChild(option);
    }
    const preferred = k === 0 ? "auto" : "tome"; // Auto, the recommended method, against the paper's ToMe
    select.value = info.methods.includes(preferred) ? preferred : info.methods[Math.min(k, info.methods.length - 1)];
    select.addEventListener("change", () => {
      $(`time-${panel}`).textContent = "-";
      runners[panel](request(panel));
    });
  });
  setSliderRange("keep", 0.5);
  $("slider").addEventListener("input", () => {
    showBudget();
    refresh();
  });
  for (const radio of document.querySelectorAll('input[name="kind"]')) {
    radio.addEventListener("change", () => {
      // Carry the budget over: the speedup method A reached, or the keep it used.
      const r = state.results.a;
      state.kind = radio.value;
      const carried = r ? (state.kind === "keep" ? r.keep : r.ideal_speedup) : state.kind === "keep" ? 0.5 : 1.5;
      setSliderRange(state.kind, carried);
      refresh();
    });
  }
  $("image").addEventListener("change", selectImage);
  $("upload").addEventListener("change", (event) => {
    const files = event.target.files;
    if (files.length) upload(files[0]);
    event.target.value = ""; // choosing the same file again is a new change
  });
  $("measure").addEventListener("change", scheduleTiming);
  selectImage();
}

start();
