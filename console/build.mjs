// Build the console into the Rust crate's assets (src/console/assets/), which the server compiles in:
// `npm ci && npm run build` from console/. The built files are committed, so `cargo build` needs no npm.
import { build } from "esbuild";
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
/** The inputs of the build (tests/python/test_console.py checks the committed bundle against them). */
const SOURCES = ["build.mjs", "licenses/MIT-fancy-canvas.txt", "package-lock.json", "package.json", "src/index.html", "src/main.ts", "src/style.css"];
const sha256 = (path) => createHash("sha256").update(readFileSync(path)).digest("hex");
const out = join(here, "..", "src", "console", "assets");
mkdirSync(out, { recursive: true });

await build({
  entryPoints: [join(here, "src", "main.ts")],
  bundle: true,
  minify: true,
  format: "iife",
  target: ["es2020"],
  legalComments: "none", // collected in licenses.txt below
  outfile: join(out, "console.js"),
});
copyFileSync(join(here, "src", "index.html"), join(out, "index.html"));
copyFileSync(join(here, "src", "style.css"), join(out, "console.css"));

// The licenses of what the bundle contains.
const pkg = (name) => JSON.parse(readFileSync(join(here, "node_modules", name, "package.json"), "utf8"));
const lwc = pkg("lightweight-charts"), fc = pkg("fancy-canvas");
const mit = readFileSync(join(here, "licenses", "MIT-fancy-canvas.txt"), "utf8");
const text = [
  "The mkts web console bundles these packages (console/package-lock.json pins them).",
  "",
  `== lightweight-charts ${lwc.version} (${lwc.license})`,
  "TradingView Lightweight Charts(TM), Copyright (c) TradingView, Inc. https://www.tradingview.com/",
  "It incorporates parts of tslib ((c) Microsoft Corporation), under the BSD Zero Clause License.",
  "",
  readFileSync(join(here, "node_modules", "lightweight-charts", "LICENSE"), "utf8").trim(),
  "",
  `== fancy-canvas ${fc.version} (${fc.license}; the package ships no license file: the text below is the MIT license its package.json names)`,
  "",
  mit.trim(),
  "",
].join("\n");
writeFileSync(join(out, "licenses.txt"), text);
// What the bundle was built from, so a test can tell a stale bundle (sources changed, not rebuilt).
writeFileSync(join(out, "sources.sha256"), SOURCES.map((f) => `${sha256(join(here, f))}  console/${f}\n`).join(""));
console.log(`built ${out}`);
