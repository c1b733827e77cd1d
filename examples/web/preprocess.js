// Pixels -> the model-ready input, exactly as edgeexit's Python runtime computes it
// (InputSpec.preprocess: bilinear resize with half-pixel centres and no antialiasing, gray <-> RGB
// with ITU-R 601 luma, (x - mean) / std per channel), and image pixels -> floats in [0, 1] as
// `edgeexit run --input IMAGE` decodes a file (Pillow's "L" or "RGB", then / 255). Every step rounds
// to float32 where numpy does (Math.fround, Float32Array), in numpy's order of operations, so the
// numbers are numpy's to the last bit on the tested cases. No DOM here: the page imports it, and the
// tests run it in node against the Python code.

const f32 = Math.fround;
const LUMA = [0.299, 0.587, 0.114].map(f32);

// (sizeOut x sizeIn) bilinear weights, row-major, as float32 (numpy's _interp_matrix).
export function interpMatrix(sizeIn, sizeOut) {
  const scale = sizeIn / sizeOut;
  const weights = new Float32Array(sizeOut * sizeIn);
  for (let o = 0; o < sizeOut; o += 1) {
    const center = Math.min(Math.max((o + 0.5) * scale - 0.5, 0), sizeIn - 1);
    const low = Math.floor(center);
    const high = Math.min(low + 1, sizeIn - 1);
    const frac = center - low;
    weights[o * sizeIn + low] += 1 - frac;
    weights[o * sizeIn + high] += frac;
  }
  return weights;
}

// image: {data: Float32Array (C*h*w, channel-major), channels, height, width} -> same, at height x width.
export function resize(image, height, width) {
  if (image.height === height && image.width === width) return image;
  const { channels, height: h, width: w, data } = image;
  const rows = interpMatrix(h, height);
  const cols = interpMatrix(w, width);
  const out = new Float32Array(channels * height * width);
  for (let c = 0; c < channels; c += 1) {
    const plane = c * h * w;
    for (let y = 0; y < height; y += 1) {
      for (let x = 0; x < width; x += 1) {
        let sum = 0;
        for (let i = 0; i < h; i += 1) {
          const r = rows[y * h + i];
          if (r === 0) continue;
          for (let j = 0; j < w; j += 1) {
            const k = cols[x * w + j];
            if (k !== 0) sum = f32(sum + f32(f32(r * data[plane + i * w + j]) * k));
          }
        }
        out[(c * height + y) * width + x] = sum;
      }
    }
  }
  return { data: out, channels, height, width };
}

// 1 or 3 channels -> `channels`: gray repeated, RGB to gray by luma.
export function toChannels(image, channels) {
  const { channels: have, height, width, data } = image;
  if (have === channels) return image;
  const size = height * width;
  const out = new Float32Array(channels * size);
  if (have === 1) {
    for (let c = 0; c < channels; c += 1) out.set(data, c * size);
  } else if (have === 3 && channels === 1) {
    for (let p = 0; p < size; p += 1) {
      out[p] = f32(f32(LUMA[0] * data[p]) + f32(LUMA[1] * data[size + p])) + f32(LUMA[2] * data[2 * size + p]);
    }
  } else {
    throw new Error(`cannot convert ${have}-channel images to the bundle's ${channels} channels`);
  }
  return { data: out, channels, height, width };
}

// spec: the manifest's "input" ({shape: ["batch", C, H, W], mean, std}) -> Float32Array (C*H*W).
export function preprocess(image, spec) {
  const [, channels, height, width] = spec.shape;
  const { data } = toChannels(resize(image, height, width), channels);
  const out = new Float32Array(data.length);
  const size = height * width;
  for (let c = 0; c < channels; c += 1) {
    const mean = f32(spec.mean[c]);
    const std = f32(spec.std[c]);
    for (let p = c * size; p < (c + 1) * size; p += 1) out[p] = f32(data[p] - mean) / std;
  }
  return out;
}

// RGBA bytes (canvas ImageData order) -> floats in [0, 1] with the bundle's channels: 1 channel takes
// Pillow's "L" (integer luma, rounded), 3 channels R, G, B; alpha is dropped as Pillow drops it.
export function pixelsToImage(rgba, width, height, channels) {
  const size = width * height;
  const data = new Float32Array((channels === 1 ? 1 : 3) * size);
  for (let p = 0; p < size; p += 1) {
    const [r, g, b] = [rgba[4 * p], rgba[4 * p + 1], rgba[4 * p + 2]];
    if (channels === 1) {
      data[p] = f32((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) / f32(255);
    } else {
      data[p] = f32(r) / f32(255);
      data[size + p] = f32(g) / f32(255);
      data[2 * size + p] = f32(b) / f32(255);
    }
  }
  return { data, channels: channels === 1 ? 1 : 3, height, width };
}
