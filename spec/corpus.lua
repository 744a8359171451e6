-- The image corpus of the reading specs, built with qemu-img/qemu-io 7.2 in
-- a folder the caller owns (helpers.tmpdir), plus the oracle-side helpers
-- those specs share: guest bytes of a region through qemu-img, map records,
-- file fingerprints for read-only proofs.
--
-- Every builder takes the folder and returns the path of the image it made
-- (chains return a table of paths). Images stay small (a few MiB of file)
-- whatever their virtual size.
local h = require("helpers")

local M = {}

local KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
M.KiB, M.MiB, M.GiB, M.TiB = KiB, MiB, GiB, 1024 * GiB

local function join(dir, name) return dir .. "/" .. name end

-- A file of n bytes from /dev/urandom (incompressible data).
function M.random_file(path, n)
  h.must(("head -c %d /dev/urandom > %s"):format(n, h.q(path)))
  return path
end

-- A file of "real" data: text (licences, Lua sources), a slice of an ELF
-- binary, a run of zeros and a run of random bytes. Not a pattern: it
-- compresses unevenly, some clusters not at all.
function M.real_data_file(path)
  h.must(("(cat /usr/share/common-licenses/*; head -c 1048576 %s; head -c 200000 /dev/zero;"
    .. " head -c 131072 /dev/urandom; cat /usr/share/lua/5.4/*.lua) > %s")
    :format(h.q((h.must("command -v qemu-img"):gsub("%s+$", ""))), h.q(path)))
  return path
end

