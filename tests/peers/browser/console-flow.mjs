// An admin using the console, in headless Chromium (Debian's): open /admin, sign in at the
// identity provider's own login page, find a device by its name, queue DeviceInformation and
// wait, without reloading, for the page to show the device's answer; then plan an uploaded
// policy file (its per-device difference: the device must belong to someone in
// cn=engineering,ou=groups,dc=example,dc=org at provider "corp"), reveal a token and issue an
// app client. axe-core checks every page on the way (WCAG 2 A/AA rules and best practices).
//
//   node console-flow.mjs BASE_URL BUTTON_TEXT USER PASSWORD DEVICE_NAME OUT_DIR [SERVED_AT]
//
// BASE_URL is the broker's public URL (the one the identity provider redirects to). With
// SERVED_AT, the broker listens there instead: every request the browser makes to BASE_URL is
// sent to SERVED_AT instead (so the test needs no fixed port of its own).
//
// Prints one JSON line: {"violations": {page: [{id, impact, help, targets}]}, "status": <the
// command's status the page shows at the end>, "reloaded": <whether the page was reloaded
// meanwhile>, "cancelShown": <whether its Cancel button is still offered>, "styled": <whether the console's style sheet applied>, "screenshots": [paths]}.
// The caller answers the command with its device simulator while this waits. Exits non-zero
// with a message when a step fails.
import fs from 'node:fs';
import path from 'node:path';
import axe from 'axe-core';
import puppeteer from 'puppeteer-core';

const [base, buttonText, user, password, deviceName, outDir, servedAt] = process.argv.slice(2);
if (!outDir) {
  console.error('usage: console-flow.mjs BASE_URL BUTTON_TEXT USER PASSWORD DEVICE_NAME OUT_DIR');
  process.exit(2);
}
const chromium = process.env.CHROMIUM || '/usr/bin/chromium';
// A page of the broker's, at the public URL or (once a rewritten navigation landed there)
// where it is served.
const ours = (url, path = '') =>
  url.startsWith(`${base}${path}`) || Boolean(servedAt && url.startsWith(`${servedAt}${path}`));
const step = (what) => console.error(`browser: ${what}`);
const violations = {};
const screenshots = [];

