#!/usr/bin/env node
// Installs what webtune needs before `npm start` / `npm test` run: on Debian/Ubuntu as root the
// system packages (Chromium with its SwiftShader WebGPU driver, Mesa's lavapipe, the Vulkan
// loader), then pnpm at the version package.json pins, then the workspace's dependencies.
// Idempotent and quick when everything is present. Plain Node, no dependencies.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const say = (msg) => console.log(`[setup] ${msg}`);

function fail(msg) {
  console.error(`[setup] ${msg}`);
  process.exit(1);
}

const [major, minor] = process.versions.node.split('.').map(Number);
if (major < 20 || (major === 20 && minor < 19))
  fail(`Node ${process.versions.node} is too old: webtune needs Node 20.19 or newer.`);

// --- system packages --------------------------------------------------------------------------
const needs = [
  { pkg: 'chromium', present: ['/usr/bin/chromium', '/usr/lib/chromium/vk_swiftshader_icd.json'] },
  {
    pkg: 'mesa-vulkan-drivers',
    present: ['/usr/share/vulkan/icd.d/lvp_icd.x86_64.json', '/usr/share/vulkan/icd.d/lvp_icd.aarch64.json'],
    any: true,
  },
  {
    pkg: 'libvulkan1',
    present: ['/usr/lib/x86_64-linux-gnu/libvulkan.so.1', '/usr/lib/aarch64-linux-gnu/libvulkan.so.1'],
    any: true,
  },
];
const missing = needs
  .filter((n) => (n.any ? !n.present.some(existsSync) : !n.present.every(existsSync)))
  .map((n) => n.pkg);
if (missing.length > 0 && process.platform === 'linux') {
  const hasApt = existsSync('/usr/bin/apt-get');
  const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
  if (hasApt && isRoot) {
    say(`installing system packages: ${missing.join(' ')}`);
    const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
    const update = spawnSync('apt-get', ['update'], { stdio: 'inherit', env });
    const install = spawnSync('apt-get', ['install', '-y', '--no-install-recommends', ...missing], {
      stdio: 'inherit',
      env,
    });
    if (update.status !== 0 || install.status !== 0) fail(`apt-get could not install ${missing.join(' ')}`);
  } else {
    const how = hasApt
      ? `sudo apt-get install -y ${missing.join(' ')}`
      : `install ${missing.join(', ')} with your package manager`;
    console.warn(
      `[setup] missing system packages: ${missing.join(' ')}. The tests need Chromium (for WebGPU in the browser and` +
        ` its SwiftShader driver under Node) and Mesa's lavapipe. Run: ${how}` +
        (process.env.WEBTUNE_CHROMIUM ? '' : ' (or set WEBTUNE_CHROMIUM to a Chromium binary)'),
    );
  }
} else if (missing.length > 0) {
  say(`not Linux: skipping system packages; set WEBTUNE_CHROMIUM to your Chrome/Chromium if tests cannot find it`);
}

// --- Mesa 25 lavapipe for Node (shader-f16, subgroups) ---------------------------------------
// Unpacked under .cache/, nothing installed (tools/lavapipe25.sh): the test project
// 'node-lavapipe-f16' runs the kernel tests on it, the only adapter here with shader-f16.
const lavapipe25 = join(root, '.cache', 'lavapipe25');
const debianApt = existsSync('/usr/bin/apt-get') && existsSync('/usr/share/keyrings/debian-archive-keyring.gpg');
if (process.env.WEBTUNE_SKIP_LAVAPIPE25) {
  say('WEBTUNE_SKIP_LAVAPIPE25 is set: the node-lavapipe-f16 tests will not run');
} else if (process.platform === 'linux' && debianApt && !existsSync(join(lavapipe25, '.done'))) {
  say('unpacking Mesa 25 lavapipe (bookworm-backports) into .cache/lavapipe25');
  const r = spawnSync('bash', [join(root, 'tools', 'lavapipe25.sh'), lavapipe25], { stdio: 'inherit' });
  // Optional: without it the node-lavapipe-f16 project is left out (vitest.config.ts), not failed.
  if (r.status !== 0)
    console.warn(
      '[setup] tools/lavapipe25.sh failed (it needs the Debian mirror): the node-lavapipe-f16 tests will not run',
    );
}

// --- pnpm -------------------------------------------------------------------------------------
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
const wanted = String(pkg.packageManager).replace(/^pnpm@/, '');
function pnpmVersion() {
  try {
    return execFileSync('pnpm', ['--version'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return undefined;
  }
}
let have = pnpmVersion();
if (have !== wanted) {
  say(`installing pnpm ${wanted} (found ${have ?? 'none'})`);
  const r = spawnSync('npm', ['install', '-g', `pnpm@${wanted}`], { stdio: 'inherit' });
  have = pnpmVersion();
  if (r.status !== 0 || !have)
    fail(`could not install pnpm ${wanted}: run \`npm install -g pnpm@${wanted}\` (may need sudo)`);
}

// --- dependencies -----------------------------------------------------------------------------
const install = spawnSync('pnpm', ['install', '--frozen-lockfile', '--reporter=silent'], {
  cwd: root,
  stdio: 'inherit',
});
if (install.status !== 0) fail('pnpm install failed');
