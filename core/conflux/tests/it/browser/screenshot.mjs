// Opens a pipeline's dashboard in headless Chromium (playwright-core), waits
// until its feed is live and every widget drew a figure, and saves what a user
// sees. Usage: node screenshot.mjs <page url> <screenshot.png>
// Prints one JSON line ({widgets, drawn}); exits non-zero on any failure.
import { openPage } from "./page.mjs";

const [url, screenshot] = process.argv.slice(2);
const { browser, page, problems } = await openPage(url);
try {
  await page.waitForSelector('#live-state:text("live")', { timeout: 20000 });
  const count = () => page.evaluate(() => {
    const widgets = [...document.querySelectorAll("[data-widget]")];
    const drawn = widgets.filter((w) => w.querySelector('[data-role="value"], table'));
    return { widgets: widgets.length, drawn: drawn.length };
  });
  await page.waitForFunction(() => {
    const widgets = [...document.querySelectorAll("[data-widget]")];
    return widgets.length > 0 && widgets.every((w) => w.querySelector('[data-role="value"], table'));
  }, null, { timeout: 20000 });
  await page.waitForTimeout(1500);
  await page.screenshot({ path: screenshot, fullPage: true });
  if (problems.length) throw new Error("page errors: " + problems.join("; "));
  console.log(JSON.stringify(await count()));
} finally {
  await browser.close();
}
