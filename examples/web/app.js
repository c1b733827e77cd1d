// The page: loads the bundle that `edgeexit web` serves, runs cascade.onnx with onnxruntime-web (wasm)
// one input at a time, and shows where each input left the network.
//
// /bundle/cascade.onnx is the bundle's cascade.onnx with its per-exit vectors (thresholds; beta;
// temperature) moved from constants into graph inputs, so the threshold slider can feed them:
// onnxruntime-web feeds only the inputs a model lists.
import * as ort from './ort/ort.wasm.min.mjs';
import { pixelsToImage, preprocess } from './preprocess.js';

ort.env.wasm.numThreads = 1; // no cross-origin isolation here: threads would not start anyway
ort.env.wasm.wasmPaths = new URL('./ort/', import.meta.url).href;

// how a policy's threshold reads, and the slider's range (entropy's upper end: log of the class count)
const RULES = {
  confidence: { text: 'an input leaves at an exit when its confidence ≥ T', max: () => 1 },
  max_softmax: { text: 'an input leaves at an exit when its top softmax probability ≥ T', max: () => 1 },
  entropy: { text: 'an input leaves at an exit when its softmax entropy ≤ T', max: (classes) => Math.log(classes) },
  exclusion: { text: 'classes scoring ≤ T drop out; an input leaves when one class is left', max: () => 1 },
};

const $ = (id) => document.getElementById(id);
// everything the page knows, also for the console and the browser test (inputs[i].result)
const state = { manifest: null, session: null, vectors: [], thresholds: [], inputs: [], runs: 0, pending: 0 };
window.edgeexit = state;
let queue = Promise.resolve();

function setStatus(text, isError = false) {
  $('status').textContent = text;
  $('status').style.color = isError ? '#b3261e' : '';
}

// Work on the session one call at a time (a wasm session runs one call at once).
function enqueue(work) {
  state.pending += 1;
  queue = queue.then(work).catch((err) => setStatus(`error: ${err.message || err}`, true)).finally(() => {
    state.pending -= 1;
  });
  return queue;
}

const numExits = () => state.manifest.stages.length - 1;
const exitLabel = (exit) => (exit === numExits() ? 'final stage' : `exit ${exit}`);

async function classify(entry) {
  const { name, shape } = state.manifest.input;
  const feeds = { [name]: new ort.Tensor('float32', entry.x, [1, ...shape.slice(1)]) };
  for (const vector of state.vectors) {
    const values = vector.name === 'thresholds' ? state.thresholds : vector.default;
    feeds[vector.name] = new ort.Tensor('float64', Float64Array.from(values), [values.length]);
  }
  const start = performance.now();
  const out = await state.session.run(feeds, ['prediction', 'exit_index']);
  const ms = performance.now() - start;
  entry.result = { prediction: Number(out.prediction.data[0]), exit: Number(out.exit_index.data[0]), ms };
}

function showLatest(entry) {
  const { prediction, exit, ms } = entry.result;
  $('latest-class').textContent = state.manifest.input.class_names[prediction];
  $('latest-exit').textContent = `left at ${exit === numExits() ? 'the final stage' : `exit ${exit}`} (of ${numExits()} early exits)`;
  $('latest-time').textContent = `${ms.toFixed(1)} ms, ${entry.label}`;
}

function render() {
  const counts = new Array(numExits() + 1).fill(0);
  const done = state.inputs.filter((e) => e.result);
  done.forEach((e) => { counts[e.result.exit] += 1; });
  const most = Math.max(1, ...counts);
  $('histogram').replaceChildren(...counts.map((count, exit) => {
    const bar = document.createElement('div');
    bar.className = 'bar';
    bar.innerHTML = `<div>${count}</div><div class="fill" style="height:${Math.round((80 * count) / most)}px"></div>`
      + `<div>${exit === numExits() ? 'final' : `exit ${exit}`}</div>`;
    return bar;
  }));
  $('counted').textContent = `(${done.length} inputs)`;
  const names = state.manifest.input.class_names;
  $('results').replaceChildren(...state.inputs.map((entry, i) => {
    const row = document.createElement('tr');
    const r = entry.result;
    if (r) Object.assign(row.dataset, { prediction: r.prediction, exit: r.exit });
    row.innerHTML = `<td>${i}</td><td><img alt=""></td><td></td><td>${r ? names[r.prediction] : '…'}</td>`
      + `<td>${r ? exitLabel(r.exit) : ''}</td><td>${r ? r.ms.toFixed(1) : ''}</td>`;
    row.querySelector('img').src = entry.thumbnail;
    row.children[2].textContent = entry.label;
    return row;
  }));
  const rule = state.thresholds.map((t) => +t.toFixed(4)).join(', ');
  $('thresholds-used').textContent = `thresholds per exit: ${rule}`;
}

function addInput(label, image, thumbnail) {
  const entry = { label, thumbnail, x: preprocess(image, state.manifest.input), result: null };
  state.inputs.push(entry);
  return enqueue(async () => {
    await classify(entry);
    showLatest(entry);
    render();
  });
}