const browser = await puppeteer.launch({
  executablePath: chromium,
  headless: true,
  args: ['--no-sandbox', '--disable-dev-shm-usage', '--no-first-run'],
});
try {
  const page = await browser.newPage();
  if (servedAt && servedAt !== base) {
    await page.setRequestInterception(true);
    page.on('request', (request) => {
      const url = request.url();
      if (url === base || url.startsWith(`${base}/`)) {
        request.continue({ url: servedAt + url.slice(base.length) });
      } else {
        request.continue();
      }
    });
  }
  await page.setViewport({ width: 1280, height: 900 });
  page.setDefaultTimeout(20000);

  // axe runs through the DevTools protocol (not a <script> tag), so the console's
  // Content-Security-Policy stays in force for everything the page itself loads.
  const check = async (name) => {
    await page.evaluate(axe.source);
    violations[name] = await page.evaluate(async () => {
      const result = await window.axe.run(document, { resultTypes: ['violations'] });
      return result.violations.map((v) => ({
        id: v.id,
        impact: v.impact,
        help: v.help,
        targets: v.nodes.slice(0, 5).map((n) => n.target.join(' ')),
      }));
    });
  };
  const shot = async (name) => {
    const file = path.resolve(outDir, `console-${name}.png`);
    await page.screenshot({ path: file, fullPage: true });
    screenshots.push(file);
  };
  const go = (action) => Promise.all([page.waitForNavigation({ waitUntil: 'load' }), action]);

  // Where the broker is served; only the provider's redirect back uses the public URL.
  const home = servedAt || base;
  step(`open ${home}/admin`);
  await page.goto(`${home}/admin`, { waitUntil: 'load' });
  await check('sign-in');
  const [button] = await page.$$(`xpath/.//a[contains(., ${JSON.stringify(buttonText)})]`);
  if (!button) throw new Error(`no "${buttonText}" on the console's sign-in page`);
  const styled = await button.evaluate((b) => getComputedStyle(b).backgroundColor);
  step(`press "${buttonText}"`);
  await go(button.click());

  step(`sign in at ${new URL(page.url()).origin} as ${user}`);
  await page.type('input[name=login]', user);
  await page.type('input[name=password]', password);
  await go(page.click('button[type=submit], input[type=submit]'));
  if (!ours(page.url()) && (await page.$('button[type=submit]'))) {
    step('consent');
    await go(page.click('button[type=submit]'));
  }
  if (!ours(page.url(), '/admin') || new URL(page.url()).pathname !== '/admin') {
    throw new Error(`expected the console's overview, at ${page.url()}: ${await page.content()}`);
  }
  await check('overview');
  await shot('overview');

  step('find the device');
  await go(page.click('nav a[href="/admin/devices"]'));
  await page.type('#q', deviceName);
  await go(page.click('.filters button[type=submit]'));
  await check('devices');
  const [link] = await page.$$(`xpath/.//table//a[contains(., ${JSON.stringify(deviceName)})]`);
  if (!link) throw new Error(`no device "${deviceName}" in the list: ${await page.content()}`);
  await go(link.click());
  await check('device');

  step('queue DeviceInformation');
  await go(page.click('#queue-information'));
  const first = '#commands tbody tr [data-status]';
  const queued = await page.$eval(first, (s) => s.textContent.trim());
  if (!['queued', 'sent'].includes(queued)) throw new Error(`the new command is ${queued}`);
  // Gone if the page is reloaded.
  await page.evaluate(() => { window.notReloaded = true; });
  step('wait for the device to answer');
  await page.waitForFunction(
    (selector) => document.querySelector(selector)?.textContent.trim() === 'acknowledged',
    { timeout: 60000, polling: 250 },
    first,
  );
  const status = await page.$eval(first, (s) => s.textContent.trim());
  const reloaded = !(await page.evaluate(() => window.notReloaded === true));
  const cancelShown = await page.$eval('#commands tbody tr', (r) => {
    const form = r.querySelector('[data-cancel]');
    return Boolean(form && !form.hidden);
  });
  await check('device-answered');
  await shot('device');
  // The same page on a phone.
  await page.setViewport({ width: 390, height: 844, isMobile: true, hasTouch: true });
  await shot('device-phone');
  await page.setViewport({ width: 1280, height: 900 });

  step('people and groups');
  await go(page.click('nav a[href="/admin/people"]'));
  await check('people');
  await go(page.click('nav a[href="/admin/groups"]'));
  await check('groups');

  step('policies and a plan');
  await go(page.click('nav a[href="/admin/policies"]'));
  await check('policies');
  await page.type('#plan-path', 'example.yaml');
  await page.type('#plan-content', 'name: example\ndescription: [unclosed\n');
  await go(page.click('#plan'));
  await check('plan');

  step('plan an uploaded file');
  await go(page.click('nav a[href="/admin/policies"]'));
  const uploadDir = path.resolve(outDir, 'console-upload');
  fs.mkdirSync(uploadDir, { recursive: true });
  const policyFile = path.join(uploadDir, 'engineering.yaml');
  fs.writeFileSync(policyFile, [
    'name: engineering',
    'targets:',
    '  groups:',
    '    - { provider: corp, id: "cn=engineering,ou=groups,dc=example,dc=org" }',
    'profiles:',
    '  - name: passcode',
    '    payloads:',
    '      - { PayloadType: com.apple.mobiledevice.passwordpolicy, minLength: 8 }',
    '',
  ].join('\n'));
  const fileInput = await page.$('#plan-files');
  await fileInput.uploadFile(policyFile);
  await go(page.click('#plan-upload'));
  if (!(await page.$('.device-group'))) {
    throw new Error(`no per-device difference on the plan: ${await page.content()}`);
  }
  await check('plan-upload');
  await shot('plan-upload');

  step('tokens');
  await go(page.click('nav a[href="/admin/tokens"]'));
  await check('tokens');
  await go(page.click('table a[href^="/admin/tokens/"]'));
  await check('integration');
  await shot('integration');
  step('reveal a token');
  await go(page.click('form[action$="/reveal"] button'));
  if (!(await page.$('#revealed-token'))) throw new Error(`nothing revealed: ${await page.content()}`);
  await check('revealed');
  step('issue an app client');
  await page.type('#client-name', 'vendor-backend');
  await go(page.click('#create-client'));
  if (!(await page.$('#client-secret'))) throw new Error(`no client secret: ${await page.content()}`);
  await check('client-issued');

  step('audit log');
  await go(page.click('nav a[href="/admin/audit"]'));
  await check('audit');
  await shot('audit');

  console.log(JSON.stringify({ violations, status, reloaded, cancelShown, styled, screenshots }));
} finally {
  await browser.close();
}
