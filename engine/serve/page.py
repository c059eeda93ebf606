"""The web page at GET /: a prompt form, adapter and style pickers, live per-step progress and a
gallery of the images made from this page. One static document, no build step: it talks to
the same JSON endpoints as any client (POST /v1/jobs, then the job's event stream, read with
fetch so that the API key travels in the Authorization header, which EventSource cannot send).
"""

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>impasto</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 60em; }
  fieldset { border: 1px solid #ccc; margin-bottom: .8em; }
  label { display: inline-block; margin: .2em .8em .2em 0; }
  textarea { width: 100%; }
  #bar { width: 100%; height: 1em; }
  input[type=number] { width: 5em; }
  #gallery img { width: 128px; height: 128px; image-rendering: pixelated; margin: 4px; border: 1px solid #999; }
  .error { color: #b00; }
</style>
</head>
<body>
<h1>impasto</h1>
<form id="form">
  <fieldset><legend>Server</legend>
    <label>API key <input id="key" type="password" size="40" autocomplete="off"></label>
    <button type="button" id="connect">Load adapters</button>
  </fieldset>
  <fieldset><legend>Prompt</legend>
    <textarea id="prompt" rows="2">a red star on a blue background</textarea>
    <label>Negative prompt <input id="negative" size="50"></label>
  </fieldset>
  <fieldset><legend>Adapters</legend><div id="adapters">(none loaded)</div></fieldset>
  <fieldset><legend>Styles</legend><div id="styles">(none)</div></fieldset>
  <fieldset><legend>Sampling</legend>
    <label>Seed <input id="seed" type="number" min="0" placeholder="random"></label>
    <label>Width <input id="width" type="number" min="8" step="8" placeholder="auto"></label>
    <label>Height <input id="height" type="number" min="8" step="8" placeholder="auto"></label>
    <label>Steps <input id="steps" type="number" min="1" value="20"></label>
    <label>Guidance <input id="guidance" type="number" step="0.5" value="7.5"></label>
  </fieldset>
  <button type="submit" id="generate">Generate</button>
</form>
<p><progress id="bar" max="1" value="0"></progress></p>
<p id="status" data-events="0">idle</p>
<div id="gallery"></div>
<script>
const $ = (id) => document.getElementById(id);
$("key").value = localStorage.getItem("impasto-key") || "";
function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}
function say(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }

async function loadAdapters() {
  localStorage.setItem("impasto-key", $("key").value.trim());
  const r = await fetch("/v1/adapters", {headers: headers()});
  const body = await r.json();
  if (!r.ok) { say(body.error.message, true); return; }
  const pick = (a, kind) => `<label><input type="checkbox" data-kind="${kind}" value="${a.name}"> ${a.name}
      <input type="number" step="0.1" value="1.0" size="4" data-scale-of="${a.name}"></label>`;
  const loras = body.data.filter(a => a.family !== "style"), styles = body.data.filter(a => a.family === "style");
  $("adapters").innerHTML = loras.map(a => pick(a, "adapter")).join("") || "(none registered)";
  $("styles").innerHTML = styles.map(a => pick(a, "style")).join("") || "(none registered)";
  say(`${body.data.length} adapters`);
}

function chosen(kind) {
  return [...document.querySelectorAll(`input[data-kind=${kind}]:checked`)].map(box => {
    const scale = parseFloat(document.querySelector(`input[data-scale-of="${box.value}"]`).value);
    return kind === "style" ? {name: box.value, weight: scale} : {name: box.value, scale: scale};
  });
}

async function* events(response) {  // Server-Sent Events from a fetch body
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const block = buffer.slice(0, end); buffer = buffer.slice(end + 2);
      const ev = {event: "message", data: ""};
      for (const line of block.split("\\n")) {
        if (line.startsWith("event: ")) ev.event = line.slice(7);
        else if (line.startsWith("data: ")) ev.data += line.slice(6);
      }
      yield {event: ev.event, data: JSON.parse(ev.data)};
    }
  }
}

$("connect").onclick = loadAdapters;
$("form").onsubmit = async (e) => {
  e.preventDefault();
  const w = $("width").value, h = $("height").value, seed = $("seed").value;
  const body = {prompt: $("prompt").value, negative_prompt: $("negative").value || null,
                num_inference_steps: parseInt($("steps").value), guidance_scale: parseFloat($("guidance").value),
                adapters: chosen("adapter"), styles: chosen("style")};
  if (seed !== "") body.seed = parseInt(seed);
  if (w && h) body.size = `${w}x${h}`;
  $("bar").value = 0;
  const r = await fetch("/v1/jobs", {method: "POST", headers: headers(), body: JSON.stringify(body)});
  const created = await r.json();
  if (!r.ok) { say(created.error.message, true); return; }
  say(`job ${created.id} queued`);
  const stream = await fetch(`/v1/jobs/${created.id}/events`, {headers: headers()});
  for await (const ev of events(stream)) {
    if (ev.event === "progress") {
      $("bar").max = ev.data.total; $("bar").value = ev.data.step;
      $("status").dataset.events = parseInt($("status").dataset.events) + 1;
      say(`step ${ev.data.step}/${ev.data.total}`);
    } else if (ev.event === "result") {
      for (const d of ev.data.result.data) {
        const img = document.createElement("img");
        img.src = "data:image/png;base64," + d.b64_json;
        img.title = `seed ${d.seed}: ${body.prompt}`;
        img.className = "result";
        $("gallery").prepend(img);
      }
      say(`done: step ${ev.data.progress.step}/${ev.data.progress.total}`);
    } else {
      say(ev.data.error ? ev.data.error.message : "failed", true);
    }
  }
};
</script>
</body>
</html>
"""
