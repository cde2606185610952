#!/usr/bin/env node
// Tokenizes .concept files with the engine VS Code uses (vscode-textmate on vscode-oniguruma's
// WebAssembly build of Oniguruma) and the grammar in editors/vscode/syntaxes/, and prints every
// token with its scopes. tests/test_textmate.py compares the output with tests/textmate/golden/.
//
//   node tests/textmate/tokenize.mjs FILE...           one line per token (the golden format)
//   node tests/textmate/tokenize.mjs --json FILE...    a JSON array, one object per file
//
// The golden format, per token: `LINE:COL "TEXT" SCOPE SCOPE ...`, LINE and COL from 1, COL
// counted in UTF-16 code units as VS Code counts them, TEXT as a JSON string, the scopes
// outermost first. Lines are split as VS Code splits them (CRLF, LF or CR) and a leading byte
// order mark is dropped, as VS Code drops it. A file that is not valid UTF-8 is reported on
// stderr and skipped (exit status 1): VS Code would not show it as this text.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

import oniguruma from "vscode-oniguruma";
import vsctm from "vscode-textmate";

const here = path.dirname(fileURLToPath(import.meta.url));
const GRAMMAR = path.resolve(here, "../../editors/vscode/syntaxes/perfusion.tmLanguage.json");
const SCOPE = "source.perfusion";

async function loadGrammar() {
  const require = createRequire(import.meta.url);
  const wasm = readFileSync(require.resolve("vscode-oniguruma/release/onig.wasm"));
  await oniguruma.loadWASM(wasm.buffer.slice(wasm.byteOffset, wasm.byteOffset + wasm.byteLength));
  const registry = new vsctm.Registry({
    onigLib: Promise.resolve({
      createOnigScanner: (sources) => new oniguruma.OnigScanner(sources),
      createOnigString: (text) => new oniguruma.OnigString(text),
    }),
    loadGrammar: async (scopeName) =>
      scopeName === SCOPE ? vsctm.parseRawGrammar(readFileSync(GRAMMAR, "utf8"), GRAMMAR) : null,
  });
  const grammar = await registry.loadGrammar(SCOPE);
  if (!grammar) throw new Error(`cannot load ${GRAMMAR}`);
  return grammar;
}

function tokenize(grammar, text) {
  const tokens = [];
  let state = vsctm.INITIAL;
  const lines = text.replace(/^\uFEFF/, "").split(/\r\n|\r|\n/);
  lines.forEach((line, i) => {
    const result = grammar.tokenizeLine(line, state);
    for (const token of result.tokens) {
      const piece = line.slice(token.startIndex, token.endIndex);
      if (piece === "") continue; // the engine's token for an empty line
      tokens.push({ line: i + 1, col: token.startIndex + 1, text: piece, scopes: token.scopes });
    }
    state = result.ruleStack;
  });
  return tokens;
}

function golden(tokens) {
  return tokens
    .map((t) => `${t.line}:${t.col} ${JSON.stringify(t.text)} ${t.scopes.join(" ")}\n`)
    .join("");
}

async function main(argv) {
  const json = argv[0] === "--json";
  const files = json ? argv.slice(1) : argv;
  if (files.length === 0) {
    process.stderr.write("usage: node tokenize.mjs [--json] FILE...\n");
    return 2;
  }
  const grammar = await loadGrammar();
  const decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
  const results = [];
  let status = 0;
  for (const file of files) {
    let text;
    try {
      text = decoder.decode(readFileSync(file));
    } catch (error) {
      if (!(error instanceof TypeError)) throw error;
      process.stderr.write(`${file}: not valid UTF-8; skipped\n`);
      status = 1;
      continue;
    }
    const tokens = tokenize(grammar, text);
    if (json) results.push({ file, tokens, golden: golden(tokens) });
    else process.stdout.write(golden(tokens));
  }
  if (json) process.stdout.write(JSON.stringify(results) + "\n");
  return status;
}

process.exitCode = await main(process.argv.slice(2));
