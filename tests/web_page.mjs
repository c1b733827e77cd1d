// Drives the examples/web page in headless Chromium (playwright-core from examples/web/node_modules):
// loads image files, waits until every one is classified, optionally moves the threshold slider and
// waits again, saves a screenshot, and prints what the page shows as JSON.
//
//   node web_page.mjs CONFIG.json   (webDir, url, chromium, files, screenshot, threshold or null)
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const { chromium } = await import(pathToFileURL(join(config.webDir, 'node_modules', 'playwright-core', 'index.mjs')).href);

const browser = await chromium.launch({
  executablePath: config.chromium,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--no-first-run'],
});
const shown = () => [...document.querySelectorAll('#results tr')].map((row) => ({
  prediction: row.dataset.prediction === undefined ? null : Number(row.dataset.prediction),
  exit: row.dataset.exit === undefined ? null : Number(row.dataset.exit),
  classText: row.children[3].textContent,
}));
const settled = (count) => window.edgeexit.pending === 0 && window.edgeexit.inputs.length === count
  && window.edgeexit.inputs.every((entry) => entry.result);
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  const errors = [];
  page.on('pageerror', (err) => errors.push(String(err)));
  await page.goto(config.url);
  await page.waitForSelector('body[data-ready="true"]', { timeout: 60000 });
  await page.setInputFiles('#files', config.files);
  await page.waitForFunction(settled, config.files.length, { timeout: 120000 });
  const result = { status: await page.textContent('#status'), shown: await page.evaluate(shown), errors };
  result.histogram = await page.$$eval('#histogram .bar', (bars) => bars.map((b) => Number(b.firstChild.textContent)));
  if (config.threshold !== null) {
    await page.$eval('#threshold', (el, value) => {
      el.value = String(value);
      el.dispatchEvent(new Event('input'));
      el.dispatchEvent(new Event('change'));
    }, config.threshold);
    await page.waitForFunction((count) => window.edgeexit.runs === 1 && window.edgeexit.pending === 0
      && window.edgeexit.inputs.length === count && window.edgeexit.inputs.every((entry) => entry.result), config.files.length,
    { timeout: 120000 });
    result.afterSlider = await page.evaluate(shown);
    result.thresholdsUsed = await page.textContent('#thresholds-used');
  }
  await page.screenshot({ path: config.screenshot, fullPage: true });
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
