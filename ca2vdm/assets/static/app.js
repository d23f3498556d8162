// ca2vdm serve: the page. One WebSocket to /ws; JSON commands out, one binary message per chunk in.
// Chunk message (little-endian): u32 frames F, u16 height H, u16 width W, u32 chunk index,
// u16 prompt revision, u16 server compute ms, then F*H*W*3 bytes of RGB (see ca2vdm/serve/protocol.py).
"use strict";

const $ = (id) => document.getElementById(id);
const HEADER_BYTES = 16;
const MAX_BUFFER_SECONDS = 4;   // frames beyond this are dropped (oldest first) to keep latency bounded

const state = {
  ws: null, models: {}, fps: 8, playing: false,
  queue: [],              // ImageData frames waiting to be shown
  arrivals: [],           // arrival times (ms) of received frames, last 2 s
  shown: [],              // times frames were drawn, last 2 s
  framesShown: 0, framesReceived: 0, chunks: 0,
  sentAt: {},             // prompt revision -> time the command was sent (ms)
  pendingRevision: null,  // the revision whose first frame we wait for
  revisionSeen: -1,
  latencyMs: null, computeMs: null, clipFrames: 0,
};
window.ca2vdm = state;    // read by the browser test

const screen = $("screen");
const ctx = screen.getContext("2d");
const scratch = document.createElement("canvas");
const sctx = scratch.getContext("2d");

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function send(obj) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(obj));
}

function setPlaying(on) {
  state.playing = on;
  $("start").disabled = on;
  $("stop").disabled = !on;
  $("switch").disabled = !on;
  $("model").disabled = on;
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function start() {
  const msg = {
    type: "start", prompt: $("prompt").value, model: $("model").value,
    steps: numberOrNull("steps"), guidance: numberOrNull("guidance"), seed: numberOrNull("seed") ?? 0,
  };
  if ($("use-clip").checked) msg.strength = Number($("strength").value);
  state.queue = []; state.revisionSeen = -1;
  state.pendingRevision = 0; state.sentAt = { 0: performance.now() }; state.latencyMs = null;
  send(msg);
  setPlaying(true);
  say("starting…");
}

function switchPrompt() {
  state.switchSentAt = performance.now();
  send({ type: "set_prompt", prompt: $("prompt").value, guidance: numberOrNull("guidance") });
}

function stop() {
  send({ type: "stop" });
  setPlaying(false);
}

function onChunk(buf) {
  const view = new DataView(buf);
  const F = view.getUint32(0, true), H = view.getUint16(4, true), W = view.getUint16(6, true);
  const revision = view.getUint16(12, true);
  state.computeMs = view.getUint16(14, true);
  const now = performance.now();
  if (revision !== state.revisionSeen) {
    state.revisionSeen = revision;
    if (state.sentAt[revision] !== undefined) state.latencyMs = now - state.sentAt[revision];
  }
  const pixels = new Uint8Array(buf, HEADER_BYTES);
  for (let f = 0; f < F; f++) {
    const image = new ImageData(W, H);
    const rgb = pixels.subarray(f * H * W * 3, (f + 1) * H * W * 3);
    for (let i = 0, j = 0; i < H * W; i++, j += 3) {
      image.data[4 * i] = rgb[j]; image.data[4 * i + 1] = rgb[j + 1]; image.data[4 * i + 2] = rgb[j + 2];
      image.data[4 * i + 3] = 255;
    }
    state.queue.push(image);
    state.arrivals.push(now);
  }
  state.framesReceived += F;
  state.chunks += 1;
  const cap = Math.max(8, Math.round(MAX_BUFFER_SECONDS * state.fps));
  if (state.queue.length > cap) state.queue.splice(0, state.queue.length - cap);
}

function onMessage(msg) {
  switch (msg.type) {
    case "started":
      state.fps = msg.fps;
      say(`playing ${msg.model}: ${msg.levels ? msg.levels.length + " levels" : msg.steps + " steps"}, ` +
          `guidance ${msg.guidance}, ${msg.frame_size.join("×")} frames at ${msg.fps} frames/s` +
          (msg.video_to_video ? ", following the uploaded clip" : ""));
      break;
    case "prompt":
      state.sentAt[msg.revision] = state.switchSentAt ?? performance.now();
      say(`prompt switched to “${msg.prompt}”`);
      break;
    case "stopped":
      setPlaying(false);
      say("stopped");
      break;
    case "uploaded":
      state.clipFrames = msg.frames;
      $("use-clip").disabled = false;
      $("use-clip").checked = true;
      say(`clip uploaded: ${msg.frames} frames`);
      break;
    case "error":
      say(msg.message, true);
      if (/busy|stream stopped/.test(msg.message)) setPlaying(false);
      break;
  }
}

function connect() {  // a server started with --token wants it back: the page was opened as /?token=...
  const token = new URLSearchParams(location.search).get("token");
  const query = token === null ? "" : `?token=${encodeURIComponent(token)}`;
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws${query}`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => say("connected");
  ws.onmessage = (e) => (e.data instanceof ArrayBuffer ? onChunk(e.data) : onMessage(JSON.parse(e.data)));
  ws.onclose = (e) => { setPlaying(false); say(`disconnected${e.reason ? ` (${e.reason})` : ""}: reload the page`, true); };
  state.ws = ws;
}

function draw() {  // one frame per tick at state.fps; the canvas upscales it (pixelated)
  const image = state.queue.shift();
  if (image) {
    if (scratch.width !== image.width || scratch.height !== image.height) {
      scratch.width = image.width; scratch.height = image.height;
    }
    sctx.putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(scratch, 0, 0, screen.width, screen.height);
    state.framesShown += 1;
    state.shown.push(performance.now());
  }
  setTimeout(draw, 1000 / state.fps);
}

function rate(times, now) {
  while (times.length && now - times[0] > 2000) times.shift();
  return times.length / 2;
}

function readout() {
  const now = performance.now();
  $("fps-in").textContent = rate(state.arrivals, now).toFixed(1);
  $("fps-play").textContent = rate(state.shown, now).toFixed(1);
  $("latency").textContent = state.latencyMs === null ? "–" : `${Math.round(state.latencyMs)} ms`;
  $("compute").textContent = state.computeMs === null ? "–" : `${state.computeMs} ms/chunk`;
  $("buffered").textContent = `${state.queue.length} frames`;
}

async function loadModels() {
  const info = await (await fetch("/api/models")).json();
  state.fps = info.fps;
  for (const m of info.models) {
    state.models[m.name] = m;
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = m.levels ? `${m.name} (${m.levels.length}-step)` : `${m.name} (${m.steps} steps)`;
    $("model").append(option);
  }
  $("model").value = info.default;
  modelDefaults();
}

function modelDefaults() {
  const m = state.models[$("model").value];
  if (!m) return;
  $("steps").value = m.steps;
  $("guidance").value = m.guidance;
}

function uploadClip() {
  const file = $("clip").files[0];
  if (!file) return;
  say(`uploading ${file.name}…`);
  file.arrayBuffer().then((buf) => state.ws.send(buf));   // a binary message: the server decodes it
}

$("start").onclick = start;
$("stop").onclick = stop;
$("switch").onclick = switchPrompt;
$("model").onchange = modelDefaults;
$("clip").onchange = uploadClip;
$("strength").oninput = () => ($("strength-value").value = Number($("strength").value).toFixed(2));
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter") (state.playing ? switchPrompt : start)();
});

loadModels().then(connect).catch((e) => say(`cannot load /api/models: ${e}`, true));
draw();
setInterval(readout, 500);
