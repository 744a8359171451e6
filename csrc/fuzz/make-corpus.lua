-- Seed corpus of the libFuzzer harnesses: small qemu-img images (and one
-- VM-state snapshot written by this library) covering versions, cluster
-- sizes, refcount widths, compression, extended L2, snapshots, bitmaps,
-- backing and data-file names, dirty and corrupt bits. Generated into the
-- build folder, never committed.
-- Usage: lua5.4 csrc/fuzz/make-corpus.lua OUTDIR
-- (LUA_PATH/LUA_CPATH as the Makefile sets them: spec/helpers, the module).
-- The seeds are shared; each harness grows its own corpus folder beside.
local h = require("helpers")
local qcow2 = require("qcow2")

local out = arg[1]
assert(out, "usage: make-corpus.lua OUTDIR")
local MAX_LEN = tonumber(os.getenv("FUZZ_MAX_LEN")) or 1048576
local KiB, MiB = 1024, 1024 * 1024

local work = h.tmpdir()
local images = {}       -- name -> path, in build order
local order = {}

local function path_of(name) return work .. "/" .. name .. ".qcow2" end
local function add(name) images[name] = path_of(name); order[#order + 1] = name end

-- qemu-img create, qemu-io commands, optional qemu-img commands after.
local function image(name, size, opts, cmds, backing)
  local p = path_of(name)
  h.create(p, size, opts, backing, backing and "qcow2" or nil)
  if cmds and #cmds > 0 then h.qemu_io(p, cmds) end
  add(name)
  return p
end

-- A short workload scaled by the cluster size cs.
local function workload(cs, size)
  return {
    ("write -P 0x11 0 %d"):format(2 * cs),
    ("write -P 0x22 %d 700"):format(3 * cs - 300),
    ("write -z %d %d"):format(cs, cs),
    ("write -z -u %d %d"):format(4 * cs, cs),
    ("write -P 0x33 %d %d"):format(5 * cs, cs),
    ("discard %d %d"):format(5 * cs, cs),
    ("write -P 0x44 %d 512"):format(size - 512),
  }
end

-- Versions and cluster sizes.
image("v2-64k", 1 * MiB, "compat=0.10,cluster_size=64k", workload(64 * KiB, 1 * MiB))
image("v2-512", 256 * KiB, "compat=0.10,cluster_size=512", workload(512, 256 * KiB))
for _, cs in ipairs({ 512, 1024, 4096, 16384, 65536 }) do
  image("v3-" .. cs, 16 * cs, "cluster_size=" .. cs, workload(cs, 16 * cs))
end
image("empty", 64 * MiB, "cluster_size=64k")
image("large-virtual", 1024 * 1024 * MiB, "cluster_size=64k",
  { "write -P 0x55 0 4k", "write -P 0x56 1000G 4k" })

-- Refcount widths.
for _, bits in ipairs({ 1, 2, 4, 8, 32, 64 }) do
  image("refcount-" .. bits, 64 * KiB, "cluster_size=4k,refcount_bits=" .. bits,
    workload(4096, 64 * KiB))
end

-- Compressed clusters.
for _, ctype in ipairs({ "zlib", "zstd" }) do
  image("compressed-" .. ctype, 256 * KiB, "cluster_size=4k,compression_type=" .. ctype, {
    "write -c -P 0x11 0 4k", "write -c -P 0x22 4k 4k",
    "write -c -s /usr/share/common-licenses/GPL-3 8k 4k",
    "write -P 0x33 10000 100", "write -c -P 0x44 252k 4k",
  })
end

-- Extended L2 (subclusters).
image("extl2-16k", 512 * KiB, "extended_l2=on,cluster_size=16k", {
  "write -P 0x11 512 512", "write -z 16k 4k", "write -P 0x22 32k 16k",
  "discard 36k 1k", "write -z -u 64k 512", "write -P 0x33 100000 3000",
})

-- Internal snapshots, with changes between them.
local snap = image("snapshots", 128 * KiB, "cluster_size=4k",
  { "write -P 0x01 0 16k", "write -P 0x02 64k 8k" })
h.qemu_img("snapshot -c first " .. h.q(snap))
h.qemu_io(snap, { "write -P 0x11 4k 5000", "write -z 64k 4k", "discard 68k 4k" })
h.qemu_img("snapshot -c second " .. h.q(snap))
h.qemu_img("resize -q " .. h.q(snap) .. " 192K")
h.qemu_io(snap, { "write -P 0x21 160k 4k" })

-- A snapshot with VM state (qemu-img cannot save one; this library can).
do
  local p = path_of("vmstate")
  local img = assert(qcow2.create(p, { size = 64 * KiB, cluster_size = 4096 }))
  assert(img:write(0, ("\x5a"):rep(8192)))
  assert(img:create_snapshot("vm", { vm_state = ("state"):rep(1000), vm_clock = 12345 }))
  assert(img:write(4096, ("\x6b"):rep(100)))
  img:close()
  add("vmstate")
end

-- Persistent bitmaps: one that tracked writes, one disabled, empty.
local bm = image("bitmaps", 256 * KiB, "cluster_size=4k")
h.qemu_img("bitmap --add -g 4k " .. h.q(bm) .. " tracked")
h.qemu_img("bitmap --add --disable " .. h.q(bm) .. " off")
h.qemu_io(bm, { "write -P 0x77 8k 12k", "write -P 0x78 200k 1k" })

-- Lazy refcounts: clean, and left dirty by a writer that aborted.
image("lazy", 128 * KiB, "cluster_size=4k,lazy_refcounts=on", workload(4096, 128 * KiB))
do
  local p = image("dirty", 128 * KiB, "cluster_size=4k,lazy_refcounts=on",
    { "write -P 0x10 0 8k" })
  h.sh(("ulimit -c 0; qemu-io -f qcow2 -c %s -c %s -c abort %s")
    :format(h.q("write -P 0x42 16k 8k"), h.q("write -z 32k 4k"), h.q(p)))
end

-- Names the harnesses must not follow: a backing file, an external data
-- file (relative names, in the work folder only).
image("backing-base", 64 * KiB, "cluster_size=4k", { "write -P 0x99 0 64k" })
image("overlay", 64 * KiB, "cluster_size=4k", { "write -P 0x98 4k 4k" },
  "backing-base.qcow2")
image("data-file", 64 * KiB, "cluster_size=4k,data_file=" .. work .. "/data.raw",
  { "write -P 0x97 0 8k" })

-- Flag bits set by hand: corrupt, an unknown autoclear bit.
do
  local p = image("corrupt-bit", 64 * KiB, "cluster_size=4k", workload(4096, 64 * KiB))
  h.poke(p, 72, h.be64(h.get_be64(p, 72) | 2))
  p = image("autoclear", 64 * KiB, "cluster_size=4k", workload(4096, 64 * KiB))
  h.poke(p, 88, h.be64(0x20))
end

-- Copy every image small enough (libFuzzer's -max_len) into OUTDIR.
local kept = 0
h.must("mkdir -p " .. h.q(out))
for _, name in ipairs(order) do
  local f = assert(io.open(images[name], "rb"))
  local size = f:seek("end")
  f:close()
  if size <= MAX_LEN then
    h.must(("cp %s %s"):format(h.q(images[name]), h.q(out .. "/" .. name .. ".qcow2")))
    kept = kept + 1
  else
    io.stderr:write(("make-corpus: %s is %d bytes, over %d: left out\n"):format(name, size, MAX_LEN))
  end
end
h.cleanup()
print(("make-corpus: %d seed images in %s"):format(kept, out))
