"""The web page: one self-contained HTML file (no external assets) that talks to the JSON API.

Three tabs: text-to-image (prompt, seed, guidance, steps, size, a live progress bar, the
image with a download of the PNG and its metadata), image editing (upload an image, then
inpaint a box, outpaint margins or make a variation, with the same settings and download)
and image understanding (upload an image, then a chat whose answers stream in token by token).
"""
from __future__ import annotations

import html
import json

from .inputs import ServerSettings


def render_page(model_name: str, s: ServerSettings, stride: int = 16) -> str:
    """The page with the server's defaults and limits, and the model's VAE stride (pixels per token), filled in."""
    config = {"model": model_name, "auth": bool(s.api_key), "stride": stride, "size": s.size, "max_size": s.max_size,
              "num_iter": s.num_iter, "max_num_iter": s.max_num_iter, "num_steps": s.num_steps,
              "max_num_steps": s.max_num_steps, "guidance_scale": s.guidance_scale,
              "max_guidance_scale": s.max_guidance_scale, "max_images": s.max_images,
              "max_prompt_chars": s.max_prompt_chars, "max_new_tokens": s.max_new_tokens,
              "max_upload_bytes": s.max_upload_bytes}
    blob = json.dumps(config).replace("<", "\\u003c")
    return PAGE.replace("__CONFIG__", blob).replace("__MODEL__", html.escape(model_name))


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Harmon — __MODEL__</title>
<style>
  :root { --accent: #ff7c00; --bg: #fafafa; --line: #e4e4e7; --text: #27272a; }
  * { box-sizing: border-box; }
  body { font-family: system-ui, sans-serif; margin: 0; background: var(--bg); color: var(--text); }
  header { padding: 16px 24px; background: white; border-bottom: 1px solid var(--line); }
  header h1 { margin: 0; font-size: 22px; } header p { margin: 4px 0 0; color: #71717a; font-size: 14px; }
  nav { display: flex; gap: 4px; padding: 12px 24px 0; }
  nav button { border: 1px solid var(--line); border-bottom: none; background: #f4f4f5; padding: 8px 16px;
               border-radius: 8px 8px 0 0; cursor: pointer; font-size: 15px; }
  nav button.active { background: white; font-weight: 600; color: var(--accent); }
  main { margin: 0 24px 24px; background: white; border: 1px solid var(--line); border-radius: 0 8px 8px 8px;
         padding: 20px; }
  .tab { display: none; } .tab.active { display: grid; grid-template-columns: minmax(280px, 1fr) 2fr; gap: 24px; }
  label { display: block; font-size: 13px; font-weight: 600; margin: 10px 0 4px; }
  input, textarea, select { width: 100%; padding: 8px; border: 1px solid var(--line); border-radius: 6px;
                            font: inherit; }
  .row { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }
  button.primary { margin-top: 14px; width: 100%; padding: 10px; background: var(--accent); color: white;
                   border: none; border-radius: 6px; font-size: 16px; cursor: pointer; }
  button.primary:disabled { opacity: .5; cursor: wait; }
  button.plain { margin-top: 8px; padding: 6px 10px; border: 1px solid var(--line); background: white;
                 border-radius: 6px; cursor: pointer; }
  progress { width: 100%; height: 10px; margin-top: 12px; }
  .status { font-size: 13px; color: #71717a; min-height: 1.2em; margin-top: 4px; }
  .error { color: #b91c1c; }
  #gen-gallery { display: flex; flex-wrap: wrap; gap: 12px; }
  #gen-gallery figure { margin: 0; } #gen-gallery img { max-width: 512px; width: 100%; image-rendering: auto;
                                                          border: 1px solid var(--line); border-radius: 6px; }
  pre { background: #f4f4f5; padding: 8px; border-radius: 6px; font-size: 12px; white-space: pre-wrap; }
  #edit-preview, #edit-result-image { max-width: 100%; max-height: 280px; margin-top: 8px; border-radius: 6px;
                                     border: 1px solid var(--line); }
  #edit-result-image { max-height: 512px; }
  .four { display: grid; grid-template-columns: repeat(4, 1fr); gap: 6px; }
  #chat-preview { max-width: 100%; max-height: 280px; margin-top: 8px; border-radius: 6px; display: none; }
  #chat-log { border: 1px solid var(--line); border-radius: 6px; height: 420px; overflow-y: auto; padding: 10px;
              display: flex; flex-direction: column; gap: 8px; }
  .bubble { max-width: 80%; padding: 8px 12px; border-radius: 12px; white-space: pre-wrap; min-height: 2em; }
  .bubble.user { align-self: flex-end; background: #fff1e0; } .bubble.assistant { align-self: flex-start;
                                                                                   background: #f4f4f5; }
  .ask { display: grid; grid-template-columns: 1fr auto; gap: 8px; margin-top: 8px; }
  .ask button { margin: 0; width: auto; padding: 0 20px; }
</style>
</head>
<body>
<header><h1>Harmon</h1><p>Unified multimodal understanding and generation — model <b>__MODEL__</b></p>
  <div id="key-box" style="display:none"><label for="api-key">API key</label>
    <input id="api-key" type="password" autocomplete="off" placeholder="the server's API key"></div>
</header>
<nav><button id="tab-t2i" class="active" data-tab="t2i">Text to image</button>
     <button id="tab-edit" data-tab="edit">Edit</button>
     <button id="tab-chat" data-tab="chat">Image understanding</button></nav>
<main>
<section id="t2i" class="tab active">
  <div>
    <label for="prompt">Prompt</label>
    <textarea id="prompt" rows="4" placeholder="a dog on the left and a cat on the right"></textarea>
    <div class="row">
      <div><label for="seed">Seed (empty: random)</label><input id="seed" type="number" min="0" step="1"></div>
      <div><label for="num-images">Images</label><input id="num-images" type="number" min="1" value="1"></div>
    </div>
    <div class="row">
      <div><label for="guidance">Guidance</label><input id="guidance" type="number" min="1" step="0.5"></div>
      <div><label for="num-iter">Steps (MAR iterations)</label><input id="num-iter" type="number" min="1"></div>
    </div>
    <div class="row">
      <div><label for="width">Width</label><input id="width" type="number" min="16" step="16"></div>
      <div><label for="height">Height</label><input id="height" type="number" min="16" step="16"></div>
    </div>
    <label for="num-steps">Diffusion steps per token (empty: the model's)</label>
    <input id="num-steps" type="number" min="1">
    <button id="generate" class="primary">Generate</button>
    <progress id="gen-progress" value="0" max="1"></progress>
    <div id="gen-status" class="status"></div>
  </div>
  <div><div id="gen-gallery"></div><pre id="gen-meta" style="display:none"></pre></div>
</section>
<section id="edit" class="tab">
  <div>
    <label for="edit-image">Image</label><input id="edit-image" type="file" accept="image/*">
    <img id="edit-preview" alt="the image to edit" style="display:none">
    <label for="edit-mode">Edit</label>
    <select id="edit-mode"><option value="inpaint">Inpaint: regenerate a box</option>
      <option value="outpaint">Outpaint: extend the borders</option>
      <option value="variation">Variation: regenerate a random part</option></select>
    <div id="edit-inpaint-opts"><label>Box to regenerate, pixels (left, top, right, bottom)</label>
      <div class="four"><input id="edit-box-left" type="number" min="0" value="0">
        <input id="edit-box-top" type="number" min="0" value="0">
        <input id="edit-box-right" type="number" min="1" value="16">
        <input id="edit-box-bottom" type="number" min="1" value="16"></div></div>
    <div id="edit-outpaint-opts" style="display:none"><label>Margins to add, pixels, multiples of
      <span id="stride-text">16</span> (left, top, right, bottom)</label>
      <div class="four"><input id="edit-extend-left" type="number" min="0" step="16" value="0">
        <input id="edit-extend-top" type="number" min="0" step="16" value="0">
        <input id="edit-extend-right" type="number" min="0" step="16" value="64">
        <input id="edit-extend-bottom" type="number" min="0" step="16" value="0"></div></div>
    <div id="edit-variation-opts" style="display:none"><label for="edit-strength">Strength (fraction
      regenerated, 0–1)</label><input id="edit-strength" type="number" min="0.01" max="1" step="0.05" value="0.5"></div>
    <label for="edit-prompt">Prompt</label>
    <textarea id="edit-prompt" rows="3" placeholder="what the edited image shows"></textarea>
    <div class="row">
      <div><label for="edit-seed">Seed (empty: random)</label><input id="edit-seed" type="number" min="0" step="1"></div>
      <div><label for="edit-guidance">Guidance</label><input id="edit-guidance" type="number" min="1" step="0.5"></div>
    </div>
    <div class="row">
      <div><label for="edit-num-iter">Steps (MAR iterations)</label><input id="edit-num-iter" type="number" min="1"></div>
      <div><label for="edit-num-steps">Diffusion steps (empty: model's)</label>
        <input id="edit-num-steps" type="number" min="1"></div>
    </div>
    <button id="edit-run" class="primary">Edit</button>
    <div id="edit-status" class="status"></div>
  </div>
  <div id="edit-result"><img id="edit-result-image" alt="the edited image" style="display:none"><br>
    <a id="edit-download" style="display:none"></a><pre id="edit-meta" style="display:none"></pre></div>
</section>
<section id="chat" class="tab">
  <div>
    <label for="chat-image">Image</label><input id="chat-image" type="file" accept="image/*">
    <img id="chat-preview" alt="the image being discussed">
    <label for="max-tokens">Max new tokens</label><input id="max-tokens" type="number" min="1" value="256">
    <button id="chat-clear" class="plain">New conversation</button>
    <div id="chat-status" class="status"></div>
  </div>
  <div>
    <div id="chat-log"></div>
    <div class="ask"><input id="chat-question" placeholder="Ask about the image, e.g. What is in the image?">
      <button id="chat-send" class="primary">Send</button></div>
  </div>
</section>
</main>
<script>
const CFG = __CONFIG__;
const $ = (id) => document.getElementById(id);
let imageUrl = null, history = [], busy = false;

for (const b of document.querySelectorAll("nav button")) b.onclick = () => {
  for (const x of document.querySelectorAll("nav button, .tab")) x.classList.remove("active");
  b.classList.add("active"); $(b.dataset.tab).classList.add("active");
};
if (CFG.auth) { $("key-box").style.display = "block"; $("api-key").value = localStorage.getItem("harmonKey") || "";
  $("api-key").onchange = () => localStorage.setItem("harmonKey", $("api-key").value); }
$("guidance").value = CFG.guidance_scale; $("guidance").max = CFG.max_guidance_scale;
$("num-iter").value = CFG.num_iter; $("num-iter").max = CFG.max_num_iter;
$("num-steps").value = CFG.num_steps ?? ""; $("num-steps").max = CFG.max_num_steps;
for (const id of ["width", "height"]) { $(id).value = CFG.size; $(id).max = CFG.max_size; }
for (const id of ["width", "height", "edit-extend-left", "edit-extend-top", "edit-extend-right",
                  "edit-extend-bottom"]) { $(id).step = CFG.stride; }
$("width").min = $("height").min = CFG.stride; $("stride-text").textContent = CFG.stride;
$("edit-extend-right").value = 4 * CFG.stride;
$("num-images").max = CFG.max_images; $("prompt").maxLength = CFG.max_prompt_chars;
$("edit-guidance").value = CFG.guidance_scale; $("edit-guidance").max = CFG.max_guidance_scale;
$("edit-num-iter").value = CFG.num_iter; $("edit-num-iter").max = CFG.max_num_iter;
$("edit-num-steps").value = CFG.num_steps ?? ""; $("edit-num-steps").max = CFG.max_num_steps;
$("edit-prompt").maxLength = CFG.max_prompt_chars;

function headers() {
  const h = {"Content-Type": "application/json"};
  if (CFG.auth) h["Authorization"] = "Bearer " + $("api-key").value;
  return h;
}
function setStatus(id, text, error = false) { $(id).textContent = text; $(id).classList.toggle("error", error); }
async function errorOf(resp) {
  try { const body = await resp.json(); return `${resp.status}: ${body.error.message}`; }
  catch { return `HTTP ${resp.status}`; }
}
async function* events(resp) {  // server-sent events of a fetch response: {event, data}
  const reader = resp.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      let event = null; const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield {event, data: data.join("\n")};
    }
  }
}
const num = (id) => $(id).value === "" ? undefined : Number($(id).value);

$("generate").onclick = async () => {
  const prompt = $("prompt").value.trim();
  if (!prompt) { setStatus("gen-status", "Enter a prompt first.", true); return; }
  const body = {prompt, n: num("num-images") ?? 1, size: `${num("width")}x${num("height")}`, seed: num("seed"),
                guidance_scale: num("guidance"), num_iter: num("num-iter"), num_steps: num("num-steps"), stream: true};
  $("generate").disabled = true; $("gen-progress").value = 0; setStatus("gen-status", "Queued…");
  $("gen-gallery").dataset.done = "";
  try {
    const resp = await fetch("/v1/images/generations", {method: "POST", headers: headers(), body: JSON.stringify(body)});
    if (!resp.ok) throw new Error(await errorOf(resp));
    const images = [];
    for await (const {data} of events(resp)) {
      const msg = JSON.parse(data);
      if (msg.error) throw new Error(msg.error.message);
      if (msg.type === "image_generation.queued" && msg.queued > 0) setStatus("gen-status", `Waiting: ${msg.queued} ahead…`);
      if (msg.type === "image_generation.progress") {
        $("gen-progress").max = msg.total; $("gen-progress").value = msg.step;
        setStatus("gen-status", `Step ${msg.step} / ${msg.total}`);
      }
      if (msg.type === "image_generation.completed") images.push(msg);
    }
    showImages(images);
    setStatus("gen-status", `Done: ${images.length} image(s).`);
  } catch (err) { setStatus("gen-status", String(err.message || err), true); }
  finally { $("generate").disabled = false; }
};

function showImages(images) {
  const gallery = $("gen-gallery"); gallery.innerHTML = "";
  for (const im of images) {
    const bytes = Uint8Array.from(atob(im.b64_json), (c) => c.charCodeAt(0));
    const url = URL.createObjectURL(new Blob([bytes], {type: "image/png"}));
    const fig = document.createElement("figure");
    const img = document.createElement("img"); img.src = url; img.className = "gen-image";
    img.alt = im.metadata.prompt; img.title = `seed ${im.seed}`;
    const link = document.createElement("a"); link.href = url; link.className = "gen-download";
    link.download = `harmon_${im.seed}.png`; link.textContent = `Download PNG (seed ${im.seed}, with metadata)`;
    fig.append(img, document.createElement("br"), link); gallery.append(fig);
  }
  if (images.length) { $("gen-meta").style.display = "block";
    $("gen-meta").textContent = JSON.stringify(images[0].metadata, null, 2); }
  gallery.dataset.done = "1";
}

let editUrl = null;
$("edit-mode").onchange = () => { for (const m of ["inpaint", "outpaint", "variation"])
  $(`edit-${m}-opts`).style.display = $("edit-mode").value === m ? "block" : "none"; };
$("edit-image").onchange = () => {
  const file = $("edit-image").files[0];
  if (!file) return;
  if (file.size > CFG.max_upload_bytes) { setStatus("edit-status", "The image is too large.", true); return; }
  const reader = new FileReader();
  reader.onload = () => { editUrl = reader.result; const img = $("edit-preview");
    img.onload = () => {  // default box: the middle of the image
      const w = img.naturalWidth, h = img.naturalHeight;
      $("edit-box-left").value = Math.floor(w / 4); $("edit-box-top").value = Math.floor(h / 4);
      $("edit-box-right").value = Math.ceil(3 * w / 4); $("edit-box-bottom").value = Math.ceil(3 * h / 4);
      img.dataset.loaded = "1"; };
    img.dataset.loaded = ""; img.src = editUrl; img.style.display = "block"; setStatus("edit-status", ""); };
  reader.readAsDataURL(file);
};
const four = (prefix) => ["left", "top", "right", "bottom"].map((k) => num(`${prefix}-${k}`) ?? 0);
$("edit-run").onclick = async () => {
  const prompt = $("edit-prompt").value.trim();
  if (!editUrl) { setStatus("edit-status", "Upload an image first.", true); return; }
  if (!prompt) { setStatus("edit-status", "Enter a prompt first.", true); return; }
  const mode = $("edit-mode").value;
  const body = {image: editUrl, prompt, mode, seed: num("edit-seed"), guidance_scale: num("edit-guidance"),
                num_iter: num("edit-num-iter"), num_steps: num("edit-num-steps")};
  if (mode === "inpaint") body.box = four("edit-box");
  if (mode === "outpaint") body.extend = four("edit-extend");
  if (mode === "variation") body.strength = num("edit-strength");
  $("edit-run").disabled = true; $("edit-result").dataset.done = ""; setStatus("edit-status", "Editing…");
  try {
    const resp = await fetch("/v1/images/edits", {method: "POST", headers: headers(), body: JSON.stringify(body)});
    if (!resp.ok) throw new Error(await errorOf(resp));
    const im = (await resp.json()).data[0];
    const bytes = Uint8Array.from(atob(im.b64_json), (c) => c.charCodeAt(0));
    const url = URL.createObjectURL(new Blob([bytes], {type: "image/png"}));
    const img = $("edit-result-image"); img.src = url; img.style.display = "block"; img.title = `seed ${im.seed}`;
    const link = $("edit-download"); link.href = url; link.download = `harmon_${mode}_${im.seed}.png`;
    link.textContent = `Download PNG (${mode}, seed ${im.seed}, with metadata)`; link.style.display = "inline";
    $("edit-meta").textContent = JSON.stringify(im.metadata, null, 2); $("edit-meta").style.display = "block";
    setStatus("edit-status", `Done: ${im.size}, seed ${im.seed}.`);
    $("edit-result").dataset.done = "1";
  } catch (err) { setStatus("edit-status", String(err.message || err), true); $("edit-result").dataset.done = "error"; }
  finally { $("edit-run").disabled = false; }
};

$("chat-image").onchange = () => {
  const file = $("chat-image").files[0];
  if (!file) return;
  if (file.size > CFG.max_upload_bytes) { setStatus("chat-status", "The image is too large.", true); return; }
  const reader = new FileReader();
  reader.onload = () => { imageUrl = reader.result; $("chat-preview").src = imageUrl;
    $("chat-preview").style.display = "block"; clearChat(); setStatus("chat-status", "Ask a question."); };
  reader.readAsDataURL(file);
};
function clearChat() { history = []; $("chat-log").innerHTML = ""; }
$("chat-clear").onclick = () => { clearChat(); setStatus("chat-status", ""); };
function bubble(role, text) {
  const div = document.createElement("div"); div.className = `bubble ${role}`; div.textContent = text;
  $("chat-log").append(div); $("chat-log").scrollTop = $("chat-log").scrollHeight; return div;
}

async function send() {
  const question = $("chat-question").value.trim();
  if (busy || !question) return;
  if (!imageUrl) { setStatus("chat-status", "Upload an image first.", true); return; }
  const messages = [];
  history.forEach(([q, a], i) => {
    messages.push({role: "user", content: i === 0 ? [{type: "text", text: q},
                   {type: "image_url", image_url: {url: imageUrl}}] : q});
    messages.push({role: "assistant", content: a});
  });
  messages.push({role: "user", content: history.length ? question : [{type: "text", text: question},
                 {type: "image_url", image_url: {url: imageUrl}}]});
  busy = true; $("chat-send").disabled = true; $("chat-question").value = "";
  bubble("user", question);
  const answer = bubble("assistant", ""); answer.dataset.done = "";
  setStatus("chat-status", "Thinking…");
  let text = "";
  try {
    const resp = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
      body: JSON.stringify({messages, stream: true, max_tokens: num("max-tokens")})});
    if (!resp.ok) throw new Error(await errorOf(resp));
    for await (const {data} of events(resp)) {
      if (data === "[DONE]") break;
      const msg = JSON.parse(data);
      if (msg.error) throw new Error(msg.error.message);
      const piece = msg.choices[0].delta.content;
      if (piece) { text += piece; answer.textContent = text; $("chat-log").scrollTop = $("chat-log").scrollHeight; }
    }
    history.push([question, text]);
    setStatus("chat-status", "");
  } catch (err) { answer.classList.add("error"); setStatus("chat-status", String(err.message || err), true); }
  finally { answer.dataset.done = "1"; busy = false; $("chat-send").disabled = false; }
}
$("chat-send").onclick = send;
$("chat-question").onkeydown = (e) => { if (e.key === "Enter") send(); };
</script>
</body>
</html>
"""
