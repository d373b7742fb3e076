// The console in a real browser (Debian's chromium, driven by playwright-core): an operator
// signs in, creates a price and a package (each first with a mistake, shown next to its field),
// assigns the package, sees the user's credits change after a deduct, and downloads the
// consumption report as CSV and .xlsx; then the user signs in and sees their own page.
//
// Run by tests/console_browser.rs, which starts the engine on a fresh database, passes these
// variables, and checks the downloads and the database afterwards. Prints one JSON line of
// what it saw; exits non-zero at the first expectation that does not hold.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const base = env("BASE_URL");
const adminToken = env("ADMIN_TOKEN");
const userToken = env("USER_TOKEN");
const serviceToken = env("SERVICE_TOKEN");
const userId = env("USER_ID");
const out = env("OUT_DIR");
mkdirSync(out, { recursive: true });

function expect(condition, message) {
  if (!condition) throw new Error(`expectation failed: ${message}`);
}

let shot = 0;
async function screenshot(page, name) {
  shot += 1;
  await page.screenshot({ path: join(out, `${String(shot).padStart(2, "0")}-${name}.png`), fullPage: true });
}

/** Clicks and waits for the page the click leads to (a form's redirect or re-render). */
async function submit(page, selector) {
  await Promise.all([page.waitForNavigation(), page.click(selector)]);
}

