// Live transcription demo: microphone or file -> 24 kHz PCM16 -> /v1/realtime (OpenAI Realtime
// transcription protocol) -> partial (grey) and final (black) text per turn.
// Plain browser JavaScript, no build step. Query parameters: ?autostart=1 starts the microphone
// on load (used by the headless test), &key=... pre-fills the API key.
"use strict";

const RATE = 24000; // OpenAI's PCM16 rate; the server resamples to 16 kHz
const CHUNK_SAMPLES = RATE / 10; // one append per 100 ms
const TAIL_SILENCE_S = 1.2; // after a file: lets server VAD close the last turn
// Dictation pauses mid-sentence for longer than OpenAI's 500 ms default; longer turns also
// give Whisper more context.
const VAD = { type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 800 };

const $ = (id) => document.getElementById(id);
const ui = {
  mic: $("mic"), file: $("file"), stop: $("stop"), key: $("key"),
  status: $("status"), transcript: $("transcript"),
};
const turns = new Map(); // item_id -> {el, partial, final}
let current = null; // the running capture: {ws, stop()}

function setStatus(text, isError = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle("error", isError);
}

// ---- transcript ------------------------------------------------------------------------------

function turnFor(itemId, startMs) {
  let turn = turns.get(itemId);
  if (!turn) {
    const el = document.createElement("p");
    el.className = "turn";
    el.dataset.itemId = itemId;
    el.innerHTML = '<span class="time"></span><span class="final"></span><span class="partial"></span>';
    ui.transcript.appendChild(el);
    turn = { el, partial: "", final: null };
    turns.set(itemId, turn);
  }
  if (startMs !== undefined) {
    turn.el.querySelector(".time").textContent = (startMs / 1000).toFixed(1) + " s";
  }
  return turn;
}

function render(turn) {
  turn.el.querySelector(".final").textContent = turn.final ?? "";
  turn.el.querySelector(".partial").textContent = turn.final === null ? turn.partial : "";
}

function onEvent(event) {
  switch (event.type) {
    case "input_audio_buffer.speech_started": {
      const turn = turnFor(event.item_id, event.audio_start_ms);
      turn.el.classList.add("speaking");
      break;
    }
    case "input_audio_buffer.speech_stopped":
    case "input_audio_buffer.committed":
      turnFor(event.item_id).el.classList.remove("speaking");
      break;
    case "conversation.item.input_audio_transcription.delta": {
      const turn = turnFor(event.item_id);
      turn.partial += event.delta;
      render(turn);
      break;
    }
    case "conversation.item.input_audio_transcription.completed": {
      const turn = turnFor(event.item_id);
      turn.final = event.transcript;
      turn.el.classList.remove("speaking");
      turn.el.classList.add("done");
      render(turn);
      break;
    }
    case "conversation.item.input_audio_transcription.failed": {
      const turn = turnFor(event.item_id);
      turn.final = "[" + event.error.message + "]";
      turn.el.classList.add("done", "failed");
      render(turn);
      break;
    }
    case "error":
      // An idle session is closed right after this event; onclose words it.
      if (event.error.code !== "idle_timeout") setStatus("Server error: " + event.error.message, true);
      break;
  }
}

// ---- WebSocket -------------------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}/v1/realtime?intent=transcription`;
  // Browsers cannot send headers on a WebSocket: OpenAI's browser clients pass the key as a
  // subprotocol, and so does this page.
  const protocols = ["realtime"];
  if (ui.key.value) protocols.push("openai-insecure-api-key." + ui.key.value);
  const ws = new WebSocket(url, protocols);
  ws.onmessage = (message) => onEvent(JSON.parse(message.data));
  ws.onclose = (e) => {
    if (current && current.ws === ws) {
      const idle = e.reason === "idle timeout";
      setStatus(idle ? "Closed: no audio for a while." : `Disconnected (${e.code}${e.reason ? ": " + e.reason : ""}).`,
        !idle && e.code !== 1000);
      stop();
    }
  };
  return new Promise((resolve, reject) => {
    ws.onopen = () => {
      ws.send(JSON.stringify({
        type: "session.update",
        session: {
          type: "transcription",
          audio: {
            input: {
              format: { type: "audio/pcm", rate: RATE },
              transcription: { model: "whisper-1" },
              turn_detection: VAD,
            },
          },
        },
      }));
      resolve(ws);
    };
    ws.onerror = () => reject(new Error("cannot connect to " + url));
  });
}

function base64Pcm16(samples) {
  const bytes = new Uint8Array(samples.length * 2);
  const view = new DataView(bytes.buffer);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function sendAudio(ws, samples) {
  if (ws.readyState === WebSocket.OPEN) {
    ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio: base64Pcm16(samples) }));
  }
}

// Collects float samples and sends them in 100 ms appends.
function chunker(ws) {
  let pending = new Float32Array(0);
  return (samples) => {
    const joined = new Float32Array(pending.length + samples.length);
    joined.set(pending);
    joined.set(samples, pending.length);
    let offset = 0;
    for (; offset + CHUNK_SAMPLES <= joined.length; offset += CHUNK_SAMPLES) {
      sendAudio(ws, joined.subarray(offset, offset + CHUNK_SAMPLES));
    }
    pending = joined.slice(offset);
  };
}