async function readFile(file) {
  const bitmap = await createImageBitmap(file, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
  const canvas = document.createElement('canvas');
  [canvas.width, canvas.height] = [bitmap.width, bitmap.height];
  const context = canvas.getContext('2d', { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  const { data } = context.getImageData(0, 0, bitmap.width, bitmap.height);
  return pixelsToImage(data, bitmap.width, bitmap.height, state.manifest.input.shape[1]);
}

async function onFiles(files) {
  const images = [];
  for (const file of files) {
    try {
      images.push([file.name, await readFile(file), URL.createObjectURL(file)]);
    } catch (err) {
      setStatus(`cannot read ${file.name} as an image: ${err.message || err}`, true);
    }
  }
  images.forEach(([name, image, url]) => addInput(name, image, url));
  return queue;
}

function rerunAll() {
  state.runs += 1;
  state.inputs.forEach((entry) => { entry.result = null; });
  render();
  state.inputs.forEach((entry) => enqueue(() => classify(entry)));
  return enqueue(async () => {
    if (state.inputs.length) showLatest(state.inputs[state.inputs.length - 1]);
    render();
  });
}

function setupSlider() {
  const kinds = [...new Set(state.manifest.stages.slice(0, -1).map((s) => s.exit.policy.kind))];
  const rule = RULES[kinds[0]] || { text: 'policy threshold', max: () => 1 };
  const slider = $('threshold');
  slider.max = rule.max(state.manifest.num_classes).toFixed(2);
  slider.value = state.thresholds[0];
  $('rule').textContent = kinds.length === 1 ? `(${rule.text})` : `(policies: ${kinds.join(', ')})`;
  $('threshold-value').textContent = 'manifest';
  slider.addEventListener('input', () => { $('threshold-value').textContent = `T = ${(+slider.value).toFixed(2)}`; });
  slider.addEventListener('change', () => {
    state.thresholds = new Array(numExits()).fill(+slider.value);
    rerunAll();
  });
  $('reset').addEventListener('click', () => {
    state.thresholds = [...state.defaults];
    slider.value = state.thresholds[0];
    $('threshold-value').textContent = 'manifest';
    rerunAll();
  });
}

function setupPad() {
  const [, , height, width] = state.manifest.input.shape;
  const pad = $('pad');
  [pad.width, pad.height] = [8 * width, 8 * height];
  const context = pad.getContext('2d', { willReadFrequently: true });
  const clear = () => { context.fillStyle = '#000'; context.fillRect(0, 0, pad.width, pad.height); };
  clear();
  Object.assign(context, { strokeStyle: '#fff', lineCap: 'round', lineJoin: 'round', lineWidth: pad.width / 7 });
  let last = null;
  const point = (e) => {
    const box = pad.getBoundingClientRect();
    return [((e.clientX - box.left) * pad.width) / box.width, ((e.clientY - box.top) * pad.height) / box.height];
  };
  pad.addEventListener('pointerdown', (e) => { pad.setPointerCapture(e.pointerId); last = point(e); });
  pad.addEventListener('pointermove', (e) => {
    if (!last) return;
    const next = point(e);
    context.beginPath();
    context.moveTo(...last);
    context.lineTo(...next);
    context.stroke();
    last = next;
  });
  pad.addEventListener('pointerup', () => { last = null; });
  $('clear').addEventListener('click', clear);
  let drawings = 0;
  $('classify').addEventListener('click', () => {
    const { data } = context.getImageData(0, 0, pad.width, pad.height);
    drawings += 1;
    addInput(`drawing ${drawings}`, pixelsToImage(data, pad.width, pad.height, state.manifest.input.shape[1]), pad.toDataURL());
  });
}

async function main() {
  const manifest = await (await fetch('./bundle/manifest.json')).json();
  if (!manifest.cascade) throw new Error('this bundle has no cascade.onnx: re-export it with a newer edgeexit');
  state.manifest = manifest;
  state.vectors = manifest.cascade.inputs.slice(1);
  state.defaults = state.vectors.find((v) => v.name === 'thresholds').default;
  state.thresholds = [...state.defaults];
  const model = await (await fetch('./bundle/cascade.onnx')).arrayBuffer();
  state.session = await ort.InferenceSession.create(model, { executionProviders: ['wasm'] });
  const [, c, h, w] = manifest.input.shape;
  await classify({ x: new Float32Array(c * h * w) }); // the first run sets up the session: keep it out of the times
  setStatus(`${manifest.model.backbone} (${manifest.model.method}), ${numExits()} early exits, `
    + `${manifest.num_classes} classes, input ${c}×${h}×${w}; cascade.onnx on onnxruntime-web `
    + `${ort.env.versions?.web ?? ''} (wasm, 1 thread)`);
  setupSlider();
  setupPad();
  $('files').addEventListener('change', (e) => onFiles([...e.target.files]));
  render();
  document.body.dataset.ready = 'true';
}

main().catch((err) => setStatus(`error: ${err.message || err}`, true));
