-- A catalogue of hostile qcow2 images: each case starts from an image made
-- by qemu-img/qemu-io (a "base"), applies byte pokes whose offsets are read
-- from the image itself (header fields, the L1 table, L2 entries, the
-- snapshot table), and states the outcome the library must give.
--
-- Case fields:
--   name    what the poke does (the busted test name)
--   base    key into M.bases (an image maker, built once, copied per case)
--   poke    function(path, dir) -> optional other path to open
--   expect  one of (see M.verify):
--     {stage = "open", code =, msg =, control =}
--                                            qcow2.open fails; with control
--                                            (open options) it then opens
--     {stage = "read", offset =, length =, code =, msg =, good =, map =,
--      zero_ok =}                            open may fail with the same
--                                            code/msg; otherwise reading the
--                                            bad guest range fails (twice,
--                                            and straddled), "good" ranges
--                                            still read their bytes; map of
--                                            the range gives it as "corrupt"
--                                            extents naming the field when
--                                            map is "corrupt"; zero_ok also accepts
--                                            all-zero data
--     {stage = "snapshot", code =, msg =}    open, img:snapshots(), s:open()
--                                            or a read/map of the view fails
--     {stage = "damaged", code =, msg =}     a table the active disk does not
--                                            need is damaged where QEMU still
--                                            opens the image: a read-only
--                                            open works, info().damage names
--                                            the field, the disk reads its
--                                            bytes; a read-write open fails
--   code is a code string or a list of acceptable ones; msg is a Lua
--   pattern or a list of alternatives, one of which the message must match.
local helpers = require("helpers")

local M = {}

M.CODES = {
  io = true, nospace = true, notfound = true, exists = true, invalid = true,
  corrupt = true, unsupported = true, readonly = true, key = true,
  nomem = true, busy = true,
}

-- ---------------------------------------------------------------------------
-- Reading the layout from the image itself (docs/qcow2-format.md 1-5)

M.FIELDS = {
  magic = { 0, 4 }, version = { 4, 4 }, backing_file_offset = { 8, 8 },
  backing_file_size = { 16, 4 }, cluster_bits = { 20, 4 }, size = { 24, 8 },
  crypt_method = { 32, 4 }, l1_size = { 36, 4 }, l1_table_offset = { 40, 8 },
  refcount_table_offset = { 48, 8 }, refcount_table_clusters = { 56, 4 },
  nb_snapshots = { 60, 4 }, snapshots_offset = { 64, 8 },
  incompatible_features = { 72, 8 }, compatible_features = { 80, 8 },
  autoclear_features = { 88, 8 }, refcount_order = { 96, 4 },
  header_length = { 100, 4 }, compression_type = { 104, 1 },
}

local L1E_OFFSET_MASK = 0x00fffffffffffe00
local L2E_OFFSET_MASK = 0x00fffffffffffe00
local COPIED = 1 << 63
local COMPRESSED = 1 << 62

M.EXT_END = 0x00000000
M.EXT_BACKING_FORMAT = 0xE2792ACA
M.EXT_FEATURE_TABLE = 0x6803F857
M.EXT_BITMAPS = 0x23852875
M.EXT_CRYPTO = 0x0537BE77

local function file_size(path)
  local f = assert(io.open(path, "rb"))
  local n = f:seek("end")
  f:close()
  return n
end
M.file_size = file_size

local function getn(path, off, n)
  return (string.unpack(">I" .. n, helpers.peek(path, off, n)))
end

function M.header(path)
  local h = {}
  local version = getn(path, 4, 4)
  for name, f in pairs(M.FIELDS) do
    if f[1] < 72 or version >= 3 then h[name] = getn(path, f[1], f[2]) end
  end
  h.cluster_size = 1 << h.cluster_bits
  if version < 3 then h.header_length = 72; h.incompatible_features = 0 end
  h.extended_l2 = (h.incompatible_features & 0x10) ~= 0
  return h
end

function M.set(path, field, value)
  local f = assert(M.FIELDS[field], field)
  helpers.poke(path, f[1], string.pack(">I" .. f[2], value))
end

local function align_up(v, a) return (v + a - 1) // a * a end

-- A cluster-aligned host offset well past the end of the file.
function M.past_eof(path, clusters)
  local h = M.header(path)
  return align_up(file_size(path), h.cluster_size) + (clusters or 64) * h.cluster_size
end

function M.l1_entry_offset(path, l1_index)
  local h = M.header(path)
  assert(l1_index < h.l1_size, "L1 index out of the table")
  return h.l1_table_offset + 8 * l1_index
end

