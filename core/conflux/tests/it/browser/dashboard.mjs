// Loads the dashboard page in headless Chromium (driven by playwright-core),
// waits for live figures, checks that they change as events arrive, and
// saves a screenshot. Usage: node dashboard.mjs <page url> <screenshot.png>
// Prints one JSON line with what it saw; exits non-zero on any failure.
import { openPage } from "./page.mjs";

const [url, screenshot] = process.argv.slice(2);
const { browser, page, problems } = await openPage(url);
try {
  // Figures arrive: the live feed connects and every widget draws.
  await page.waitForSelector('#live-state:text("live")', { timeout: 20000 });
  for (const kind of ["series", "bars", "gauge", "rate", "table"]) {
    await page.waitForSelector(`[data-widget="${kind}"] [data-role="value"], [data-widget="${kind}"] table`, { timeout: 20000 });
  }
  await page.waitForFunction(() => /in \d/.test(document.querySelector('[data-component="bookings"] [data-role="rate"]')?.textContent || ""), null, { timeout: 20000 });
  // The live tap shows what a component emitted.
  await page.selectOption('[data-role="tap-component"]', "private");
  await page.waitForFunction(() => (document.querySelector('[data-role="tap"]')?.textContent || "").includes("restaurantId"), null, { timeout: 20000 });
  const read = () => page.evaluate(() => ({
    series: [...document.querySelectorAll('[data-widget="series"] .legend span')].map((e) => e.textContent),
    bars: [...document.querySelectorAll('[data-widget="bars"] .bar')].map((e) => e.textContent),
    gauge: document.querySelector('[data-widget="gauge"] [data-role="value"]')?.textContent,
    table: [...document.querySelectorAll('[data-widget="table"] tbody tr')].map((e) => e.textContent),
    components: [...document.querySelectorAll("tr[data-component]")].map((r) => [...r.children].map((c) => c.textContent)),
    admin: document.querySelector("#admin-state").textContent,
    tap: document.querySelector('[data-role="tap"]').textContent,
  }));
  const before = await read();
  let after = before;
  const deadline = Date.now() + 20000;
  while (Date.now() < deadline) {
    await page.waitForTimeout(1000);
    after = await read();
    if (JSON.stringify(after.series) !== JSON.stringify(before.series) && after.gauge !== before.gauge) break;
  }
  await page.screenshot({ path: screenshot, fullPage: true });
  const changed = JSON.stringify(after.series) !== JSON.stringify(before.series) && after.gauge !== before.gauge;
  console.log(JSON.stringify({ changed, before, after, problems }));
  process.exitCode = changed && problems.length === 0 ? 0 : 1;
} finally {
  await browser.close();
}
