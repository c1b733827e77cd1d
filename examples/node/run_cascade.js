#!/usr/bin/env node
// Run an edgeexit bundle's cascade.onnx with onnxruntime-node: one session, one run per batch.
// Prints one line per input, as `edgeexit run BUNDLE --input X.npy` does: index, class name, exit.
//
//   node run_cascade.js BUNDLE INPUT.npy
//
// INPUT.npy: float32 (N, C, H, W), already normalized with the bundle's mean/std (manifest.json).
// The exits use the thresholds (and beta, temperature) stored in cascade.onnx as constants, the
// manifest's values (`edgeexit calibrate` rewrites both): the session takes the image alone and
// loads without warnings. To feed other thresholds per call, run the copy of cascade.onnx that takes
// them as inputs (edgeexit.runtime.graph.tunable_cascade_bytes; `edgeexit web` serves it).
'use strict';
const fs = require('fs');
const path = require('path');
const ort = require('onnxruntime-node');

function fail(message) {
  console.error(`error: ${message}`);
  process.exit(2);
}

// A minimal .npy reader: little-endian float32, C order, format version 1.x or 2.x.
function readNpy(file) {
  const buf = fs.readFileSync(file);
  if (buf.toString('latin1', 1, 6) !== 'NUMPY') fail(`${file} is not a .npy file`);
  const major = buf[6];
  const headerLen = major === 1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const start = (major === 1 ? 10 : 12) + headerLen;
  const header = buf.toString('latin1', major === 1 ? 10 : 12, start);
  if (!/'descr':\s*'<f4'/.test(header) || /'fortran_order':\s*True/.test(header)) {
    fail(`${file} must hold little-endian float32 in C order`);
  }
  const shape = header.match(/'shape':\s*\(([^)]*)\)/)[1].split(',').filter((s) => s.trim()).map(Number);
  const data = new Float32Array(buf.buffer.slice(buf.byteOffset + start, buf.byteOffset + buf.length));
  return { shape, data };
}

async function main(argv) {
  const [bundle, inputFile, ...rest] = argv;
  if (!bundle || !inputFile || rest.length) fail('usage: node run_cascade.js BUNDLE INPUT.npy');
  const manifest = JSON.parse(fs.readFileSync(path.join(bundle, 'manifest.json'), 'utf8'));
  if (!manifest.cascade) fail(`${bundle} has no cascade.onnx: re-export it with a newer edgeexit`);
  const { shape, data } = readNpy(inputFile);
  const want = manifest.input.shape.slice(1);
  if (shape.length !== 4 || want.some((d, i) => d !== shape[i + 1])) {
    fail(`input must have shape (N, ${want.join(', ')}), got (${shape.join(', ')})`);
  }
  const session = await ort.InferenceSession.create(path.join(bundle, manifest.cascade.file));
  const out = await session.run({ [manifest.input.name]: new ort.Tensor('float32', data, shape) });
  const names = manifest.input.class_names;
  const prediction = out.prediction.data;
  const exitIndex = out.exit_index.data;
  for (let i = 0; i < prediction.length; i += 1) {
    console.log(`${i}\t${names[Number(prediction[i])]}\texit ${Number(exitIndex[i])}`);
  }
}

main(process.argv.slice(2)).catch((err) => fail(String(err.message || err).split('\n')[0]));
