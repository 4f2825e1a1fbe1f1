#!/usr/bin/env bash
# Writes the seed corpora of the fuzz targets from the golden frames in spec/vectors/:
#   frame_decoder  [split u16][limit 0][frame]  for each vector, split in its middle, plus one
#                  stream of every request and one of every reply, split unevenly;
#   request_body   [opcode u16][body]           for each *.request.hex;
#   response_body  [opcode u16][0][body]        for each *.response.hex.
# The seeds are committed (corpus/*/seed-*); rerun this when the vectors change.
set -euo pipefail
cd "$(dirname "$0")"
vectors=../../spec/vectors

# Hex digits of a vector file: comments ("#" to end of line) and whitespace removed.
hex_of() { sed -e 's/#.*//' "$1" | tr -d ' \t\r\n'; }
# Hex on stdin to bytes on stdout (perl is in every Debian base system; xxd is not).
unhex() { perl -e 'local $/; my $h = <STDIN>; print pack("H*", $h)'; }
# A number as 2 bytes of hex, big-endian.
u16() { printf '%04x' "$(($1 % 65536))"; }

for target in frame_decoder request_body response_body; do
  mkdir -p "corpus/$target"
  rm -f "corpus/$target"/seed-*
done

requests='' replies=''
for file in "$vectors"/*.hex; do
  name=$(basename "$file" .hex)
  hex=$(hex_of "$file")
  bytes=$((${#hex} / 2))
  opcode=${hex:12:4}  # after the 4-byte length, version and flags
  body=${hex:24}      # after the length and the 8-byte header
  printf '%s%s00%s' "$(u16 $((bytes / 2)))" '' "$hex" | unhex >"corpus/frame_decoder/seed-$name"
  case "$name" in
    *.request) printf '%s%s' "$opcode" "$body" | unhex >"corpus/request_body/seed-$name"
               requests+=$hex ;;
    *.response) printf '%s00%s' "$opcode" "$body" | unhex >"corpus/response_body/seed-$name"
                replies+=$hex ;;
  esac
done
printf '%s00%s' "$(u16 37)" "$requests" | unhex >corpus/frame_decoder/seed-stream.requests
printf '%s00%s' "$(u16 1001)" "$replies" | unhex >corpus/frame_decoder/seed-stream.responses
du -sh corpus/*
