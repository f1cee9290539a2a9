#!/usr/bin/env node
// A stand-in for the native `solc` binary, backed by the npm `solc` package (solc-js).
// It answers `--version` and `--standard-json` (reading the input JSON from stdin) and
// writes only the compiler's JSON to stdout, so py-solc-x and forge can drive it.
// Imports resolve against --base-path / --include-path / --allow-paths, the current
// directory and node_modules/ (devnet/node_modules beside this file first).
"use strict";
const fs = require("fs");
const path = require("path");

const devnetModules = path.resolve(__dirname, "..", "devnet", "node_modules");
const solc = require(require.resolve("solc", { paths: [devnetModules, process.cwd()] }));

const args = process.argv.slice(2);
if (args.includes("--version")) {
  process.stdout.write(`solc, the solidity compiler commandline interface\nVersion: ${solc.version()}\n`);
  process.exit(0);
}

const roots = [];
for (let i = 0; i < args.length; i++) {
  if (["--base-path", "--include-path", "--allow-paths"].includes(args[i]) && args[i + 1]) {
    for (const p of args[i + 1].split(",")) roots.push(path.resolve(p));
    i++;
  }
}
roots.push(process.cwd(), devnetModules, path.resolve(process.cwd(), "node_modules"));

function findImports(importPath) {
  for (const root of roots) {
    const candidate = path.resolve(root, importPath);
    if (fs.existsSync(candidate)) return { contents: fs.readFileSync(candidate, "utf8") };
  }
  return { error: `File not found: ${importPath} (searched ${roots.join(", ")})` };
}

if (!args.includes("--standard-json")) {
  process.stderr.write("solc-shim: only --version and --standard-json are supported\n");
  process.exit(2);
}
const input = fs.readFileSync(0, "utf8");
process.stdout.write(solc.compile(input, { import: findImports }));
