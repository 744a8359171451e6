-- A seeded repair fuzzer: qemu-img-made images (internal snapshots, several
-- cluster sizes and refcount widths, v2 and v3) get one to three mutations
-- of a metadata field (header fields, L1/L2 entries, refcount table and
-- block entries, snapshot entry fields, header extension lengths), then
-- copies are repaired by qemu-img check -r and by ours, for "all" and
-- "leaks", and judged by spec/repair_oracle.lua.
--
-- QCOW2_FUZZ_ITERATIONS  total iterations (default 150; `make fuzz` 2000)
-- QCOW2_FUZZ_SEED        seed (default 20261126)
-- QCOW2_FUZZ_ONLY        "base:iteration" replays just that one
-- The running iteration is named in /tmp/lua-qcow2-repair-fuzz-last.txt
-- (left behind if the process dies); failing images are kept in
-- /tmp/lua-qcow2-repair-fuzz-failures/.
local h = require("helpers")
local hostile = require("hostile")
local oracle = require("repair_oracle")

local ITERATIONS = tonumber(os.getenv("QCOW2_FUZZ_ITERATIONS") or "") or 150
local SEED = tonumber(os.getenv("QCOW2_FUZZ_SEED") or "") or 20261126
local ONLY = os.getenv("QCOW2_FUZZ_ONLY")
local STATE = "/tmp/lua-qcow2-repair-fuzz-last.txt"
local FAILDIR = "/tmp/lua-qcow2-repair-fuzz-failures"
local q = h.q

local COPIED = 1 << 63
local COMPRESSED = 1 << 62
local OFFSET_MASK = 0x00fffffffffffe00

-- ---------------------------------------------------------------------------
-- Bases: every one has an internal snapshot (shared clusters, COPIED flags
-- cleared then set again by a later write)

local function snapshot(p, name) h.qemu_img("snapshot -c " .. name .. " " .. q(p)) end

