// The eval transform's model input from a photo, in the page: web/app.js uses it, and another PWA
// can copy this file as it is (it needs only TF.js for the returned tensor).
'use strict';

// Python's round(): halves go to the even neighbour, so the crop is the eval transform's box.
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// Pillow's antialiased bilinear resize (libImaging/Resample.c, 8-bit fixed point), ported so the
// page hands the model the eval transform's pixels bit for bit: a triangle filter widened to the
// shrink factor, rows first, rounded to 8 bits between the two passes. For output pixel o, the
// input pixels first[o] .. first[o] + count[o] - 1 weigh weights[o * taps + i] / 2^22.
const PRECISION_BITS = 22;
const HALF = 1 << (PRECISION_BITS - 1);  // rounds the fixed-point sums to nearest

function resampleWeights(inSize, in0, in1, outSize) {  // in0, in1: whole pixels, so float32 in Pillow too
  const scale = (in1 - in0) / outSize;
  const filterScale = Math.max(scale, 1);
  const support = filterScale;  // the triangle's support, 1 input pixel, widened when shrinking
  const inverse = 1 / filterScale;
  const taps = Math.ceil(support) * 2 + 1;
  const first = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const weights = new Int32Array(outSize * taps);
  const w = new Float64Array(taps);
  for (let o = 0; o < outSize; o++) {
    const center = in0 + (o + 0.5) * scale;
    first[o] = Math.max(0, Math.trunc(center - support + 0.5));
    count[o] = Math.min(inSize, Math.trunc(center + support + 0.5)) - first[o];
    let total = 0;
    for (let i = 0; i < count[o]; i++) {
      const x = Math.abs((i + first[o] - center + 0.5) * inverse);
      w[i] = x < 1 ? 1 - x : 0;
      total += w[i];
    }
    for (let i = 0; i < count[o]; i++) {
      weights[o * taps + i] = Math.trunc(0.5 + (total !== 0 ? w[i] / total : w[i]) * (1 << PRECISION_BITS));
    }
  }
  return {first, count, weights, taps};
}

function clip8(sum) { return Math.min(255, Math.max(0, sum >> PRECISION_BITS)); }

// Source pixels read per drawImage/getImageData band: 4 MB of RGBA, whatever the photo's size.
const BAND_PIXELS = 1 << 20;

// The eval transform (input_pipeline.centre_crop on the full decode): the centre square of
// `fraction` of the short side, resized to size×size. The photo is read a band of rows at a time
// and each band is shrunk along its rows at once, so neither the photo nor the crop ever becomes
// a tensor or one pixel buffer (a 12 MP photo read whole by fromPixels is a ~146 MB int32
// tensor). Transparent pixels are flattened onto white, as the download stage does.
function preprocess(image, size, fraction) {
  const width = image.naturalWidth || image.width;
  const height = image.naturalHeight || image.height;
  const side = Math.max(1, roundHalfEven(Math.min(width, height) * fraction));
  const [left, top] = [Math.floor((width - side) / 2), Math.floor((height - side) / 2)];
  const cols = resampleWeights(width, left, left + side, size);
  const rows = resampleWeights(height, top, top + side, size);
  const [x0, y0] = [cols.first[0], rows.first[0]];
  const spanX = cols.first[size - 1] + cols.count[size - 1] - x0;
  const spanY = rows.first[size - 1] + rows.count[size - 1] - y0;
  const band = Math.max(1, Math.min(spanY, Math.floor(BAND_PIXELS / spanX)));
  const context = new OffscreenCanvas(spanX, band).getContext('2d', {willReadFrequently: true});
  context.imageSmoothingEnabled = false;  // a 1:1 copy of decoded pixels
  context.fillStyle = '#fff';
  const shrunkRows = new Uint8Array(spanY * size * 3);
  for (let y = 0; y < spanY; y += band) {
    const h = Math.min(band, spanY - y);
    context.fillRect(0, 0, spanX, h);
    context.drawImage(image, x0, y0 + y, spanX, h, 0, 0, spanX, h);
    const pixels = context.getImageData(0, 0, spanX, h).data;
    for (let r = 0; r < h; r++) {
      for (let o = 0; o < size; o++) {
        let red = HALF;
        let green = HALF;
        let blue = HALF;
        let p = (r * spanX + cols.first[o] - x0) * 4;
        for (let i = 0, k = o * cols.taps; i < cols.count[o]; i++, k++, p += 4) {
          const weight = cols.weights[k];
          red += pixels[p] * weight;
          green += pixels[p + 1] * weight;
          blue += pixels[p + 2] * weight;
        }
        const q = ((y + r) * size + o) * 3;
        shrunkRows[q] = clip8(red);
        shrunkRows[q + 1] = clip8(green);
        shrunkRows[q + 2] = clip8(blue);
      }
    }
  }
  const input = new Float32Array(size * size * 3);
  for (let o = 0; o < size; o++) {
    for (let x = 0; x < size * 3; x++) {
      let sum = HALF;
      for (let i = 0, k = o * rows.taps; i < rows.count[o]; i++, k++) {
        sum += shrunkRows[(rows.first[o] - y0 + i) * size * 3 + x] * rows.weights[k];
      }
      input[o * size * 3 + x] = clip8(sum);
    }
  }
  return tf.tensor4d(input, [1, size, size, 3]);
}
