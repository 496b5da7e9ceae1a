#!/bin/sh
# Reassembles the guest program into the bytes the crate embeds.
# Needs GNU as and objcopy (binutils). The test `guest_program_matches_source`
# runs the same two commands and compares.
set -eu
cd "$(dirname "$0")/src/guest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
as --64 -o "$tmp/program.o" program.S
objcopy -O binary -j .text "$tmp/program.o" program.bin
echo "wrote $(wc -c < program.bin) bytes to src/guest/program.bin"