-- Host offset of the L2 entry (word 0) mapping guest_off, and its size.
function M.l2_entry_offset(path, guest_off)
  local h = M.header(path)
  local esz = h.extended_l2 and 16 or 8
  local entries = h.cluster_size // esz
  local gc = guest_off >> h.cluster_bits
  local l1e = getn(path, M.l1_entry_offset(path, gc // entries), 8)
  local l2 = l1e & L1E_OFFSET_MASK
  assert(l2 ~= 0, ("no L2 table maps guest 0x%x"):format(guest_off))
  return l2 + esz * (gc % entries), esz
end

function M.get64(path, off) return getn(path, off, 8) end
function M.put64(path, off, v) helpers.poke(path, off, helpers.be64(v)) end

function M.l2_entry(path, guest_off) return M.get64(path, (M.l2_entry_offset(path, guest_off))) end

-- Host offset of the data cluster of a standard L2 entry.
function M.data_offset(path, guest_off)
  local off = M.l2_entry(path, guest_off) & L2E_OFFSET_MASK
  assert(off ~= 0, "guest cluster not allocated")
  return off
end

-- Compressed descriptor (3.4): coffset, csize, x.
function M.compressed(path, guest_off)
  local h = M.header(path)
  local e = M.l2_entry(path, guest_off)
  assert(e & COMPRESSED ~= 0, "not a compressed cluster")
  local x = 70 - h.cluster_bits
  local coffset = e & ((1 << x) - 1)
  local nsectors = ((e >> x) & ((1 << (h.cluster_bits - 8)) - 1)) + 1
  return coffset, nsectors * 512 - (coffset & 511), x
end

-- Header extensions: {magic=, length=, offset= (of the 8-byte ext header)}.
function M.extensions(path)
  local h = M.header(path)
  local at = h.header_length
  local stop = h.backing_file_offset ~= 0 and h.backing_file_offset or h.cluster_size
  local list = {}
  while at + 8 <= stop do
    local magic, len = getn(path, at, 4), getn(path, at + 4, 4)
    if magic == M.EXT_END then break end
    list[#list + 1] = { magic = magic, length = len, offset = at }
    at = at + 8 + align_up(len, 8)
  end
  return list
end

-- Offset of the end-of-extensions marker (after the last extension).
function M.extensions_end(path)
  local last = M.extensions(path)
  last = last[#last]
  if not last then return M.header(path).header_length end
  return last.offset + 8 + align_up(last.length, 8)
end

function M.find_extension(path, magic)
  for _, e in ipairs(M.extensions(path)) do
    if e.magic == magic then return e end
  end
  error(("extension 0x%08x not found"):format(magic))
end

-- Snapshot table entries (5.1) with the offsets of their fields.
function M.snapshots(path)
  local h = M.header(path)
  local at = h.snapshots_offset
  local list = {}
  for i = 1, h.nb_snapshots do
    local s = {
      offset = at,
      l1_table_offset = getn(path, at, 8), l1_size = getn(path, at + 8, 4),
      id_len = getn(path, at + 12, 2), name_len = getn(path, at + 14, 2),
      extra = getn(path, at + 36, 4),
    }
    s.length = 40 + s.extra + s.id_len + s.name_len
    list[i] = s
    at = at + align_up(s.length, 8)
  end
  return list
end

-- Rewrite the backing file name in place (same length keeps the layout).
function M.set_backing_name(path, name)
  local h = M.header(path)
  assert(h.backing_file_offset ~= 0, "image has no backing file")
  assert(#name == h.backing_file_size, "same-length names only")
  helpers.poke(path, h.backing_file_offset, name)
end

-- ---------------------------------------------------------------------------
-- Base images (qemu-img / qemu-io)

local q = helpers.q

local function create(path, size, opts, backing)
  helpers.create(path, size, opts, backing)
end
local function qio(path, cmds) helpers.qemu_io(path, cmds) end

-- Every base is 1 GiB with 64 KiB clusters unless said: L1 has 2 entries, so
-- guest 0 and guest 512M live in different L2 tables.
M.G512 = 512 * 1024 * 1024
M.NOISE = helpers.random_bytes(8192, 4242)
M.bases = {
  v3 = function(dir)
    local p = dir .. "/v3.qcow2"
    create(p, "1G")
    qio(p, { "write -P 0xa1 0 64k", "write -P 0xa2 64k 64k", "write -P 0xa3 512M 64k" })
    return p
  end,
  v2 = function(dir)
    local p = dir .. "/v2.qcow2"
    create(p, "1G", "compat=0.10")
    qio(p, { "write -P 0xa1 0 64k", "write -P 0xa2 64k 64k", "write -P 0xa3 512M 64k" })
    return p
  end,
  zlib = function(dir)
    local p = dir .. "/zlib.qcow2"
    create(p, "1G")
    qio(p, { "write -c -P 0xc1 0 64k", "write -c -P 0xc2 64k 64k", "write -P 0xa3 512M 64k" })
    return p
  end,
  zstd = function(dir)
    local p = dir .. "/zstd.qcow2"
    create(p, "1G", "compression_type=zstd")
    qio(p, { "write -c -P 0xc1 0 64k", "write -c -P 0xc2 64k 64k", "write -P 0xa3 512M 64k" })
    return p
  end,
  -- the snapshot table is the last thing in the file
  snap = function(dir)
    local p = dir .. "/snap.qcow2"
    create(p, "1G")
    qio(p, { "write -P 0xa1 0 64k", "write -P 0xa3 512M 64k" })
    helpers.qemu_img("snapshot -c s1 " .. q(p))
    return p
  end,
  -- base.qcow2 <- ov.qcow2; the overlay is what gets opened
  backing = function(dir)
    local b, p = dir .. "/base.qcow2", dir .. "/ov.qcow2"
    create(b, "1G")
    qio(b, { "write -P 0xd1 0 64k" })
    create(p, "1G", nil, "base.qcow2")
    qio(p, { "write -P 0xd2 64k 64k" })
    return p
  end,
  -- extended L2: one L1 entry covers 256 MiB, L1 has 4 entries
  extl2 = function(dir)
    local p = dir .. "/extl2.qcow2"
    create(p, "1G", "extended_l2=on")
    qio(p, { "write -P 0xe1 0 64k", "write -P 0xe2 128k 2k", "write -c -P 0xe3 256k 64k",
             "write -P 0xe4 512M 64k" })
    return p
  end,
  extl2_16k = function(dir)
    local p = dir .. "/extl2s.qcow2"
    create(p, "1M", "extended_l2=on,cluster_size=16384")
    qio(p, { "write -P 0xe1 0 16k" })
    return p
  end,
  -- guest 0: a compressed cluster whose stream spans many sectors (8 KiB of
  -- noise), guest 64K: a one-sector compressed pattern
  zrand = function(dir)
    local raw, p = dir .. "/zrand.raw", dir .. "/zrand.qcow2"
    helpers.write_file(raw, M.NOISE .. ("\0"):rep(65536 - #M.NOISE) .. ("\0"):rep(65536))
    helpers.qemu_img("convert -c -O qcow2 " .. q(raw) .. " " .. q(p))
    os.remove(raw)
    qio(p, { "write -c -P 0xc2 64k 64k" })
    return p
  end,
  -- 512-byte clusters: the compressed offset field reaches bit 60
  c512 = function(dir)
    local p = dir .. "/c512.qcow2"
    create(p, "1M", "cluster_size=512")
    qio(p, { "write -c -P 0xc1 0 512", "write -c -P 0xc2 512 512", "write -P 0xa3 64k 512" })
    return p
  end,
}

-- What each pristine base reads (guest offset, length, byte): the controls.
M.base_contents = {
  v3 = { { 0, 65536, 0xa1 }, { 65536, 65536, 0xa2 }, { M.G512, 65536, 0xa3 }, { 131072, 65536, 0 } },
  v2 = { { 0, 65536, 0xa1 }, { 65536, 65536, 0xa2 }, { M.G512, 65536, 0xa3 } },
  zlib = { { 0, 65536, 0xc1 }, { 65536, 65536, 0xc2 }, { M.G512, 65536, 0xa3 } },
  zstd = { { 0, 65536, 0xc1 }, { 65536, 65536, 0xc2 }, { M.G512, 65536, 0xa3 } },
  snap = { { 0, 65536, 0xa1 }, { M.G512, 65536, 0xa3 } },
  backing = { { 0, 65536, 0xd1 }, { 65536, 65536, 0xd2 }, { 131072, 65536, 0 } },
  extl2 = { { 0, 65536, 0xe1 }, { 131072, 2048, 0xe2 }, { 133120, 2048, 0 },
            { 262144, 65536, 0xe3 }, { M.G512, 65536, 0xe4 } },
  extl2_16k = { { 0, 16384, 0xe1 } },
  zrand = { { 0, 8192, M.NOISE }, { 8192, 65536 - 8192, 0 }, { 65536, 65536, 0xc2 } },
  c512 = { { 0, 512, 0xc1 }, { 512, 512, 0xc2 }, { 65536, 512, 0xa3 } },
}

local cache_dir
local built = {}
-- A fresh copy of a base in its own folder: returns the image path, folder.
function M.instance(kind)
  if not cache_dir then cache_dir = helpers.tmpdir() end
  if not built[kind] then
    local d = cache_dir .. "/" .. kind
    helpers.must("mkdir -p " .. q(d))
    local p = assert(M.bases[kind], "no base " .. kind)(d)
    built[kind] = p:match("[^/]+$")
  end
  local dir = helpers.tmpdir()
  helpers.must("cp -a " .. q(cache_dir .. "/" .. kind) .. "/. " .. q(dir))
  return dir .. "/" .. built[kind], dir
end

-- ---------------------------------------------------------------------------
-- Message patterns (tolerant of wording, specific to the field)

local P = {
  l1 = { "[Ll]1" },
  l2 = { "[Ll]2" },
  l1l2 = { "[Ll]1", "[Ll]2" },
  reftable = { "[Rr]efcount.?table", "[Rr]eftable", "[Rr]eference.?count.?table" },
  snapshot = { "[Ss]napshot" },
  backing = { "[Bb]acking" },
  compression = { "[Cc]ompression" },
  -- a data cluster or compressed stream that is not in the file
  data_eof = { "[Ll]2", "[Dd]ata cluster", "[Ee]nd of.*file", "EOF", "past",
               "beyond", "outside", "[Tt]runcat" },
  compressed = { "[Cc]ompress", "[Ii]nflate", "zlib", "zstd", "[Dd]eflate" },
}
M.P = P

-- ---------------------------------------------------------------------------
-- The cases

local cases = {}
local function case(name, base, poke, expect)
  cases[#cases + 1] = { name = name, base = base, poke = poke, expect = expect }
end
local function open_fails(code, msg) return { stage = "open", code = code, msg = msg } end
local function snapshot_fails(msg) return { stage = "snapshot", code = "corrupt", msg = msg } end
-- qemu-img opens these (verified with qemu-img info 7.2): read-only works
local function damaged(msg, good)
  return { stage = "damaged", code = "corrupt", msg = msg, good = good }
end
local function read_fails(offset, length, msg, good, map, extra)
  local e = { stage = "read", code = "corrupt", offset = offset, length = length,
              msg = msg, good = good or {}, map = map or "any" }
  for k, v in pairs(extra or {}) do e[k] = v end
  return e
end
local function setter(field, value)
  return function(p) M.set(p, field, type(value) == "function" and value(p) or value) end
end

local G = M.G512
local GOOD_V3 = { { 0, 65536, 0xa1 }, { 65536, 65536, 0xa2 } }

-- 1. Header fields ---------------------------------------------------------
case("bad magic", "v3", setter("magic", 0x514649FA),
  open_fails("invalid", { "[Mm]agic", "not .*qcow2" }))
case("version 1", "v3", setter("version", 1), open_fails("unsupported", { "[Vv]ersion" }))
case("version 4", "v3", setter("version", 4), open_fails("unsupported", { "[Vv]ersion" }))
case("cluster_bits 8 (below the 512-byte minimum)", "v3", setter("cluster_bits", 8),
  open_fails("corrupt", { "[Cc]luster.?bits", "[Cc]luster size" }))
-- the spec allows > 2 MiB clusters, QEMU does not implement them
case("cluster_bits 22 (4 MiB clusters)", "v3", setter("cluster_bits", 22),
  open_fails({ "unsupported", "corrupt" }, { "[Cc]luster.?bits", "[Cc]luster size" }))
case("cluster_bits 0xffffffff", "v3", setter("cluster_bits", 0xffffffff),
  open_fails({ "corrupt", "unsupported" }, { "[Cc]luster.?bits", "[Cc]luster size" }))
case("v3 header_length 100 (< 104)", "v3", setter("header_length", 100),
  open_fails("corrupt", { "[Hh]eader.?length", "[Hh]eader.*short" }))
case("v3 header_length larger than a cluster", "v3",
  setter("header_length", function(p) return M.header(p).cluster_size + 8 end),
  open_fails("corrupt", { "[Hh]eader.?length", "[Hh]eader.*exceed", "[Hh]eader.*cluster" }))
case("backing_file_offset past cluster 0", "backing",
  setter("backing_file_offset", function(p) return 2 * M.header(p).cluster_size end),
  open_fails("corrupt", P.backing))
case("backing_file_size 1024 (> 1023)", "backing", setter("backing_file_size", 1024),
  open_fails("corrupt", P.backing))
case("backing file name running past cluster 0", "backing", function(p)
  M.set(p, "backing_file_offset", M.header(p).cluster_size - 4)
  M.set(p, "backing_file_size", 100)
end, open_fails("corrupt", P.backing))
case("unknown incompatible feature bit 5", "v3", setter("incompatible_features", 1 << 5),
  open_fails("unsupported", { "[Ii]ncompatible", "[Ff]eature" }))
case("unknown incompatible bit 5 named in the feature-name table", "v3", function(p)
  local e = M.find_extension(p, M.EXT_FEATURE_TABLE)
  local n = e.length // 48
  assert(n >= 1, "empty feature table")
  -- overwrite the last record (an autoclear bit) with one naming bit 5
  local rec = string.char(0, 5) .. ("hostile feature x"):rep(1) .. ("\0"):rep(46 - 17)
  helpers.poke(p, e.offset + 8 + (n - 1) * 48, rec)
  M.set(p, "incompatible_features", 1 << 5)
end, open_fails("unsupported", { "hostile feature x" }))
case("refcount_order 7 (128-bit refcounts)", "v3", setter("refcount_order", 7),
  open_fails("corrupt", { "[Rr]efcount.?order", "[Rr]efcount.?bits", "[Rr]efcount.*width",
                      "[Rr]eference.?count.*width" }))
case("refcount_table_clusters 0", "v3", setter("refcount_table_clusters", 0),
  open_fails("corrupt", P.reftable))
case("refcount_table_clusters huge (> 8 MiB table)", "v3",
  setter("refcount_table_clusters", 0x10000000), open_fails("corrupt", P.reftable))
case("refcount_table_offset not cluster aligned", "v3",
  setter("refcount_table_offset", function(p) return M.header(p).refcount_table_offset + 512 end),
  open_fails("corrupt", P.reftable))
case("refcount_table_offset past end of file", "v3",
  setter("refcount_table_offset", function(p) return M.past_eof(p) end),
  damaged(P.reftable))
case("refcount_table_offset 0 (over the header)", "v3", setter("refcount_table_offset", 0),
  damaged(P.reftable))
case("refcount_table_offset near 2^64 (offset + size overflows)", "v3",
  setter("refcount_table_offset", -65536), open_fails("corrupt", P.reftable))
case("l1_size huge (> 32 MiB of entries)", "v3", setter("l1_size", 32 * 1024 * 1024 // 8 + 1),
  open_fails("corrupt", P.l1))
case("l1_size too small for the virtual size", "v3",
  setter("l1_size", function(p) return M.header(p).l1_size - 1 end), open_fails("corrupt", P.l1))
case("l1_table_offset not cluster aligned", "v3",
  setter("l1_table_offset", function(p) return M.header(p).l1_table_offset + 512 end),
  open_fails("corrupt", P.l1))
case("l1_table_offset past end of file", "v3",
  setter("l1_table_offset", function(p) return M.past_eof(p) end), open_fails("corrupt", P.l1))
case("l1_table_offset 0 (over the header)", "v3", setter("l1_table_offset", 0),
  open_fails("corrupt", P.l1))
case("l1_table_offset overlapping the refcount table", "v3",
  setter("l1_table_offset", function(p) return M.header(p).refcount_table_offset end),
  -- the L1 entries are now refcount table entries: no byte is known good
  damaged(P.l1, {}))
case("l1_table_offset near 2^64 (offset + size overflows)", "v3",
  setter("l1_table_offset", -65536), open_fails("corrupt", P.l1))
case("virtual size 2^62 (the L1 cannot cover it)", "v3", setter("size", 1 << 62),
  open_fails("corrupt", { "[Ll]1", "[Ss]ize", "[Tt]oo big" }))
case("nb_snapshots huge", "snap", setter("nb_snapshots", 0x7fffffff),
  open_fails("corrupt", P.snapshot))
case("snapshots_offset not cluster aligned", "snap",
  setter("snapshots_offset", function(p) return M.header(p).snapshots_offset + 8 end),
  open_fails("corrupt", P.snapshot))
case("snapshots_offset past end of file", "snap",
  setter("snapshots_offset", function(p) return M.past_eof(p) end),
  damaged(P.snapshot))
case("snapshots_offset 0 (over the header)", "snap", setter("snapshots_offset", 0),
  damaged(P.snapshot))
case("crypt_method 3", "v3", setter("crypt_method", 3),
  open_fails({ "unsupported", "corrupt" }, { "[Cc]rypt" }))
case("header extension length running past cluster 0", "v3", function(p)
  local e = M.extensions(p)[1]
  helpers.poke(p, e.offset + 4, helpers.be32(M.header(p).cluster_size))
end, open_fails("corrupt", { "[Ee]xtension" }))
case("backing-format extension of 16 bytes", "backing", function(p)
  local h = M.header(p)
  local at = h.header_length
  local fmt = "qcow2qcow2qcow2!"
  local name = "base.qcow2"
  local name_at = at + 8 + #fmt + 8
  helpers.poke(p, at, helpers.be32(M.EXT_BACKING_FORMAT) .. helpers.be32(#fmt) .. fmt
    .. ("\0"):rep(8) .. name)
  M.set(p, "backing_file_offset", name_at)
  M.set(p, "backing_file_size", #name)
end, open_fails("corrupt", { "[Ff]ormat" }))
case("bitmaps extension not 24 bytes", "v3", function(p)
  helpers.poke(p, M.find_extension(p, M.EXT_FEATURE_TABLE).offset, helpers.be32(M.EXT_BITMAPS))
end, open_fails("corrupt", { "[Bb]itmap" }))
case("full-disk-encryption extension without LUKS", "v3", function(p)
  helpers.poke(p, M.find_extension(p, M.EXT_FEATURE_TABLE).offset, helpers.be32(M.EXT_CRYPTO))
end, open_fails("corrupt", { "[Cc]rypt", "FDE", "[Ff]ull.disk" }))
case("compression_type 1 without incompatible bit 3", "v3", setter("compression_type", 1),
  open_fails("corrupt", P.compression))
case("incompatible bit 3 with compression_type 0", "v3", setter("incompatible_features", 1 << 3),
  open_fails("corrupt", P.compression))
case("compression_type 2", "v3", function(p)
  M.set(p, "compression_type", 2)
  M.set(p, "incompatible_features", 1 << 3)
end, open_fails("unsupported", P.compression))
case("extended L2 with 256-byte subclusters (8 KiB clusters)", "extl2_16k",
  setter("cluster_bits", 13),
  open_fails("corrupt", { "[Ee]xtended", "[Ss]ubcluster", "[Cc]luster.?bits", "[Cc]luster size" }))

-- 2. Truncated files ---------------------------------------------------------
case("truncated mid-header", "v3", function(p) helpers.truncate(p, 50) end,
  open_fails("corrupt", { "[Hh]eader", "[Tt]runcat", "short", "[Ee]nd of.*file" }))
case("truncated mid-L1 table", "v3", function(p)
  helpers.truncate(p, M.header(p).l1_table_offset + 8)
end, open_fails("corrupt", P.l1))
case("truncated mid-L2 table", "v3", function(p)
  local l2 = M.get64(p, M.l1_entry_offset(p, 1)) & L1E_OFFSET_MASK
  assert(M.data_offset(p, 65536) < l2, "layout")
  helpers.truncate(p, l2 + 512)
end, read_fails(G, 65536, P.data_eof, GOOD_V3))
case("truncated before the last data cluster", "v3", function(p)
  local d = M.data_offset(p, G)
  for _, g in ipairs({ 0, 65536 }) do assert(M.data_offset(p, g) < d, "layout") end
  assert(M.l2_entry_offset(p, G) < d, "layout")
  helpers.truncate(p, d)
end, read_fails(G, 65536, P.data_eof, GOOD_V3))

-- 3. L1 entries (L1[1] maps guest 512M; L1[0] stays good) --------------------
local function poke_l1(fn)
  return function(p)
    local off = M.l1_entry_offset(p, 1)
    M.put64(p, off, fn(M.get64(p, off), p))
  end
end
case("L1 entry with reserved bit 57 set", "v3", poke_l1(function(e) return e | (1 << 57) end),
  read_fails(G, 65536, P.l1, GOOD_V3, "corrupt"))
case("L1 entry with low reserved bit 0 set", "v3", poke_l1(function(e) return e | 1 end),
  read_fails(G, 65536, P.l1l2, GOOD_V3, "corrupt"))
case("L1 entry not cluster aligned", "v3", poke_l1(function(e) return e + 512 end),
  read_fails(G, 65536, P.l1l2, GOOD_V3, "corrupt"))
case("L1 entry pointing past end of file", "v3",
  poke_l1(function(_, p) return COPIED | M.past_eof(p) end),
  read_fails(G, 65536, P.l1l2, GOOD_V3, "corrupt"))
-- offset 0 means "no L2 table"; with COPIED set the entry contradicts itself.
-- Acceptable: corrupt, or zeroes (the unallocated reading); never header bytes.
case("L1 entry pointing at cluster 0 (COPIED, offset 0)", "v3", poke_l1(function() return COPIED end),
  read_fails(G, 65536, P.l1, GOOD_V3, "any", { zero_ok = true }))

-- 4. L2 entries (guest 512M's entry; guest 0 and 64K stay good) -------------
local function poke_l2(g, fn)
  return function(p)
    local off = M.l2_entry_offset(p, g)
    M.put64(p, off, fn(M.get64(p, off), p))
  end
end
case("L2 entry with reserved bit 56 set", "v3", poke_l2(G, function(e) return e | (1 << 56) end),
  read_fails(G, 65536, P.l2, GOOD_V3, "corrupt"))
case("L2 entry with low reserved bit 1 set", "v3", poke_l2(G, function(e) return e | 2 end),
  read_fails(G, 65536, P.l2, GOOD_V3, "corrupt"))
case("L2 entry not cluster aligned", "v3", poke_l2(G, function(e) return e + 512 end),
  read_fails(G, 65536, { "[Ll]2", "align" }, GOOD_V3, "corrupt"))
case("L2 entry pointing past end of file", "v3",
  poke_l2(G, function(_, p) return COPIED | M.past_eof(p) end),
  read_fails(G, 65536, P.data_eof, GOOD_V3))
case("L2 entry pointing at 2^55 (far past end of file)", "v3",
  poke_l2(G, function() return COPIED | (1 << 55) end),
  read_fails(G, 65536, P.data_eof, GOOD_V3))
case("L2 zero flag in a v2 image", "v2", poke_l2(G, function(e) return e | 1 end),
  read_fails(G, 65536, { "[Ll]2", "[Zz]ero" }, GOOD_V3, "corrupt"))

-- 5. Compressed clusters (guest 0 compressed; 64K compressed; 512M plain) ----
local GOOD_Z = { { 65536, 65536, 0xc2 }, { G, 65536, 0xa3 } }
case("compressed descriptor pointing past end of file", "zlib", function(p)
  local off = M.l2_entry_offset(p, 0)
  local _, _, x = M.compressed(p, 0)
  local e = M.get64(p, off)
  M.put64(p, off, (e & ~((1 << x) - 1)) | M.past_eof(p))
end, read_fails(0, 65536, { P.data_eof, P.compressed }, GOOD_Z))
case("compressed deflate stream that is garbage", "zlib", function(p)
  helpers.poke(p, (M.compressed(p, 0)), ("\255"):rep(16))
end, read_fails(0, 65536, P.compressed, GOOD_Z))
case("compressed deflate stream that inflates to 10 bytes", "zlib", function(p)
  -- a final stored block of 10 bytes: far less than a cluster
  helpers.poke(p, (M.compressed(p, 0)), "\1\10\0\245\255" .. ("Z"):rep(10))
end, read_fails(0, 65536, P.compressed, GOOD_Z))
case("compressed zstd stream that is garbage", "zstd", function(p)
  helpers.poke(p, (M.compressed(p, 0)), ("\255"):rep(16))
end, read_fails(0, 65536, P.compressed, GOOD_Z))

-- 6. Backing chains -------------------------------------------------------
case("self-backing image (backing name is its own file name)", "backing", function(p, dir)
  -- ov.qcow2 names base.qcow2; copy it to a same-length name naming itself
  local self = dir .. "/self.qcow2"
  helpers.copy(p, self)
  local h = M.header(self)
  helpers.poke(self, h.backing_file_offset, "self.qcow2")
  M.set(self, "backing_file_size", #"self.qcow2")
  return self
end, { stage = "open", code = "corrupt", msg = { "[Ll]oop", "[Cc]ycle", "itself", "[Bb]acking" },
       control = { backing = false } })
case("backing loop A -> B -> A", "backing", function(p, dir)
  local a, b = dir .. "/aaaa.qcow2", dir .. "/bbbb.qcow2"
  helpers.copy(p, a)
  helpers.copy(p, b)
  for _, pair in ipairs({ { a, "bbbb.qcow2" }, { b, "aaaa.qcow2" } }) do
    helpers.poke(pair[1], M.header(pair[1]).backing_file_offset, pair[2])
    M.set(pair[1], "backing_file_size", #pair[2])
  end
  return a
end, { stage = "open", code = "corrupt", msg = { "[Ll]oop", "[Cc]ycle", "[Bb]acking" },
       control = { backing = false } })
case("backing chain 17 deep", "v3", function(_, dir)
  local prev = "c00.qcow2"
  create(dir .. "/" .. prev, "1M")
  for i = 1, 17 do
    local name = ("c%02d.qcow2"):format(i)
    create(dir .. "/" .. name, "1M", nil, prev)
    prev = name
  end
  return dir .. "/" .. prev
end, { stage = "open", code = "unsupported",
       msg = { "[Dd]epth", "[Dd]eep", "[Cc]hain", "[Bb]acking" }, control = { backing = false } })
case("backing file name json:{...}", "backing", function(p)
  local h = M.header(p)
  local name = 'json:{"file.filename":"/etc/passwd"}'
  helpers.poke(p, h.backing_file_offset, name)
  M.set(p, "backing_file_size", #name)
end, { stage = "open", code = "unsupported", msg = { "json", "[Bb]acking" },
       control = { backing = false } })
case("backing file name nbd://", "backing", function(p)
  local h = M.header(p)
  local name = "nbd://127.0.0.1:1/x"
  helpers.poke(p, h.backing_file_offset, name)
  M.set(p, "backing_file_size", #name)
end, { stage = "open", code = "unsupported", msg = { "nbd", "[Pp]rotocol", "[Bb]acking" },
       control = { backing = false } })
case("backing file missing", "backing", function(p)
  M.set_backing_name(p, "gone.qcow2")
end, { stage = "open", code = "notfound", msg = { "gone%.qcow2" }, control = { backing = false } })

-- 7. Snapshot table entries ------------------------------------------------
local function poke_snap(fn)
  return function(p)
    local s = assert(M.snapshots(p)[1], "no snapshot")
    fn(p, s)
  end
end
case("snapshot L1 table offset not cluster aligned", "snap", poke_snap(function(p, s)
  M.put64(p, s.offset, s.l1_table_offset + 512)
end), snapshot_fails({ "[Ll]1", "[Ss]napshot" }))
case("snapshot L1 table past end of file", "snap", poke_snap(function(p, s)
  M.put64(p, s.offset, M.past_eof(p))
end), snapshot_fails({ "[Ll]1", "[Ss]napshot" }))
case("snapshot L1 table at offset 0 (over the header)", "snap", poke_snap(function(p, s)
  M.put64(p, s.offset, 0)
end), snapshot_fails({ "[Ll]1", "[Ss]napshot" }))
case("snapshot l1_size huge", "snap", poke_snap(function(p, s)
  helpers.poke(p, s.offset + 8, helpers.be32(0x7fffffff))
end), snapshot_fails({ "[Ll]1", "[Ss]napshot" }))
case("snapshot extra_data_size 65536 (> 1024)", "snap", poke_snap(function(p, s)
  helpers.poke(p, s.offset + 36, helpers.be32(65536))
end), snapshot_fails({ "[Ss]napshot", "[Ee]xtra" }))
case("snapshot id length running past the table", "snap", poke_snap(function(p, s)
  assert(s.offset + s.length + 0xffff > file_size(p), "layout: table not last")
  helpers.poke(p, s.offset + 12, helpers.be16(0xffff))
end), damaged(P.snapshot))
case("snapshot name length running past the table", "snap", poke_snap(function(p, s)
  assert(s.offset + s.length + 0xffff > file_size(p), "layout: table not last")
  helpers.poke(p, s.offset + 14, helpers.be16(0xffff))
end), damaged(P.snapshot))
case("nb_snapshots one more than the table holds", "snap", function(p)
  M.set(p, "nb_snapshots", M.header(p).nb_snapshots + 1)
end, damaged(P.snapshot))

-- 8. Extended L2 bitmaps (guest 0 full, 128K one subcluster, 256K compressed) -
local function poke_bitmap(g, fn)
  return function(p)
    local off = M.l2_entry_offset(p, g)
    M.put64(p, off + 8, fn(M.get64(p, off + 8), M.get64(p, off)))
  end
end
local GOOD_E = { { 0, 65536, 0xe1 }, { G, 65536, 0xe4 } }
local GOOD_E0 = { { G, 65536, 0xe4 } }
case("extended L2: subcluster both allocated and zero", "extl2",
  poke_bitmap(0, function(bm) return bm | (1 << 32) end),
  read_fails(0, 65536, { "[Ll]2", "[Ss]ubcluster", "[Bb]itmap" }, GOOD_E0, "corrupt"))
case("extended L2: allocation bits on an unallocated cluster", "extl2",
  poke_bitmap(65536, function() return 1 end),
  read_fails(65536, 65536, { "[Ll]2", "[Ss]ubcluster", "[Bb]itmap" }, GOOD_E, "corrupt"))
case("extended L2: bitmap on a compressed cluster", "extl2",
  poke_bitmap(262144, function() return 1 end),
  read_fails(262144, 65536, { "[Ll]2", "[Ss]ubcluster", "[Bb]itmap", "[Cc]ompress" }, GOOD_E, "corrupt"))

-- 9. More header, extension and chain cases --------------------------------
case("header extension length 0xfffffff9 (round-up overflows 32 bits)", "v3", function(p)
  helpers.poke(p, M.extensions(p)[1].offset + 4, helpers.be32(0xfffffff9))
end, open_fails("corrupt", { "[Ee]xtension" }))
-- QEMU checks every extension length, the end marker's too, against the
-- extension area ("Header extension too large"): spec/bounds_spec.lua
-- compares the lengths that fit with qemu-img.
case("end-of-extensions marker with a length past cluster 0", "v3", function(p)
  helpers.poke(p, M.extensions_end(p) + 4, helpers.be32(M.header(p).cluster_size))
end, open_fails("corrupt", { "[Ee]nd.of.extensions.*too large" }))
case("raw external data bit without an external data file", "v3",
  setter("autoclear_features", 1 << 1),
  open_fails("corrupt", { "[Rr]aw", "[Dd]ata.?file" }))
case("backing format extension naming vmdk", "backing", function(p)
  local e = M.find_extension(p, M.EXT_BACKING_FORMAT)
  assert(e.length == 5, "layout")
  helpers.poke(p, e.offset + 4, helpers.be32(4) .. "vmdk\0")
end, { stage = "open", code = "unsupported", msg = { "vmdk" }, control = { backing = false } })
-- QEMU 7.2 takes a repeated known extension (the last copy counts,
-- spec/hostile_spec.lua) but validates every copy as it reads it
case("backing-format extension repeated, the second copy 16 bytes", "backing", function(p)
  local ed = assert(require("qcow2").edit(p))
  assert(ed:add_extension(M.EXT_BACKING_FORMAT, "qcow2qcow2qcow2!"))
  ed:close()
end, open_fails("corrupt", { "[Ff]ormat.*16" }))
case("bitmaps extension repeated, the first copy with zero bitmaps", "v3", function(p)
  local ed = assert(require("qcow2").edit(p))
  assert(ed:set_feature("autoclear", 0, true))
  assert(ed:add_extension(M.EXT_BITMAPS, string.pack(">I4I4I8I8", 0, 0, 0, 0)))
  assert(ed:add_extension(M.EXT_BITMAPS, string.pack(">I4I4I8I8", 1, 0, 64, 0x10000)))
  ed:close()
end, open_fails("corrupt", { "[Bb]itmap.*nb_bitmaps 0" }))
case("backing file with an unaligned L1 table offset", "backing", function(_, dir)
  local b = dir .. "/base.qcow2"
  M.set(b, "l1_table_offset", M.header(b).l1_table_offset + 512)
end, { stage = "open", code = "corrupt", msg = { "base%.qcow2.*[Ll]1" }, control = { backing = false } })
case("compressed offset with bit 57 set (512-byte clusters)", "c512", function(p)
  local off = M.l2_entry_offset(p, 0)
  local _, _, x = M.compressed(p, 0)
  assert(x == 61, "layout")
  M.put64(p, off, M.get64(p, off) | (1 << 57))
end, read_fails(0, 512, { P.l2, P.compressed, P.data_eof }, { { 512, 512, 0xc2 }, { 65536, 512, 0xa3 } }))
case("compressed sector count cutting the stream short", "zrand", function(p)
  local off = M.l2_entry_offset(p, 0)
  local coffset, csize, x = M.compressed(p, 0)
  assert(csize > 4096, "layout: stream should span sectors")
  -- keep the offset, zero the additional-sector count: one sector left
  M.put64(p, off, (M.get64(p, off) & ~(0xff << x)) | 0)
  assert(select(2, M.compressed(p, 0)) == 512 - (coffset & 511))
end, read_fails(0, 65536, P.compressed, { { 65536, 65536, 0xc2 } }))

-- 10. Snapshot L1 contents and sizes ----------------------------------------
case("snapshot L1 entry with reserved bit 57 set", "snap", poke_snap(function(p, s)
  M.put64(p, s.l1_table_offset, M.get64(p, s.l1_table_offset) | (1 << 57))
end), snapshot_fails({ "[Ll]1", "[Ss]napshot" }))
case("snapshot disk size 2^62 in its extra data", "snap", poke_snap(function(p, s)
  assert(s.extra >= 16, "layout: no disk size field")
  M.put64(p, s.offset + 48, 1 << 62)
end), snapshot_fails({ "[Ss]napshot", "[Ll]1", "[Ss]ize", "[Tt]oo big" }))

-- 11. Names that try to escape the checks ------------------------------------
case("self-backing through a symbolic link", "backing", function(p, dir)
  local x = dir .. "/x.qcow2"
  helpers.copy(p, x)
  M.set_backing_name(x, "link.qcow2")
  helpers.must("ln -s x.qcow2 " .. q(dir .. "/link.qcow2"))
  return x
end, { stage = "open", code = "corrupt", msg = { "[Ll]oop", "[Cc]ycle", "itself", "[Bb]acking" },
       control = { backing = false } })
case("backing file name with a newline and a carriage return", "backing", function(p)
  M.set_backing_name(p, "a\nb\r.qcow2")
end, { stage = "open", code = "notfound", msg = { "[Bb]acking", "a.b.%.qcow2" }, control = { backing = false } })
case("feature-name table entry of 46 unterminated bytes naming bit 5", "v3", function(p)
  local e = M.find_extension(p, M.EXT_FEATURE_TABLE)
  local n = e.length // 48
  local name = ("hostile-name-without-terminator-"):rep(2):sub(1, 46)
  helpers.poke(p, e.offset + 8 + (n - 1) * 48, string.char(0, 5) .. name)
  M.set(p, "incompatible_features", 1 << 5)
end, open_fails("unsupported", { "hostile%-name%-without%-terminator%-hostile" }))
case("zero-flagged L2 entry with an unaligned host offset", "v3",
  poke_l2(G, function(e) return (e + 512) | 1 end),
  read_fails(G, 65536, { "[Ll]2", "align" }, GOOD_V3, "corrupt"))

M.cases = cases

-- ---------------------------------------------------------------------------
-- Verification (raises busted assertion failures)

local function as_list(v) return type(v) == "table" and v or { v } end
local function flatten(list, out)
  out = out or {}
  for _, v in ipairs(as_list(list)) do
    if type(v) == "table" then flatten(v, out) else out[#out + 1] = v end
  end
  return out
end

-- An error triple as the API promises it: one line, naming a file and the
-- field (one of the patterns), with an expected code.
function M.check_error(what, msg, code, expect)
  local pats = flatten(expect.msg)
  assert(type(msg) == "string" and #msg > 0,
    ("%s: message should be a non-empty string, got %s"):format(what, tostring(msg)))
  assert(not msg:find("[\r\n]"), ("%s: message is not one line: %q"):format(what, msg))
  assert(msg:find("%.qcow2"), ("%s: message does not name the file: %q"):format(what, msg))
  assert(type(code) == "string" and M.CODES[code],
    ("%s: code %s is not one of the API's codes (msg %q)"):format(what, tostring(code), msg))
  local codes = as_list(expect.code)
  local code_ok = false
  for _, c in ipairs(codes) do if c == code then code_ok = true end end
  assert(code_ok, ("%s: code %q, expected %s (msg %q)"):format(what, code,
    table.concat(codes, " or "), msg))
  for _, pat in ipairs(pats) do
    if msg:find(pat) then return end
  end
  error(("%s: message %q names none of: %s"):format(what, msg, table.concat(pats, " | ")), 0)
end

local function check_good(img, good, what)
  for _, g in ipairs(good or {}) do
    local data, msg, code = img:read(g[1], g[2])
    assert(data, ("%s: good range 0x%x+%d failed: %s (%s)"):format(what, g[1], g[2],
      tostring(msg), tostring(code)))
    local want = type(g[3]) == "string" and g[3] or string.char(g[3]):rep(g[2])
    assert(data == want,
      ("%s: good range 0x%x+%d reads wrong bytes"):format(what, g[1], g[2]))
  end
end
M.check_good = check_good

local function close(img) if img then pcall(img.close, img) end end

local verify = {}

function verify.open(qcow2, c, path)
  local img, msg, code = qcow2.open(path, c.expect.open_opts)
  if img then
    close(img)
    error(("open succeeded, expected nil, msg, %s"):format(table.concat(as_list(c.expect.code), "|")), 0)
  end
  M.check_error("open", msg, code, c.expect)
  if c.expect.control then
    local ok, cmsg, ccode = qcow2.open(path, c.expect.control)
    assert(ok, ("control open with %s failed: %s (%s)"):format("backing=false", tostring(cmsg), tostring(ccode)))
    local data, rmsg = ok:read(0, 4096)
    close(ok)
    assert(data and #data == 4096, "control read failed: " .. tostring(rmsg))
  end
end

function verify.read(qcow2, c, path)
  local e = c.expect
  local img, msg, code = qcow2.open(path)
  if not img then
    -- refusing the whole image is allowed, with the same code and field
    return M.check_error("open", msg, code, e)
  end
  local ok, err = pcall(function()
    for round = 1, 2 do -- a second read must not come from a cache of zeroes
      local data, rmsg, rcode = img:read(e.offset, e.length)
      if data ~= nil then
        if e.zero_ok and data == ("\0"):rep(e.length) then return end
        error(("read #%d of the bad range 0x%x+%d returned %d bytes (%s), expected nil, msg, %q")
          :format(round, e.offset, e.length, #data,
                  data == ("\0"):rep(#data) and "silent zeroes" or "data", e.code), 0)
      end
      M.check_error("read #" .. round, rmsg, rcode, e)
    end
  end)
  if not ok then close(img); error(err, 0) end
  ok, err = pcall(function()
    if e.offset >= 4096 then
      -- a read that only partly covers the bad range fails as a whole
      local data, rmsg, rcode = img:read(e.offset - 4096, 8192)
      if data ~= nil and not (e.zero_ok and data == ("\0"):rep(8192)) then
        error("a read straddling the bad range returned data", 0)
      end
      if data == nil then M.check_error("straddling read", rmsg, rcode, e) end
    end
    check_good(img, e.good, "after the bad read")
    local m, mmsg, mcode = img:map(e.offset, e.length)
    if e.map == "corrupt" then
      -- the rest of the disk still maps: the bad range is corrupt extents
      assert(m, "map of the bad range failed: " .. tostring(mmsg))
      local covered = 0
      for x in m:extents() do
        assert(x.type == "corrupt", ("map of the bad range gave a %s extent"):format(x.type))
        M.check_error("map reason", x.reason, "corrupt", e)
        covered = covered + x.length
      end
      assert(covered == e.length, "corrupt extents do not cover the bad range")
    elseif m == nil then
      M.check_error("map", mmsg, mcode, { code = { "corrupt", "io" }, msg = e.msg })
    else
      assert(#m >= 1, "map of the bad range returned no extents")
    end
  end)
  close(img)
  if not ok then error(err, 0) end
end

-- The failure may show at open, in the snapshot list, when a snapshot view
-- opens, or when the view is read/mapped; the active disk still reads.
function verify.snapshot(qcow2, c, path)
  local e = c.expect
  local img, msg, code = qcow2.open(path)
  if not img then return M.check_error("open", msg, code, e) end
  local ok, err = pcall(function()
    local list, lmsg, lcode = img:snapshots()
    if not list then return M.check_error("snapshots()", lmsg, lcode, e) end
    assert(#list >= 1, "snapshot list is empty")
    local s = list[1]
    local view, vmsg, vcode = s:open()
    if not view then return M.check_error("snapshot open", vmsg, vcode, e) end
    local data, rmsg, rcode = view:read(0, 65536)
    local m, mmsg, mcode
    if data then m, mmsg, mcode = view:map() end
    close(view)
    if not data then return M.check_error("snapshot read", rmsg, rcode, e) end
    if not m then return M.check_error("snapshot map", mmsg, mcode, e) end
    error("the hostile snapshot opened, read and mapped without an error", 0)
  end)
  if ok then ok, err = pcall(check_good, img, { { 0, 65536, 0xa1 } }, "active disk") end
  close(img)
  if not ok then error(err, 0) end
end

function verify.damaged(qcow2, c, path)
  local e = c.expect
  local rw, msg, code = qcow2.open(path, { mode = "rw" })
  if rw then
    close(rw)
    error("read-write open succeeded, expected nil, msg, \"corrupt\"", 0)
  end
  M.check_error("read-write open", msg, code, e)
  local img, rmsg = qcow2.open(path)
  assert(img, "read-only open failed: " .. tostring(rmsg))
  local ok, err = pcall(function()
    local info = assert(img:info())
    assert(info.damage and #info.damage >= 1, "info() reports no damage")
    M.check_error("info damage", info.damage[1], "corrupt", e)
    check_good(img, e.good or M.base_contents[c.base], "read-only open")
    assert(img:map(), "map failed")
    assert(img:digest("sha256", { on_error = "zero" }), "digest failed")
  end)
  close(img)
  if not ok then error(err, 0) end
end

-- Build the case's image and check the library's answer.
function M.run(qcow2, c)
  local path, dir = M.instance(c.base)
  path = c.poke(path, dir) or path
  return verify[c.expect.stage](qcow2, c, path)
end

return M
