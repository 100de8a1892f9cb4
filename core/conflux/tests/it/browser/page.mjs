// Headless Chromium (Debian's, driven by playwright-core from PLAYWRIGHT_DIR)
// with one page open at `url`; page errors and console errors are collected
// in `problems`. Shared by the browser tests.
import { createRequire } from "node:module";

export async function openPage(url) {
  const require = createRequire(process.env.PLAYWRIGHT_DIR + "/");
  const { chromium } = require("playwright-core");
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu"],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  const problems = [];
  page.on("pageerror", (e) => problems.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") problems.push(m.text()); });
  await page.goto(url);
  return { browser, page, problems };
}