local bases = {
  v3_64k = function(p)
    h.create(p, "1M")
    h.qemu_io(p, { "write -P 0x11 0 64k", "write -P 0x22 64k 64k", "write -P 0x33 512k 4k" })
    snapshot(p, "s1")
    h.qemu_io(p, { "write -P 0x44 0 64k" })
  end,
  v3_4k_r8 = function(p)
    h.create(p, "2M", "cluster_size=4096,refcount_bits=8")
    h.qemu_io(p, { "write -P 0x11 0 8k", "write -c -P 0x22 16k 4k", "write -P 0x33 1M 4k" })
    snapshot(p, "s1")
    h.qemu_io(p, { "write -P 0x44 4k 4k", "write -P 0x55 1536k 4k" })
  end,
  v2_64k = function(p)
    h.create(p, "1M", "compat=0.10")
    h.qemu_io(p, { "write -P 0x11 0 64k", "write -P 0x22 64k 64k" })
    snapshot(p, "s1")
    h.qemu_io(p, { "write -P 0x33 64k 64k" })
  end,
  v3_512_r64 = function(p)
    h.create(p, "256K", "cluster_size=512,refcount_bits=64")
    h.qemu_io(p, { "write -P 0x11 0 2k", "write -P 0x22 100k 1k" })
    snapshot(p, "a")
    h.qemu_io(p, { "write -P 0x33 512 512" })
    snapshot(p, "b")
  end,
  v3_16k_r2 = function(p)
    h.create(p, "1M", "cluster_size=16384,refcount_bits=2")
    h.qemu_io(p, { "write -P 0x11 0 32k", "write -P 0x22 256k 16k" })
    snapshot(p, "s1")
    h.qemu_io(p, { "write -P 0x33 0 16k" })
  end,
}
local BASE_NAMES = {}
for k in pairs(bases) do BASE_NAMES[#BASE_NAMES + 1] = k end
table.sort(BASE_NAMES)

-- ---------------------------------------------------------------------------
-- The layout of a pristine base, read from the image itself

local function layout(path)
  local hd = hostile.header(path)
  local cs = hd.cluster_size
  local L = { hd = hd, cs = cs, size = hostile.file_size(path) }
  L.clusters = (L.size + cs - 1) // cs
  L.esz = hd.extended_l2 and 16 or 8
  L.l1 = {}      -- {offset of the entry}
  L.l2 = {}      -- {offset of a table}
  local seen = {}
  local function walk_l1(off, n)
    for i = 0, n - 1 do
      local e = hostile.get64(path, off + 8 * i)
      L.l1[#L.l1 + 1] = off + 8 * i
      local l2 = e & OFFSET_MASK
      if l2 ~= 0 and not seen[l2] then seen[l2] = true; L.l2[#L.l2 + 1] = l2 end
    end
  end
  walk_l1(hd.l1_table_offset, hd.l1_size)
  L.snapshots = hostile.snapshots(path)
  for _, s in ipairs(L.snapshots) do walk_l1(s.l1_table_offset, s.l1_size) end
  L.extensions = hostile.extensions(path)
  L.refblock = hostile.get64(path, hd.refcount_table_offset) & ~0x1ff
  L.refbits = 1 << (hd.refcount_order or 4)   -- v2: always 16 bits
  return L
end

-- ---------------------------------------------------------------------------
-- Mutations: each pokes one field and returns a description

local function rnd(a, b) return math.random(a, b) end
local function pick(t) return t[math.random(#t)] end

-- A host offset worth trying: a real cluster (metadata or data), one past
-- the end of the file, unaligned, zero, or absurd.
local function offset_value(L)
  local roll = rnd(1, 8)
  if roll <= 3 then return rnd(0, L.clusters - 1) * L.cs end
  if roll == 4 then return pick({ L.hd.refcount_table_offset, L.hd.l1_table_offset, L.refblock,
                                  L.hd.snapshots_offset, L.l2[1] or 0 }) end
  if roll == 5 then return (L.clusters + rnd(0, 4)) * L.cs end
  if roll == 6 then return rnd(0, L.clusters) * L.cs + rnd(1, L.cs - 1) end
  if roll == 7 then return 0 end
  return pick({ 1 << 40, (1 << 56) - L.cs, 0x7fffffff })
end

local function poke_be(path, off, width, v, what)
  h.poke(path, off, string.pack(">I" .. width, v & ((width == 8) and -1 or ((1 << (8 * width)) - 1))))
  return ("%s@0x%x=0x%x"):format(what, off, v)
end

local HEADER_FIELDS = {
  "l1_size", "l1_table_offset", "refcount_table_offset", "refcount_table_clusters",
  "nb_snapshots", "snapshots_offset", "refcount_order", "incompatible_features",
  "compatible_features", "autoclear_features", "header_length", "size",
}

local mutators = {
  header = function(path, L)
    local field = pick(HEADER_FIELDS)
    local f = hostile.FIELDS[field]
    if L.hd.version < 3 and f[1] >= 72 then field, f = "nb_snapshots", hostile.FIELDS.nb_snapshots end
    local old = L.hd[field] or 0
    local v
    if field:match("offset") then v = offset_value(L)
    else
      v = pick({ 0, 1, 2, old + 1, old - 1, old * 2, old + rnd(1, 16), 1 << rnd(0, 6), 0xffffffff })
    end
    if field:match("features") then v = old ~ (1 << rnd(0, 5)) end
    return poke_be(path, f[1], f[2], v, field)
  end,
  l1 = function(path, L)
    local at = pick(L.l1)
    local e = hostile.get64(path, at)
    local roll = rnd(1, 4)
    local v
    if roll == 1 then v = e ~ COPIED
    elseif roll == 2 then v = 0
    elseif roll == 3 then v = offset_value(L) | (rnd(0, 1) << 63)
    else v = e | (1 << rnd(1, 8)) end   -- reserved or unaligned bits
    return poke_be(path, at, 8, v, "l1")
  end,
  l2 = function(path, L)
    if #L.l2 == 0 then return "none" end
    local t = pick(L.l2)
    local idx = rnd(0, math.min(L.cs // L.esz, 64) - 1)
    -- prefer entries in use
    for _ = 1, 8 do
      if hostile.get64(path, t + idx * L.esz) ~= 0 then break end
      idx = rnd(0, math.min(L.cs // L.esz, 64) - 1)
    end
    local at = t + idx * L.esz
    local e = hostile.get64(path, at)
    local roll = rnd(1, 6)
    local v
    if roll == 1 then v = e ~ COPIED
    elseif roll == 2 then v = 0
    elseif roll == 3 then v = offset_value(L) | (rnd(0, 1) << 63)
    elseif roll == 4 then v = e | (1 << rnd(1, 8))
    elseif roll == 5 then v = (e & ~COPIED) | COMPRESSED
    else v = e | 1 end                   -- the zero flag
    return poke_be(path, at, 8, v, "l2")
  end,
  reftable = function(path, L)
    local at = L.hd.refcount_table_offset + 8 * rnd(0, 2)
    local v = pick({ 0, offset_value(L), L.refblock + 1, L.refblock })
    return poke_be(path, at, 8, v, "reftable")
  end,
  refblock = function(path, L)
    if L.refblock == 0 then return "none" end
    local cluster = rnd(0, L.clusters + 1)
    local bits = L.refbits
    local maxv = bits >= 64 and -1 or ((1 << bits) - 1)
    local v = pick({ 0, 1, 2, 3, maxv }) & maxv
    if bits >= 8 then
      return poke_be(path, L.refblock + cluster * (bits // 8), bits // 8, v, "refblock")
    end
    local at = L.refblock + cluster * bits // 8
    local shift = (cluster * bits) % 8
    local byte = h.peek(path, at, 1):byte()
    local mask = ((1 << bits) - 1) << shift
    byte = (byte & ~mask) | ((v << shift) & mask)
    return poke_be(path, at, 1, byte, "refblock")
  end,
  snapshot = function(path, L)
    if #L.snapshots == 0 then return "none" end
    local s = pick(L.snapshots)
    local fields = { { "sn.l1_table_offset", 0, 8 }, { "sn.l1_size", 8, 4 }, { "sn.id_len", 12, 2 },
                     { "sn.name_len", 14, 2 }, { "sn.vm_state_size", 32, 4 },
                     { "sn.extra_data_size", 36, 4 } }
    local f = pick(fields)
    local v
    if f[1] == "sn.l1_table_offset" then v = offset_value(L)
    else v = pick({ 0, 1, 8, 15, 16, 24, 1024, 1025, 4096, 0xffff }) end
    return poke_be(path, s.offset + f[2], f[3], v, f[1])
  end,
  extension = function(path, L)
    if #L.extensions == 0 then return "none" end
    local e = pick(L.extensions)
    local v = pick({ 0, e.length + 8, e.length - 1, L.cs, 0xffffffff, 1 })
    return poke_be(path, e.offset + 4, 4, v, ("ext%08x.len"):format(e.magic))
  end,
}
local MUTATOR_NAMES = {}
for k in pairs(mutators) do MUTATOR_NAMES[#MUTATOR_NAMES + 1] = k end
table.sort(MUTATOR_NAMES)

-- ---------------------------------------------------------------------------

describe("repair fuzzing against qemu-img check -r", function()
  local qcow2, work
  local pristine = {}
  setup(function()
    qcow2 = require("qcow2")
    work = h.tmpdir()
    os.execute("mkdir -p " .. q(FAILDIR))
  end)
  teardown(function()
    os.remove(STATE)
    h.cleanup()
  end)

  local function base(name)
    if not pristine[name] then
      local p = work .. "/pristine-" .. name .. ".qcow2"
      bases[name](p)
      pristine[name] = { path = p, bytes = h.read_file(p), layout = layout(p) }
    end
    return pristine[name]
  end

  local per_base = math.max(1, ITERATIONS // #BASE_NAMES)
  local totals = { repaired = 0, refused = 0, raised = 0, qemu_clean = 0 }

  it("every base is clean before fuzzing", function()
    for _, name in ipairs(BASE_NAMES) do
      local b = base(name)
      assert.is_true(oracle.qemu_check(b.path).clean, name)
      assert.is_true(oracle.our_check(qcow2, b.path).clean, name)
      assert.is_true(#b.layout.snapshots > 0, name)
    end
  end)

  for bi, name in ipairs(BASE_NAMES) do
    local only_iter
    if ONLY then
      local label, n = ONLY:match("^(.-):(%d+)$")
      if label == name then only_iter = tonumber(n) end
    end
    if not ONLY or only_iter then
      it(("%s: %d mutated images repaired no worse than qemu-img"):format(name, only_iter and 1 or per_base), function()
        local b = base(name)
        local dir = work .. "/run-" .. name
        h.must("mkdir -p " .. q(dir))
        local path = dir .. "/image.qcow2"
        local failures = {}
        local first, last = 1, per_base
        if only_iter then first, last = only_iter, only_iter end
        for i = first, last do
          math.randomseed(SEED + bi, i)
          h.write_file(path, b.bytes)
          local descs = {}
          for _ = 1, rnd(1, 3) do
            descs[#descs + 1] = mutators[pick(MUTATOR_NAMES)](path, b.layout)
          end
          local what = ("seed %d base %s iteration %d: %s"):format(SEED, name, i, table.concat(descs, " "))
          h.write_file(STATE, what .. "\nimage " .. path .. "\n")
          local mutated = dir .. "/mutated.qcow2"
          h.copy(path, mutated)
          for _, mode in ipairs({ "all", "leaks" }) do
            local broken, seen = oracle.judge(qcow2, mutated, dir, mode)
            totals[seen.outcome] = totals[seen.outcome] + 1
            if seen.q_theirs.clean then totals.qemu_clean = totals.qemu_clean + 1 end
            if #broken > 0 then
              local keep = ("%s/%s-%d-%d.qcow2"):format(FAILDIR, name, SEED, i)
              h.copy(mutated, keep)
              failures[#failures + 1] = ("%s, repair %q: %s (image kept as %s; replay with "
                .. "QCOW2_FUZZ_SEED=%d QCOW2_FUZZ_ONLY=%s:%d)"):format(what, mode,
                table.concat(broken, "; "), keep, SEED, name, i)
            end
          end
        end
        assert(#failures == 0, #failures .. " failure(s):\n" .. table.concat(failures, "\n"))
      end)
    end
  end

  it("repaired images and met images qemu-img repairs", function()
    if ONLY then return end
    print(("# repair fuzz: seed %d, %d repaired, %d refused, %d clean after qemu-img")
      :format(SEED, totals.repaired, totals.refused, totals.qemu_clean))
    assert.is_true(totals.repaired > 0, "no mutated image was repaired")
    assert.is_true(totals.qemu_clean > 0, "qemu-img cleaned no mutated image")
  end)
end)
