// The page of `harmon serve`: text to image, edits and chat about an image, through the same /v1 API as
// every other client. The model's name and the server's defaults and limits come from GET /page.json;
// once they are applied the body gets data-ready="1".
const $ = (id) => document.getElementById(id);
const CFG = await (await fetch("/page.json")).json();
let imageUrl = null, history = [], busy = false;

document.title = `Harmon — ${CFG.model}`; $("model-name").textContent = CFG.model;
for (const b of document.querySelectorAll("nav button")) b.onclick = () => {
  for (const x of document.querySelectorAll("nav button, .tab")) x.classList.remove("active");
  b.classList.add("active"); $(b.dataset.tab).classList.add("active");
};
if (CFG.auth) { $("key-box").style.display = "block"; $("api-key").value = localStorage.getItem("harmonKey") || "";
  $("api-key").onchange = () => localStorage.setItem("harmonKey", $("api-key").value); }
$("guidance").value = CFG.guidance_scale; $("guidance").max = CFG.max_guidance_scale;
$("num-iter").value = CFG.num_iter; $("num-iter").max = CFG.max_num_iter;
$("num-steps").value = CFG.num_steps ?? ""; $("num-steps").max = CFG.max_num_steps;
for (const id of ["width", "height"]) { $(id).value = CFG[id]; $(id).max = CFG.max_size; }
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
document.body.dataset.ready = "1";
