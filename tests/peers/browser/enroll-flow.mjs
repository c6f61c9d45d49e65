// A person enrolling through the portal, in headless Chromium (Debian's) emulating an iPhone:
// open /enroll, press the SSO button, sign in at the identity provider's own login page,
// come back, read who the portal says we are, press "Download enrollment profile".
//
//   node enroll-flow.mjs PORTAL_URL BUTTON_TEXT USER PASSWORD OUT_DIR
//
// Prints one JSON line: {"shown": <text of the signed-in page>, "profile": <path of the
// downloaded .mobileconfig>, "buttonColor": <the SSO button's computed background>}. Exits
// non-zero with a message when a step fails.
import fs from 'node:fs';
import path from 'node:path';
import puppeteer, { KnownDevices } from 'puppeteer-core';

const [portal, buttonText, user, password, outDir] = process.argv.slice(2);
if (!outDir) {
  console.error('usage: enroll-flow.mjs PORTAL_URL BUTTON_TEXT USER PASSWORD OUT_DIR');
  process.exit(2);
}
const chromium = process.env.CHROMIUM || '/usr/bin/chromium';
const step = (what) => console.error(`browser: ${what}`);

const browser = await puppeteer.launch({
  executablePath: chromium,
  headless: true,
  // Root in a container has no user namespaces for the sandbox.
  args: ['--no-sandbox', '--disable-dev-shm-usage', '--no-first-run'],
});
try {
  const page = await browser.newPage();
  await page.emulate(KnownDevices['iPhone 13']);
  page.setDefaultTimeout(20000);
  const cdp = await page.createCDPSession();
  await cdp.send('Browser.setDownloadBehavior', {
    behavior: 'allow',
    downloadPath: path.resolve(outDir),
    eventsEnabled: true,
  });

  step(`open ${portal}/enroll`);
  await page.goto(`${portal}/enroll`, { waitUntil: 'load' });
  // A button, or a link styled as one (the SSO choices are links).
  const [button] = await page.$$(
    `xpath/.//*[self::button or self::a][contains(., ${JSON.stringify(buttonText)})]`,
  );
  if (!button) throw new Error(`no button "${buttonText}" on the portal`);
  // The style sheet applies only if the Content-Security-Policy lets it (by its hash).
  const buttonColor = await button.evaluate((b) => getComputedStyle(b).backgroundColor);
  step(`press "${buttonText}"`);
  await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), button.tap()]);

  step(`sign in at ${new URL(page.url()).origin} as ${user}`);
  await page.type('input[name=login]', user);
  await page.type('input[name=password]', password);
  await Promise.all([
    page.waitForNavigation({ waitUntil: 'load' }),
    page.click('button[type=submit], input[type=submit]'),
  ]);
  // A consent screen, if the provider shows one.
  if (!page.url().startsWith(portal) && (await page.$('button[type=submit]'))) {
    step('consent');
    await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), page.click('button[type=submit]')]);
  }
  if (!page.url().startsWith(`${portal}/enroll`)) {
    throw new Error(`expected to be back at the portal, at ${page.url()}: ${await page.content()}`);
  }
  const shown = await page.$eval('body', (b) => b.innerText);

  step('press "Download enrollment profile"');
  const downloaded = new Promise((resolve, reject) => {
    cdp.on('Browser.downloadProgress', (e) => {
      if (e.state === 'completed') resolve(e.filePath);
      if (e.state === 'canceled') reject(new Error('download canceled'));
    });
  });
  await page.tap('#download');
  const file = await Promise.race([
    downloaded,
    new Promise((_, reject) => setTimeout(() => reject(new Error('no download within 20 s')), 20000)),
  ]);
  const profile = file || fs.readdirSync(outDir).map((f) => path.join(outDir, f))[0];
  console.log(JSON.stringify({ shown, profile, buttonColor }));
} finally {
  await browser.close();
}
