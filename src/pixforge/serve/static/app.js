// The pixforge page: a form posting to /sdapi/v1/txt2img, progress polled from /v1/jobs/{id}
// (the job id is chosen here and sent as force_task_id), results added to a gallery.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 200;
let lastSeed = null;
let apiKey = sessionStorage.getItem("pixforge-key") || "";

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (apiKey) h["Authorization"] = "Bearer " + apiKey;
  return h;
}

function randomId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);  // unlike crypto.randomUUID, also there on plain http
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return body.error.message;
    return JSON.stringify(body.detail || body);
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModels() {
  const health = await (await fetch("/health")).json();
  $("key-row").hidden = !health.auth_required;
  const response = await fetch("/v1/models", { headers: headers(false) });
  if (!response.ok) {
    showError("cannot list models: " + (await errorMessage(response)));
    return;
  }
  showError("");
  const model = (await response.json()).data[0];
  const info = model.pixforge;
  $("model-name").textContent = model.id + " · " + info.native_size + "² native";
  for (const id of ["width", "height"]) {
    const input = $(id);
    input.step = info.size_multiple;
    input.min = info.size_multiple;
    input.max = info.limits.max_side;
    input.value = info.default_size;
  }
  $("steps").max = info.limits.max_steps;
  $("steps").value = info.default_steps;
  $("guidance").max = info.limits.max_guidance;
  $("guidance").value = info.default_guidance;
  $("batch-size").max = info.limits.max_images;
  const select = $("sampler");
  select.replaceChildren();
  for (const name of info.samplers) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    option.selected = name === info.default_sampler;
    select.append(option);
  }
  const cache = $("cache");
  cache.disabled = !info.cache_supported;
  cache.placeholder = info.cache_supported ? "none" : "not supported by this server";
  $("layout").disabled = !info.layout_supported;
}

function setProgress(status) {
  const bar = $("progress");
  if (status.status === "queued") {
    bar.removeAttribute("value");  // indeterminate while waiting
    $("status").textContent = "queued" + (status.queue_position !== null ? " (position " + (status.queue_position + 1) + ")" : "");
  } else if (status.status === "running") {
    bar.max = status.steps;
    bar.value = status.step;
    $("status").textContent = "step " + status.step + " / " + status.steps;
  }
}

async function pollProgress(jobId, isDone) {
  await new Promise((resolve) => setTimeout(resolve, POLL_MS));  // let the POST register the job first
  while (!isDone()) {
    try {
      const response = await fetch("/v1/jobs/" + jobId, { headers: headers(false) });
      if (response.ok && !isDone()) setProgress(await response.json());
    } catch (e) { /* the POST reports failures */ }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

function addCard(b64, seed, parameters) {
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  const url = "data:image/png;base64," + b64;
  card.querySelector("img").src = url;
  card.querySelector("img").alt = parameters.split("\n")[0];
  card.querySelector(".parameters").textContent = parameters;
  const link = card.querySelector(".download");
  link.href = url;
  link.download = "pixforge-" + seed + ".png";
  card.querySelector(".use-seed").addEventListener("click", () => { $("seed").value = seed; });
  card.dataset.seed = seed;
  $("gallery").prepend(card);
}

function formBody() {
  const number = (id) => Number($(id).value);
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    width: number("width"),
    height: number("height"),
    steps: number("steps"),
    cfg_scale: number("guidance"),
    seed: $("seed").value === "" ? -1 : number("seed"),
    sampler_name: $("sampler").value || null,
    batch_size: number("batch-size"),
  };
  const cache = $("cache").value.trim();
  if (cache && !$("cache").disabled) body.cache = cache;
  if ($("layout").checked && !$("layout").disabled) body.layout = "auto";
  return body;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const jobId = randomId();
  const body = { ...formBody(), force_task_id: jobId };
  let done = false;
  const started = performance.now();
  $("generate").disabled = true;
  $("status").textContent = "submitting";
  $("progress").value = 0;
  const polling = pollProgress(jobId, () => done);
  try {
    const response = await fetch("/sdapi/v1/txt2img", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    done = true;
    if (!response.ok) {
      $("status").textContent = "failed";
      showError(await errorMessage(response));
      return;
    }
    const result = await response.json();
    const info = JSON.parse(result.info);
    result.images.forEach((b64, i) => addCard(b64, info.all_seeds[i], info.infotexts[i]));
    lastSeed = info.all_seeds[0];
    $("seed-reuse").disabled = false;
    const bar = $("progress");
    bar.max = 1;
    bar.value = 1;
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    $("status").textContent = "done in " + seconds + " s (seed " + lastSeed + ")";
  } catch (e) {
    done = true;
    $("status").textContent = "failed";
    showError("the server did not answer: " + e);
  } finally {
    done = true;
    await polling;
    $("generate").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("generate-form").addEventListener("submit", generate);
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed-reuse").addEventListener("click", () => { if (lastSeed !== null) $("seed").value = lastSeed; });
  $("api-key").value = apiKey;
  $("api-key").addEventListener("change", () => {
    apiKey = $("api-key").value.trim();
    sessionStorage.setItem("pixforge-key", apiKey);
    loadModels();
  });
  loadModels().catch((e) => showError("cannot reach the server: " + e));
});
