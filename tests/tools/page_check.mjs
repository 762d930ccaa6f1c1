// Drives an attnscope HTML page (attnscope.view.html_page) in headless Chromium with
// playwright-core, as a user would: opens it, takes a screenshot, hovers cells of the heatmap and
// measures how long each hover takes until the next frame (in the page: the event, the coalesced
// redraw, the frame) and how long the hover's own work takes (work_ms). Prints one JSON object:
// errors (console and page), hover_ms, work_ms, the info line and
// strip state after the last hover, the canvas size and how many spans the strip holds.
//   node tests/tools/page_check.mjs PAGE.html SHOT.png [HOVERS] [VIEW]
// Needs playwright-core (deploy/fetch-tokenizers.sh installs it into $ATTNSCOPE_NPM_DIR, default
// ~/.cache/attnscope/npm) and Chromium ($CHROMIUM, default /usr/bin/chromium).
import { createRequire } from 'node:module';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const npm = process.env.ATTNSCOPE_NPM_DIR || join(homedir(), '.cache', 'attnscope', 'npm');
const { chromium } = createRequire(join(npm, 'package.json'))('playwright-core');

const [page_path, shot, hovers = '20', view = '0'] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
const errors = [];
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1100 } });
  page.on('console', m => { if (m.type() === 'error') errors.push(m.text()); });
  page.on('pageerror', e => errors.push(String(e)));
  const started = Date.now();
  await page.goto(pathToFileURL(page_path).href + '#view=' + view, { timeout: 120000 });
  await page.waitForFunction(() => document.getElementById('barmax').textContent !== '', null, { timeout: 120000 });
  const load_ms = Date.now() - started;
  await page.screenshot({ path: shot });
  const result = await page.evaluate(async (n) => {
    const map = document.getElementById('map'), r = map.getBoundingClientRect();
    const PAD = 90, times = [], work = [];
    for (let k = 0; k < n; k++) {
      // The hover's own work (crosshair, info line, strip shading), called as a mouse move calls it.
      const i = Math.floor(((k + 0.5) / n) * M.R), j = Math.floor((((k * 37) % 97) / 97) * M.C);
      const t = performance.now();
      hover(i, j);
      work.push(performance.now() - t);
      // Points spread over the matrix, each on another row (no hover is answered from the last).
      const x = r.left + PAD + 1 + ((k * 37) % 97) / 97 * (r.width - PAD - 12);
      const y = r.top + PAD + 1 + (k + 0.5) / n * (r.height - PAD - 12);
      const t0 = performance.now();
      map.dispatchEvent(new MouseEvent('mousemove', { clientX: x, clientY: y, bubbles: true }));
      await new Promise(done => requestAnimationFrame(() => done()));
      times.push(performance.now() - t0);
    }
    const info = document.getElementById('info'), strip = document.getElementById('strip');
    return {
      hover_ms: times, work_ms: work, info: info.textContent, row: info.dataset.row, col: info.dataset.col,
      query: strip.dataset.query || null, spans: strip.querySelectorAll('span').length,
      generated_marker: strip.querySelectorAll('span.sep').length, canvas: [map.width, map.height],
    };
  }, Number(hovers));
  result.load_ms = load_ms;
  result.errors = errors;
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
