#!/usr/bin/env node
// Screenshots of a real evomerge run in the MLflow UI, taken with a real headless Chromium.
// Setup (npm registry only): npm install @sparticuz/chromium@153 puppeteer-core@25
// Usage: node mlflow_screenshot.js RUN_URL OUT_PREFIX
//   RUN_URL: what `evomerge ui RUN_DIR` prints, e.g.
//   http://127.0.0.1:5000/#/experiments/1/runs/<id>?workflowType=machine_learning
// Writes OUT_PREFIX-run.png (the printed URL as a new user opens it, nothing clicked),
// OUT_PREFIX-metrics.png (the run's metric charts, filtered to the fitness curves and recipe
// coefficients) and OUT_PREFIX-fitness-plot.png (the fitness.svg artifact).
(async () => {
  const [runUrl, prefix] = process.argv.slice(2);
  const [page_, query] = runUrl.split("?");
  const tab = name => `${page_.replace(/\/$/, "")}/${name}${query ? "?" + query : ""}`;
  const { default: chromium } = await import("@sparticuz/chromium");
  const { default: puppeteer } = await import("puppeteer-core");
  chromium.setGraphicsMode = false;
  const browser = await puppeteer.launch({
    executablePath: await chromium.executablePath(), args: chromium.args, headless: "shell",
    defaultViewport: { width: 1440, height: 900, deviceScaleFactor: 1 },
  });
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  try {
    const page = await browser.newPage();
    await page.goto(runUrl, { waitUntil: "networkidle0", timeout: 60000 });
    await sleep(4000);
    await page.screenshot({ path: `${prefix}-run.png` });   // first open: no clicks
    await page.goto(tab("model-metrics"), { waitUntil: "networkidle0", timeout: 60000 });
    await sleep(3000);
    await page.evaluate(() => {                          // close the assistant side panel if open
      const close = [...document.querySelectorAll("button")].find(b => /close/i.test(b.getAttribute("aria-label") || ""));
      if (close) close.click();
    });
    await sleep(1500);
    const search = await page.$('input[placeholder*="Search metric"]');
    if (search) { await search.click(); await search.type("fitness|param|score", { delay: 20 }); }
    await sleep(4000);
    await page.screenshot({ path: `${prefix}-metrics.png` });
    const artifact = tab("artifacts/fitness.svg");
    await page.goto(artifact, { waitUntil: "networkidle0", timeout: 60000 });
    await sleep(4000);
    await page.screenshot({ path: `${prefix}-fitness-plot.png` });
  } finally {
    await browser.close();
  }
})().catch(e => { console.error(e); process.exit(1); });