-- The standard guest workload for an image of cluster size cs and virtual
-- size size: aligned and unaligned writes, writes straddling clusters and an
-- L2 table boundary (when the image is large enough), zero writes that keep
-- or drop their host cluster, a zero write on a never-written cluster, a
-- discard, a partial zero write inside data, and a write ending at the last
-- byte of the disk.
function M.workload(cs, size)
  local c = {}
  local function add(fmt, ...) c[#c + 1] = fmt:format(...) end
  add("write -P 0x11 0 %d", 2 * cs)
  add("write -P 0x5a 1000 3000")
  add("write -P 0x22 %d 1500", 3 * cs - 700)
  add("write -P 0x33 %d %d", 4 * cs, 2 * cs)
  add("write -z %d %d", 4 * cs, cs)
  add("write -z -u %d %d", 5 * cs, cs)
  add("write -z %d %d", 6 * cs, cs)
  add("write -P 0x44 %d %d", 7 * cs, cs)
  add("discard %d %d", 7 * cs, cs)
  add("write -z %d 300", cs + 100)
  add("write -P 0x66 %d 5000", size - 5000)
  local l2_span = cs * (cs // 8)
  if l2_span + 1000 < size - 5000 then
    add("write -P 0x77 %d 2000", l2_span - 1000)
  end
  return c
end

-- qemu-img create + the standard workload. opts: qemu-img -o string.
function M.workload_image(dir, name, size, cs, opts)
  local p = join(dir, name)
  local o = "cluster_size=" .. cs
  if opts and opts ~= "" then o = o .. "," .. opts end
  h.create(p, size, o)
  h.qemu_io(p, M.workload(cs, size))
  return p
end

-- v2 (compat=0.10), 64 KiB clusters.
function M.v2(dir)
  return M.workload_image(dir, "v2.qcow2", 8 * MiB, 64 * KiB, "compat=0.10")
end

-- v3 with a given cluster size (512, 4K, 64K, 2M).
local v3_sizes = { [512] = 4 * MiB, [4 * KiB] = 6 * MiB, [64 * KiB] = 8 * MiB, [2 * MiB] = 20 * MiB }
function M.v3(dir, cs)
  cs = cs or 64 * KiB
  return M.workload_image(dir, ("v3-%d.qcow2"):format(cs), v3_sizes[cs] or 8 * MiB, cs, "compat=1.1")
end

-- v3, 64 KiB clusters, refcount_bits 1, 16 or 64.
function M.refcount(dir, bits)
  return M.workload_image(dir, ("refcount-%d.qcow2"):format(bits), 4 * MiB, 64 * KiB,
    "refcount_bits=" .. bits)
end

-- Compressed clusters written by qemu-io (zlib or zstd): patterns (tiny
-- streams packed several to a host cluster), real text, random data (left
-- uncompressed by QEMU), a compressed cluster later partly overwritten
-- (copied out of its stream), and a compressed cluster at the disk's end.
function M.compressed(dir, ctype)
  ctype = ctype or "zlib"
  local p = join(dir, "compressed-" .. ctype .. ".qcow2")
  local rnd = M.random_file(join(dir, "rnd-" .. ctype .. ".bin"), 64 * KiB)
  h.create(p, 2 * MiB, "compression_type=" .. ctype)
  h.qemu_io(p, {
    "write -c -P 0x11 0 64k",
    "write -c -P 0x22 64k 64k",
    "write -c -s " .. rnd .. " 128k 64k",
    "write -c -s /usr/share/common-licenses/GPL-3 192k 64k",
    "write -c -P 0x33 256k 64k",
    "write -P 0x99 260000 50",
    "write -c -s /usr/share/common-licenses/Apache-2.0 512k 64k",
    "write -c -P 0x44 1984k 64k",
  })
  return p
end

-- `qemu-img convert -c` of a raw file of real data (virtual size not a
-- multiple of the cluster size).
function M.converted(dir, ctype, cs)
  ctype, cs = ctype or "zlib", cs or 64 * KiB
  local src = join(dir, "real.bin")
  if not io.open(src, "rb") then M.real_data_file(src) end
  local p = join(dir, ("converted-%s-%d.qcow2"):format(ctype, cs))
  h.qemu_img(("convert -q -c -f raw -O qcow2 -o compression_type=%s,cluster_size=%d %s %s")
    :format(ctype, cs, h.q(src), h.q(p)))
  return p
end

-- Extended L2 (64 KiB clusters, 2 KiB subclusters) with subcluster writes,
-- zero subclusters, partial-subcluster writes and a discard.
function M.extended_l2(dir)
  local p = join(dir, "extl2.qcow2")
  h.create(p, 4 * MiB, "extended_l2=on,cluster_size=64k")
  h.qemu_io(p, {
    "write -P 0x11 4k 2k",
    "write -P 0x12 10240 1000",
    "write -z 128k 8k",
    "write -P 0x22 192k 64k",
    "write -z 256k 64k",
    "write -P 0x33 329000 3000",
    "write -P 0x44 384k 64k",
    "discard 392k 8k",
    "write -z -u 400k 2k",
    "write -P 0x55 4190000 4304",
  })
  return p
end

-- Extended L2 overlay on a qcow2 base full of data: unallocated subclusters
-- inside allocated clusters read through to the base.
function M.extended_l2_overlay(dir)
  local base = join(dir, "extl2-base.qcow2")
  h.create(base, 2 * MiB, "cluster_size=64k")
  h.qemu_io(base, { "write -P 0xb0 0 2M" })
  local top = join(dir, "extl2-top.qcow2")
  h.create(top, 2 * MiB, "extended_l2=on,cluster_size=64k", "extl2-base.qcow2", "qcow2")
  h.qemu_io(top, {
    "write -P 0x11 4k 2k",
    "write -z 70k 4k",
    "write -P 0x22 200000 5000",
    "discard 512k 64k",
    "write -z 640k 64k",
  })
  return { top = top, base = base }
end

-- raw <- qcow2 (4 KiB clusters) <- qcow2 (64 KiB clusters). Names stored
-- relative; the mid layer's backing format is raw.
function M.chain(dir)
  local base = M.random_file(join(dir, "chain-base.raw"), 4 * MiB)
  local mid = join(dir, "chain-mid.qcow2")
  h.create(mid, 4 * MiB, "cluster_size=4k", "chain-base.raw", "raw")
  h.qemu_io(mid, {
    "write -P 0x21 0 64k",
    "write -P 0x22 70000 10000",
    "write -z 256k 64k",
    "write -P 0x23 1M 1M",
    "discard 1536k 64k",
  })
  local top = join(dir, "chain-top.qcow2")
  h.create(top, 4 * MiB, "cluster_size=64k", "chain-mid.qcow2", "qcow2")
  h.qemu_io(top, {
    "write -P 0x31 4k 4k",
    "write -P 0x32 300000 70000",
    "write -z 2M 64k",
    "write -z -u 2176k 64k",
    "write -P 0x33 4128768 65536",
    "discard 1024k 64k",
  })
  return { top = top, mid = mid, base = base }
end

-- Overlays on backing files shorter than themselves: a 1 MiB qcow2 base
-- under a 4 MiB overlay (with a write straddling the base's end), and a raw
-- base whose size is not a multiple of 512.
function M.short_backing(dir)
  local base = join(dir, "short-base.qcow2")
  h.create(base, 1 * MiB, "cluster_size=64k")
  h.qemu_io(base, { "write -P 0xbb 0 1M" })
  local top = join(dir, "short-top.qcow2")
  h.create(top, 4 * MiB, "cluster_size=64k", "short-base.qcow2", "qcow2")
  h.qemu_io(top, { "write -P 0x55 1047576 2000", "write -P 0x56 100 100" })
  local rbase = M.random_file(join(dir, "short-base.raw"), 1000000)
  local rtop = join(dir, "short-rawtop.qcow2")
  h.create(rtop, 2 * MiB, "cluster_size=4k", "short-base.raw", "raw")
  h.qemu_io(rtop, { "write -P 0x57 4096 4096", "write -P 0x58 999000 3000" })
  return { top = top, base = base, rtop = rtop, rbase = rbase }
end

-- Internal snapshots with data changed between them (overwrite, zero,
-- discard, new data), a resize between snapshots, and a name with spaces.
-- Returns the path and the snapshot names in creation order.
function M.snapshots(dir)
  local p = join(dir, "snap.qcow2")
  h.create(p, 4 * MiB, "cluster_size=64k")
  h.qemu_io(p, { "write -P 0x01 0 1M", "write -P 0x02 2M 512k" })
  h.qemu_img("snapshot -c first " .. h.q(p))
  h.qemu_io(p, { "write -P 0x11 64k 100000", "write -z 2M 64k", "discard 2176k 64k",
    "write -P 0x12 3M 64k" })
  h.qemu_img("snapshot -c 'second one' " .. h.q(p))
  h.qemu_img("resize -q " .. h.q(p) .. " 6M")
  h.qemu_io(p, { "write -P 0x21 0 4k", "write -P 0x22 5M 300k", "discard 3M 64k" })
  h.qemu_img("snapshot -c third " .. h.q(p))
  h.qemu_io(p, { "write -P 0x31 6100k 4k", "write -z 0 64k" })
  return p, { "first", "second one", "third" }
end

-- A lazy-refcount image left dirty by a writer killed mid-session.
function M.lazy_dirty(dir)
  local p = join(dir, "lazy.qcow2")
  h.create(p, 4 * MiB, "lazy_refcounts=on,cluster_size=64k")
  h.qemu_io(p, { "write -P 0x10 0 128k", "write -P 0x11 2M 64k" })
  h.qemu_img("snapshot -c before " .. h.q(p))
  local cmd = ("ulimit -c 0; qemu-io -f qcow2 -c %s -c %s -c %s -c abort %s")
    :format(h.q("write -P 0x42 64k 64k"), h.q("write -P 0x43 1M 4k"), h.q("write -z 2M 64k"), h.q(p))
  h.sh(cmd) -- abort: non-zero exit by design
  local info = h.info_json(p)
  assert(info["dirty-flag"] == true, "corpus: lazy image is not dirty after abort")
  return p
end

-- A 1 TiB image written near its end, in the middle and across an L2 table
-- boundary (64 KiB clusters: one L2 table covers 512 MiB). Returns the path
-- and the written regions ({offset, length}).
function M.huge(dir)
  local p = join(dir, "huge.qcow2")
  local T = M.TiB
  h.create(p, T, "cluster_size=64k")
  local regions = {
    { T - 64 * KiB, 64 * KiB },
    { T - 1000, 1000 },
    { T // 2 + 12345, 6000 },
    { 512 * MiB - 3000, 6000 },
    { 7 * GiB + 1, 1 },
  }
  h.qemu_io(p, {
    ("write -P 0x71 %d %d"):format(T - 64 * KiB, 64 * KiB),
    ("write -P 0x72 %d %d"):format(T - 1000, 1000),
    ("write -P 0x73 %d %d"):format(T // 2 + 12345, 6000),
    ("write -P 0x74 %d %d"):format(512 * MiB - 3000, 6000),
    ("write -P 0x75 %d 1"):format(7 * GiB + 1),
    ("write -z %d 64k"):format(300 * GiB),
  })
  return p, regions
end

-- The v3 workload image with an internal snapshot taken half-way, then
-- poked: incompatible feature bit 1 (corrupt) set.
local function workload_with_snapshot(dir, name)
  local p = join(dir, name)
  h.create(p, 4 * MiB, "cluster_size=64k")
  local w = M.workload(64 * KiB, 4 * MiB)
  local half = #w // 2
  h.qemu_io(p, { table.unpack(w, 1, half) })
  h.qemu_img("snapshot -c before " .. h.q(p))
  h.qemu_io(p, { table.unpack(w, half + 1) })
  return p
end

function M.corrupt_bit(dir)
  local p = workload_with_snapshot(dir, "corrupt.qcow2")
  local v = h.get_be64(p, 72)
  h.poke(p, 72, h.be64(v | 2))
  return p
end

-- Unknown autoclear bit 5 set (autoclear_features at 88..95 = 0x20).
function M.unknown_autoclear(dir)
  local p = workload_with_snapshot(dir, "autoclear.qcow2")
  h.poke(p, 88, h.be64(0x20))
  return p
end

-- The small single images (whole-disk comparisons): {name=, build=fn(dir)}.
-- Listed at spec definition time, built at run time.
M.small_kinds = {}
local function kind(name, build) M.small_kinds[#M.small_kinds + 1] = { name = name, build = build } end
kind("a v2 (compat=0.10) image", function(d) return M.v2(d) end)
for _, cs in ipairs({ 512, 4 * KiB, 64 * KiB, 2 * MiB }) do
  kind(("a v3 image with %d-byte clusters"):format(cs), function(d) return M.v3(d, cs) end)
end
for _, bits in ipairs({ 1, 16, 64 }) do
  kind(("an image with %d-bit refcounts"):format(bits), function(d) return M.refcount(d, bits) end)
end
kind("an image with zlib-compressed clusters", function(d) return M.compressed(d, "zlib") end)
kind("an image with zstd-compressed clusters", function(d) return M.compressed(d, "zstd") end)
kind("a zlib image made by qemu-img convert -c of real data",
  function(d) return M.converted(d, "zlib", 64 * KiB) end)
kind("a zstd image with 4K clusters made by qemu-img convert -c",
  function(d) return M.converted(d, "zstd", 4 * KiB) end)
kind("a zlib image with 512-byte clusters made by qemu-img convert -c",
  function(d) return M.converted(d, "zlib", 512) end)
kind("an extended-L2 image with subcluster writes", function(d) return M.extended_l2(d) end)
kind("a lazy-refcount image left dirty by a killed writer", function(d) return M.lazy_dirty(d) end)
kind("an image with the corrupt bit set", function(d) return M.corrupt_bit(d) end)
kind("an image with an unknown autoclear bit", function(d) return M.unknown_autoclear(d) end)

-- Build every small kind into dir: array of {name=, path=}.
function M.small_images(dir)
  local list = {}
  for i, k in ipairs(M.small_kinds) do list[i] = { name = k.name, path = k.build(dir) } end
  return list
end

-- ---------------------------------------------------------------------------
-- Oracle side.

-- Guest bytes [offset, offset+length) through qemu-img (the raw driver's
-- offset/size window over the qcow2 node; it wants 512-byte multiples, so a
-- wider aligned window is fetched and cut).
function M.region_bytes(path, offset, length, snapshot)
  local lo = offset // 512 * 512
  local hi = (offset + length + 511) // 512 * 512
  local out = path .. ".region.raw"
  local opts = ("driver=raw,offset=%d,size=%d,file.driver=qcow2,file.file.filename=%s")
    :format(lo, hi - lo, path)
  if snapshot then error("region_bytes: snapshots not supported") end
  h.qemu_img("convert -q -O raw --image-opts " .. h.q(opts) .. " " .. h.q(out))
  local data = h.read_file(out)
  os.remove(out)
  return data:sub(offset - lo + 1, offset - lo + length)
end

-- qemu-img map as a list of plain records with exactly the keys qemu-img
-- prints (absent offset stays absent).
local map_keys = { "start", "length", "depth", "present", "zero", "data", "offset" }
function M.records(list)
  local out = {}
  for i, e in ipairs(list) do
    local r = {}
    for _, k in ipairs(map_keys) do
      local v = e[k]
      if type(v) == "number" then v = math.tointeger(v) or v end
      r[k] = v
    end
    out[i] = r
  end
  return out
end

function M.qemu_map(path, extra)
  return M.records(h.map_json(path, extra))
end

-- Decode a to_json() string from the library the same way.
function M.decode_map(json)
  return M.records(h.json.decode(json))
end

-- A map with QEMU's "data and zero" hole split folded back into plain
-- data (and re-merged): for comparing two files whose host blocks differ
-- (a cp copy), where QEMU's metadata-preallocation guess differs too.
function M.without_hole_split(records)
  local out = {}
  for _, r in ipairs(records) do
    local c = {}
    for k, v in pairs(r) do c[k] = v end
    if c.data then c.zero = false end
    local p = out[#out]
    if p and p.data == c.data and p.zero == c.zero and p.present == c.present
       and p.depth == c.depth and p.start + p.length == c.start
       and ((p.offset == nil and c.offset == nil)
            or (p.offset and c.offset and p.offset + p.length == c.offset)) then
      p.length = p.length + c.length
    else
      out[#out + 1] = c
    end
  end
  return out
end

-- sha256 of a string (spec/helpers.lua's, kept here for corpus users).
M.sha256 = h.sha256

-- Fingerprint of a file for read-only proofs: content hash, size, and
-- modification and change times with nanoseconds.
function M.fingerprint(path)
  return {
    sha256 = h.sha256_file(path),
    stat = h.must("stat -c '%s %y %z' " .. h.q(path)),
  }
end

-- A few offsets/lengths that straddle clusters and L2 tables for an image
-- of cluster size cs and virtual size size (each range inside the disk).
function M.odd_ranges(cs, size)
  local l2_span = cs * (cs // 8)
  local r = {
    { 0, 1 }, { 1, 1 }, { 511, 2 }, { 999, 3002 },
    { cs - 1, 2 }, { cs - 100, 2 * cs + 200 }, { 3 * cs - 701, 1502 },
    { 5 * cs - 3, cs + 7 }, { 7 * cs + 13, 17 },
    { size - 1, 1 }, { size - 5001, 5001 }, { size - 3 * cs - 17, 3 * cs + 17 },
  }
  if l2_span + 1000 < size then
    r[#r + 1] = { l2_span - 1001, 2002 }
    r[#r + 1] = { l2_span - cs - 1, 2 * cs + 2 }
  end
  local out = {}
  for _, x in ipairs(r) do
    if x[1] >= 0 and x[2] > 0 and x[1] + x[2] <= size then out[#out + 1] = x end
  end
  return out
end

-- Raise a short error (not two multi-MiB strings) when bytes differ: the
-- first differing offset and a few bytes either side, in hex.
local function hex(s) return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end)) end
function M.assert_bytes(actual, expected, what, base)
  base = base or 0
  if actual == expected then return true end
  if type(actual) ~= "string" then
    error(("%s: expected %d bytes, got %s"):format(what, #expected, tostring(actual)), 2)
  end
  local n = math.min(#actual, #expected)
  local i = 1
  local step = 4096
  while i <= n and actual:sub(i, i + step - 1) == expected:sub(i, i + step - 1) do i = i + step end
  while i <= n and actual:byte(i) == expected:byte(i) do i = i + 1 end
  error(("%s: %d bytes read, %d expected; first difference at guest offset %d: got %s, want %s")
    :format(what, #actual, #expected, base + i - 1, hex(actual:sub(i, i + 15)),
      hex(expected:sub(i, i + 15))), 2)
end

-- Cluster size and virtual size as qemu-img reports them.
function M.geometry(path)
  local info = h.info_json(path)
  return math.tointeger(info["cluster-size"]), math.tointeger(info["virtual-size"])
end

-- The guest disk with backing files ignored (unallocated reads as zeroes),
-- through qemu-img with backing=null.
function M.json_spec(path, backing_null)
  local spec = { driver = "qcow2", file = { driver = "file", filename = path } }
  local s = h.json.encode(spec)
  if backing_null then s = s:sub(1, -2) .. ',"backing":null}' end
  return "json:" .. s
end
function M.raw_bytes_no_backing(path)
  local out = path .. ".nobacking.raw"
  h.qemu_img("convert -q -O raw " .. h.q(M.json_spec(path, true)) .. " " .. h.q(out))
  local data = h.read_file(out)
  os.remove(out)
  return data
end
function M.qemu_map_no_backing(path)
  return M.records(h.json.decode(h.qemu_img("map --output=json " .. h.q(M.json_spec(path, true)))))
end

-- Snapshot rows of `qemu-img snapshot -l` (lines after the column header).
function M.snapshot_rows(path)
  local rows, seen = {}, false
  for line in h.qemu_img("snapshot -l " .. h.q(path)):gmatch("[^\n]+") do
    if seen then rows[#rows + 1] = line end
    if line:match("^ID%s+TAG") then seen = true end
  end
  return rows
end

-- Physical size of a file as qemu-img's actual-size: st_blocks * 512.
function M.allocated_size(path)
  return math.tointeger(tonumber((h.must("stat -c %b " .. h.q(path)):gsub("%s+$", ""))) * 512)
end


-- A copy of the image with snapshot `name` applied by `qemu-img snapshot
-- -a` (which, unlike convert -l, also restores the snapshot's disk size):
-- the oracle for a snapshot view's size, bytes and map.
local applied_n = 0
function M.snapshot_applied(path, name)
  applied_n = applied_n + 1
  local copy = ("%s.applied-%d.qcow2"):format(path, applied_n)
  h.must("cp " .. h.q(path) .. " " .. h.q(copy)) -- keeps the file's holes, as qemu-img map sees them
  h.qemu_img("snapshot -a " .. h.q(name) .. " " .. h.q(copy))
  return copy
end

return M
