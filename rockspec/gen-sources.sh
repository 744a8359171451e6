#!/bin/sh
# Rewrites the qcow2.core source list of the rockspec from csrc/ (run after
# adding or removing a C file; spec/build_spec.lua fails until you do).
set -eu
cd "$(dirname "$0")/.."
list=$(ls csrc/engine/*.c csrc/lua/*.c | sed 's/.*/            "&",/')
awk -v list="$list" '
  /-- @SOURCES@/ { print; print list; skip = 1; next }
  skip && /^ *"csrc\// { next }
  { skip = 0; print }
' rockspec/lua-qcow2-scm-1.rockspec > rockspec/.tmp && mv rockspec/.tmp rockspec/lua-qcow2-scm-1.rockspec
