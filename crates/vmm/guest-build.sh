#!/bin/sh
# Reassembles the guest programs into the bytes the crate embeds.
# Needs GNU as and objcopy (binutils). The test `guest_program_matches_source`
# runs the same two commands and compares.
set -eu
cd "$(dirname "$0")/src/guest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for name in program prefault; do
    as --64 -o "$tmp/$name.o" "$name.S"
    objcopy -O binary -j .text "$tmp/$name.o" "$name.bin"
    echo "wrote $(wc -c < "$name.bin") bytes to src/guest/$name.bin"
done