// ---- microphone ------------------------------------------------------------------------------

// The worklet hands 128-sample render quanta to the page; inlined so the page is two files.
const WORKLET = `
class Capture extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) this.port.postMessage(channel.slice(0));
    return true;
  }
}
registerProcessor("capture", Capture);
`;

// Linear-interpolation resampler, only used when the browser refuses a 24 kHz AudioContext.
function resampler(fromRate) {
  if (fromRate === RATE) return (x) => x;
  const step = fromRate / RATE;
  let position = 0;
  let last = 0;
  return (input) => {
    const out = [];
    for (; position < input.length; position += step) {
      const i = Math.floor(position);
      const frac = position - i;
      const a = i === 0 ? last : input[i - 1];
      out.push(a + (input[i] - a) * frac);
    }
    position -= input.length;
    last = input[input.length - 1];
    return Float32Array.from(out);
  };
}

async function startMicrophone() {
  // Whisper copes with noise better than with WebRTC's noise suppression artefacts; gain
  // control stays on so quiet microphones still cross the VAD threshold.
  const media = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: true },
  });
  let ctx;
  try {
    ctx = new AudioContext({ sampleRate: RATE });
  } catch {
    ctx = new AudioContext();
  }
  const ws = await connect();
  const push = chunker(ws);
  const convert = resampler(ctx.sampleRate);
  const source = ctx.createMediaStreamSource(media);
  let node;
  if (ctx.audioWorklet) {
    const url = URL.createObjectURL(new Blob([WORKLET], { type: "application/javascript" }));
    await ctx.audioWorklet.addModule(url);
    node = new AudioWorkletNode(ctx, "capture");
    node.port.onmessage = (e) => push(convert(e.data));
  } else {
    node = ctx.createScriptProcessor(2048, 1, 1);
    node.onaudioprocess = (e) => push(convert(e.inputBuffer.getChannelData(0)));
  }
  source.connect(node);
  node.connect(ctx.destination); // keeps the graph pulling; the worklet outputs silence
  setStatus("Listening to the microphone…");
  return {
    ws,
    stop() {
      media.getTracks().forEach((t) => t.stop());
      ctx.close();
      ws.close(1000);
    },
  };
}

// ---- file ------------------------------------------------------------------------------------

async function startFile(file) {
  const encoded = await file.arrayBuffer();
  const decoder = new AudioContext();
  const decoded = await decoder.decodeAudioData(encoded).finally(() => decoder.close());
  // Let the browser resample (band-limited) and downmix to 24 kHz mono.
  const offline = new OfflineAudioContext(1, Math.ceil(decoded.duration * RATE), RATE);
  const node = offline.createBufferSource();
  node.buffer = decoded;
  node.connect(offline.destination);
  node.start();
  const rendered = (await offline.startRendering()).getChannelData(0);
  const samples = new Float32Array(rendered.length + Math.round(TAIL_SILENCE_S * RATE));
  samples.set(rendered);

  const ws = await connect();
  const player = new Audio(URL.createObjectURL(file));
  player.play().catch(() => {}); // audible playback is a nicety; autoplay rules may refuse it
  const started = performance.now();
  let sent = 0;
  // Real-time pace: each tick sends what the wall clock says has been "spoken" by now.
  const timer = setInterval(() => {
    const due = Math.min(samples.length, Math.floor(((performance.now() - started) / 1000) * RATE));
    for (; sent + CHUNK_SAMPLES <= due; sent += CHUNK_SAMPLES) {
      sendAudio(ws, samples.subarray(sent, sent + CHUNK_SAMPLES));
    }
    if (sent + CHUNK_SAMPLES > samples.length) {
      clearInterval(timer);
      setStatus(`Sent ${file.name}; waiting for the last transcript…`);
    }
  }, 50);
  setStatus(`Streaming ${file.name}…`);
  return {
    ws,
    stop() {
      clearInterval(timer);
      player.pause();
      ws.close(1000);
    },
  };
}

// ---- controls --------------------------------------------------------------------------------

async function start(kind, file) {
  if (current) stop();
  ui.mic.disabled = true;
  ui.stop.disabled = false;
  try {
    current = kind === "mic" ? await startMicrophone() : await startFile(file);
  } catch (err) {
    setStatus(String(err.message || err), true);
    stop();
  }
}

function stop() {
  const running = current;
  current = null;
  if (running) running.stop();
  ui.mic.disabled = false;
  ui.stop.disabled = true;
}

ui.mic.addEventListener("click", () => start("mic"));
ui.stop.addEventListener("click", () => {
  stop();
  setStatus("Stopped.");
});
ui.file.addEventListener("change", () => {
  if (ui.file.files.length) start("file", ui.file.files[0]);
  ui.file.value = "";
});

const params = new URLSearchParams(location.search);
if (params.get("key")) ui.key.value = params.get("key");
if (params.get("autostart") === "1") start("mic");