async function text(page, selector) {
  return (await page.textContent(selector))?.trim();
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox"],
});
const seen = {};
const context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1280, height: 900 } });
const page = await context.newPage();
try {

  // Sign in: a console page sends an anonymous visitor to the sign-in form and back.
  await page.goto(`${base}/console/prices`);
  expect(page.url().includes("/console/login"), `redirected to sign in, at ${page.url()}`);
  await page.fill("#token", "not-a-token");
  await submit(page, "form button[type=submit]");
  expect((await page.textContent("body")).includes("invalid token"), "a bad token is refused with a reason");
  await page.fill("#token", adminToken);
  await submit(page, "form button[type=submit]");
  expect(new URL(page.url()).pathname === "/console/prices", `back on the prices page, at ${page.url()}`);
  const cookies = await context.cookies();
  const session = cookies.find((cookie) => cookie.name === "credits_session");
  expect(session && session.httpOnly && session.sameSite === "Strict", "the session cookie is HttpOnly and SameSite=Strict");
  await screenshot(page, "prices");

  // A price: a negative cost is refused next to its field and nothing is saved.
  const priceForm = "#price-create";
  await page.fill(`${priceForm} #action_key`, "e2e_summary");
  await page.fill(`${priceForm} #name`, "E2E summary");
  await page.fill(`${priceForm} #credits_cost`, "-1");
  await submit(page, `${priceForm} button[type=submit]`);
  const priceError = await text(page, "#field-credits_cost .field-error");
  expect(priceError && priceError.length > 0, "the cost's error is shown next to it");
  expect((await page.$('tr[data-action-key="e2e_summary"]')) === null, "the refused price is not listed");
  expect((await page.inputValue(`${priceForm} #name`)) === "E2E summary", "the form keeps what was typed");
  seen.price_error = priceError;
  await screenshot(page, "price-refused");
  await page.fill(`${priceForm} #credits_cost`, "2");
  await submit(page, `${priceForm} button[type=submit]`);
  expect(page.url().includes("done=price_created"), `price created, at ${page.url()}`);
  expect((await page.$('tr[data-action-key="e2e_summary"]')) !== null, "the new price is listed");
  await screenshot(page, "price-created");

  // A package: a hybrid package needs its duration; the error names that field.
  await page.goto(`${base}/console/packages`);
  const packageForm = "#package-form";
  await page.fill(`${packageForm} #name`, "E2E pack");
  await page.selectOption(`${packageForm} #package_type`, "hybrid");
  await page.fill(`${packageForm} #credits_amount`, "50");
  await submit(page, `${packageForm} button[type=submit]`);
  const durationError = await text(page, "#field-duration_days .field-error");
  expect(durationError && durationError.length > 0, "the missing duration is shown next to its field");
  seen.package_error = durationError;
  await screenshot(page, "package-refused");
  await page.selectOption(`${packageForm} #package_type`, "credits");
  expect(await page.isHidden("#field-duration_days"), "a credits package hides the duration field");
  await submit(page, `${packageForm} button[type=submit]`);
  expect(page.url().includes("done=package_created"), `package created, at ${page.url()}`);
  const packageRow = page.locator("tr[data-package-id]", { hasText: "E2E pack" });
  const packageId = await packageRow.getAttribute("data-package-id");
  expect(packageId, "the new package is listed with its id");
  seen.package_id = Number(packageId);
  await page.goto(`${base}/console/packages?sort=price_cents&order=desc&package_type=credits`);
  expect((await page.locator("tr[data-package-id]", { hasText: "E2E pack" }).count()) === 1, "filters keep the credits package");
  await screenshot(page, "packages-filtered");

  // Assign it to the user; their remaining credits show on the page.
  await page.goto(`${base}/console/users?user_id=${userId}`);
  await page.selectOption("#package_id", packageId);
  await page.selectOption("#source", "gift");
  await page.fill("#note", "browser test");
  await submit(page, "#assign button[type=submit]");
  expect(page.url().includes("done=grant_assigned"), `assigned, at ${page.url()}`);
  expect((await text(page, "#remaining")) === "50", `50 credits after assigning, saw ${await text(page, "#remaining")}`);
  await screenshot(page, "assigned");

  // A workflow service deducts 3 x 2 credits; the operator's page shows 44 after a reload.
  const deducted = await fetch(`${base}/api/internal/billing/credits/deduct`, {
    method: "POST",
    headers: { authorization: `Bearer ${serviceToken}`, "content-type": "application/json" },
    body: JSON.stringify({ user_id: Number(userId), action_key: "e2e_summary", quantity: 3, idempotency_key: "e2e-1" }),
  });
  const deduct = await deducted.json();
  expect(deducted.status === 200 && deduct.remaining_credits === 44, `deduct answered ${deducted.status} ${JSON.stringify(deduct)}`);
  seen.consumption_id = deduct.consumption_id;
  await page.reload();
  expect((await text(page, "#remaining")) === "44", `44 credits after the deduct, saw ${await text(page, "#remaining")}`);
  await screenshot(page, "after-deduct");

  // The report: totals, both charts, and the two downloads.
  await page.goto(`${base}/console/consumption?user_id=${userId}`);
  expect((await text(page, "#total-credits")) === "6", `6 credits charged, saw ${await text(page, "#total-credits")}`);
  expect((await page.locator("figure.chart svg").count()) === 2, "a daily chart and a per-action chart");
  await screenshot(page, "consumption");
  for (const [link, file] of [["#export-csv", "consumption.csv"], ["#export-xlsx", "consumption.xlsx"]]) {
    const [download] = await Promise.all([page.waitForEvent("download"), page.click(link)]);
    expect(download.suggestedFilename() === file, `downloaded ${download.suggestedFilename()}`);
    await download.saveAs(join(out, file));
  }

  await page.goto(`${base}/console/events?user_id=${userId}`);
  expect((await page.textContent("main")).includes("billing_credits_deduct"), "the deduct is in the audit events");
  await page.goto(`${base}/console/reconciliation`);
  await submit(page, "#run-reconciliation");
  expect((await text(page, "#mismatch-count")) === "0", "reconciliation finds nothing wrong");
  await screenshot(page, "reconciliation");

  // Sign out; the user signs in on their own page and sees only their own credits.
  await submit(page, 'form[action="/console/logout"] button[type=submit]');
  await page.goto(`${base}/me`);
  expect(page.url().includes("/me/login"), `signed out, at ${page.url()}`);
  await page.fill("#token", userToken);
  await submit(page, "form button[type=submit]");
  expect(new URL(page.url()).pathname === "/me", `the user is on /me, at ${page.url()}`);
  expect((await text(page, "#my-remaining")) === "44", `the user sees 44, saw ${await text(page, "#my-remaining")}`);
  await screenshot(page, "me");
  await page.goto(`${base}/me/consumption`);
  expect((await page.textContent("main")).includes("e2e_summary"), "the user's history lists the deduct");
  await screenshot(page, "me-consumption");
  const refused = await page.goto(`${base}/console/prices`);
  expect(refused.status() === 403, `a user is refused the console, got ${refused.status()}`);
  await screenshot(page, "user-refused");

  console.log(JSON.stringify({ ok: true, ...seen }));
} catch (error) {
  // What the browser showed when it went wrong.
  await page.screenshot({ path: join(out, "failure.png"), fullPage: true }).catch(() => {});
  console.error(`failed at ${page.url()}`);
  throw error;
} finally {
  await browser.close();
}
