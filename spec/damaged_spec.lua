-- Damaged images stay readable where they are intact (issue 10): one bad
-- L1/L2 entry or a damaged refcount/snapshot table costs only the ranges
-- it maps. Each damage kind is poked into an image qemu-io wrote, and the
-- library is held against qemu-img on the same file: qemu-img opens it,
-- maps the intact ranges as the pristine image maps them, and qemu-img
-- convert of the pristine image gives their bytes.
local h = require("helpers")
local qcow2 = require("qcow2")

local KiB, MiB = 1024, 1024 * 1024
local CLUSTER = 4 * KiB            -- one L2 table maps 2 MiB: four L1 entries
local SIZE = 8 * MiB
local COPIED = 1 << 63
local OFFSET_MASK = 0x00fffffffffffe00
local FAR = 0x10000000             -- cluster aligned, far past the file's end

-- ---------------------------------------------------------------------------
-- Layout, read from the file itself

local function l1_entry_at(path, index)
  return h.get_be64(path, 40) + 8 * index
end

local function l2_entry_at(path, guest)
  local l1 = h.get_be64(path, l1_entry_at(path, guest // (2 * MiB)))
  assert(l1 & OFFSET_MASK ~= 0, "no L2 table maps guest offset " .. guest)
  return (l1 & OFFSET_MASK) + 8 * ((guest // CLUSTER) % (CLUSTER // 8))
end

local function put64(path, at, value) h.poke(path, at, h.be64(value)) end

-- ---------------------------------------------------------------------------
-- The damage kinds. corrupt: the ranges map() must give as "corrupt" (and
-- read() refuse); why: a pattern the reason must match (the field).

local KINDS = {
  {
    name = "reserved bits in an L2 entry", base = "plain",
    poke = function(p)
      local at = l2_entry_at(p, 4 * KiB)
      put64(p, at, h.get_be64(p, at) | 2)
    end,
    corrupt = { { 4 * KiB, CLUSTER } }, why = "reserved bits",
  },
  {
    name = "L2 table offset past EOF", base = "plain",
    poke = function(p) put64(p, l1_entry_at(p, 2), COPIED | FAR) end,
    corrupt = { { 4 * MiB, 2 * MiB } }, why = "L2 table at 0x10000000 is not inside the file",
  },
  {
    name = "data cluster past EOF", base = "plain",
    poke = function(p) put64(p, l2_entry_at(p, 1 * MiB), COPIED | FAR) end,
    corrupt = { { 1 * MiB, CLUSTER } }, why = "data cluster starts past the end of the file",
  },
  {
    name = "unaligned L2 table offset", base = "plain",
    poke = function(p)
      local at = l1_entry_at(p, 2)
      put64(p, at, h.get_be64(p, at) + 512)
    end,
    corrupt = { { 4 * MiB, 2 * MiB } }, why = "L2 table offset 0x%x+ is not cluster aligned",
  },
  {
    name = "compressed descriptor past EOF", base = "plain",
    poke = function(p)
      -- 4 KiB clusters: 70 - 12 = 58 bits of stream offset
      local at = l2_entry_at(p, 6 * MiB)
      local e = h.get_be64(p, at)
      assert(e & (1 << 62) ~= 0, "layout: guest 6 MiB is not compressed")
      put64(p, at, (e & ~((1 << 58) - 1)) | FAR)
    end,
    corrupt = { { 6 * MiB, CLUSTER } }, why = "compressed data starts past the end of the file",
  },
  {
    name = "refcount table at offset 0", base = "plain",
    poke = function(p) put64(p, 48, 0) end,
    corrupt = {}, damage = "refcount table at 0x0 overlaps the header",
  },
  {
    name = "refcount table past EOF", base = "plain",
    poke = function(p) put64(p, 48, FAR) end,
    corrupt = {}, damage = "refcount table at 0x10000000 .* outside the file",
  },
  {
    name = "snapshot table past EOF", base = "snap",
    poke = function(p) put64(p, 64, FAR) end,
    corrupt = {}, damage = "snapshot table at 0x10000000 .* outside the file",
  },
}

-- ---------------------------------------------------------------------------
-- Pristine images and their oracles, built once

local bases = {}

local function build_bases(dir)
  local p = dir .. "/plain.qcow2"
  h.create(p, SIZE, "cluster_size=" .. CLUSTER)
  h.qemu_io(p, {
    "write -P 0x11 0 12k", "write -P 0x22 1M 4k", "write -z 1536k 4k",
    "write -P 0x33 4M 8k", "write -c -P 0x44 6M 4k", "write -c -P 0x55 6148k 4k",
  })
  local s = dir .. "/snap.qcow2"
  h.copy(p, s)
  h.qemu_img("snapshot -c s1 " .. h.q(s))
  for name, path in pairs({ plain = p, snap = s }) do
    bases[name] = { path = path, raw = h.raw_bytes(path), map = h.map_json(path) }
  end
end

-- ---------------------------------------------------------------------------
-- Comparisons

-- Does [a, b) touch one of the ranges?
local function touches(ranges, a, b)
  for _, r in ipairs(ranges) do
    if a < r[1] + r[2] and r[1] < b then return true end
  end
  return false
end

-- The complement of the ranges in [0, SIZE).
local function intact(ranges)
  local out, pos = {}, 0
  for _, r in ipairs(ranges) do
    if r[1] > pos then out[#out + 1] = { pos, r[1] - pos } end
    pos = r[1] + r[2]
  end
  if pos < SIZE then out[#out + 1] = { pos, SIZE - pos } end
  return out
end

-- Every piece of [0, SIZE) outside `skip`, cut at both lists' record
-- boundaries, has the same present/zero/data/depth and host offset in
-- ours as in theirs (qemu-img's records, which may merge differently
-- around a damaged range).
local function same_outside(ours, theirs, skip, what)
  local cuts, seen = {}, {}
  for _, list in ipairs({ ours, theirs }) do
    for _, r in ipairs(list) do
      for _, c in ipairs({ r.start, r.start + r.length }) do
        if not seen[c] then seen[c] = true; cuts[#cuts + 1] = c end
      end
    end
  end
  table.sort(cuts)
  local function at(list, pos)
    for _, r in ipairs(list) do
      if r.start <= pos and pos < r.start + r.length then return r end
    end
  end
  local compared = 0
  for i = 1, #cuts - 1 do
    local a, b = cuts[i], cuts[i + 1]
    if not touches(skip, a, b) then
      local o, t = at(ours, a), at(theirs, a)
      local where = ("%s: [0x%x, 0x%x)"):format(what, a, b)
      assert(o and t, where .. ": not covered by both maps")
      assert.is_nil(o.corrupt, where .. ": corrupt outside the damage")
      for _, k in ipairs({ "present", "zero", "data", "depth" }) do
        assert.are.equal(t[k], o[k], where .. ": " .. k)
      end
      assert.are.equal(t.offset and t.offset + (a - t.start), o.offset and o.offset + (a - o.start),
        where .. ": offset")
      compared = compared + (b - a)
    end
  end
  return compared
end

-- The pristine raw disk with the damaged ranges zeroed.
local function zeroed(raw, ranges)
  for _, r in ipairs(ranges) do
    raw = raw:sub(1, r[1]) .. ("\0"):rep(r[2]) .. raw:sub(r[1] + r[2] + 1)
  end
  return raw
end

-- ---------------------------------------------------------------------------

describe("damaged images", function()
  local base_dir

  setup(function()
    base_dir = h.tmpdir()
    build_bases(base_dir)
  end)

  teardown(function() h.cleanup() end)

  for _, k in ipairs(KINDS) do
    describe(k.name, function()
      local dir, path, base

      before_each(function()
        dir = h.tmpdir()
        base = bases[k.base]
        path = dir .. "/" .. k.base .. ".qcow2"
        h.copy(base.path, path)
        k.poke(path)
      end)

      it("opens read-only as qemu-img opens it, and writes nothing", function()
        local ok, out = h.sh("qemu-img info " .. h.q(path), true)
        assert(ok, "oracle: qemu-img refuses the image: " .. out)
        if k.damage then
          -- the writer needs the refcounts and the snapshot table
          local rw, msg, code = qcow2.open(path, { mode = "rw" })
          if rw then rw:close() end
          assert.is_nil(rw)
          assert.are.equal("corrupt", code, msg)
        end
        local before_sum, before_stat = h.sha256_file(path), h.stat(path)
        local img = assert(qcow2.open(path))
        local info = assert(img:info())
        if k.damage then
          assert(info.damage and #info.damage >= 1, "info() reports no damage")
          assert.matches(k.damage, info.damage[1])
        else
          assert.is_nil(info.damage)
        end
        assert(img:map())
        img:digest("sha256", { on_error = "zero" })
        img:read(0, SIZE)
        assert(img:check())
        img:close()
        assert.are.equal(before_sum, h.sha256_file(path), "the file changed")
        assert.are.equal(before_stat, h.stat(path), "size or mtime changed")
      end)

      it("maps the damage as corrupt and the rest as qemu-img does", function()
        local img = assert(qcow2.open(path))
        local m = assert(img:map())
        local got = {}
        for e in m:extents() do
          if e.type == "corrupt" then
            got[#got + 1] = { e.start, e.length }
            assert.are.equal(0, e.depth)
            assert.is_nil(e.offset)
            assert.matches(k.why, e.reason)
            assert.matches(("guest offset 0x%x"):format(e.start), e.reason, 1, true)
            assert.is_nil(e.reason:find("\n"))
          else
            assert.is_nil(e.reason)
          end
        end
        assert.are.same(k.corrupt, got)
        assert.are.equal(#k.corrupt > 0 and k.corrupt[1][2] or nil, m:stats().corrupt > 0
          and m:stats().corrupt or nil)
        local ours = m:records()
        -- against the pristine image: every intact byte
        local n = same_outside(ours, base.map, k.corrupt, "vs pristine")
        assert.are.equal(SIZE - (k.corrupt[1] and k.corrupt[1][2] or 0), n)
        -- against qemu-img map of this very file, where it maps it (it
        -- refuses an unaligned L2 table offset)
        local ok, out = h.sh("qemu-img map --output=json " .. h.q(path))
        if ok then same_outside(ours, h.json.decode(out), k.corrupt, "vs qemu-img") end
        -- to_json: qemu-img's records, the corrupt ranges as records of
        -- their own (no flag set, corrupt = true, the reason)
        local json = h.json.decode(m:to_json())
        assert.are.same(ours, json)
        for _, r in ipairs(json) do
          if r.corrupt then
            assert.is_false(r.present or r.zero or r.data)
            assert.is_string(r.reason)
          end
        end
        img:close()
      end)

      it("reads intact ranges as qemu-img does and refuses only the damage", function()
        local img = assert(qcow2.open(path))
        local ok_convert, converted = pcall(h.raw_bytes, path)
        for _, r in ipairs(intact(k.corrupt)) do
          local data = assert(img:read(r[1], r[2]))
          assert(data == base.raw:sub(r[1] + 1, r[1] + r[2]),
            ("intact range 0x%x+%d differs from the pristine export"):format(r[1], r[2]))
          if ok_convert then
            assert(data == converted:sub(r[1] + 1, r[1] + r[2]),
              ("intact range 0x%x+%d differs from qemu-img convert"):format(r[1], r[2]))
          end
        end
        for _, r in ipairs(k.corrupt) do
          for _, span in ipairs({ { r[1], r[2] }, { r[1] - CLUSTER, 2 * CLUSTER },
                                  { r[1] + r[2] - 1, 1 } }) do
            local data, msg, code = img:read(span[1], span[2])
            assert.is_nil(data)
            assert.are.equal("corrupt", code)
            assert.matches(k.why, msg)
            assert.matches("guest offset 0x%x+", msg)
          end
          -- qemu-io fails there too, except where it reads through the damage
          -- (it ignores reserved L2 bits and reads past-EOF tables as zeroes)
        end
        img:close()
      end)

      it("digests with on_error = \"zero\" as the export with the damage zeroed", function()
        local img = assert(qcow2.open(path))
        local want = h.sha256(zeroed(base.raw, k.corrupt))
        local sum, ranges = img:digest("sha256", { on_error = "zero" })
        assert.are.equal(want, sum)
        assert.are.equal(#k.corrupt, #ranges)
        for i, r in ipairs(k.corrupt) do
          assert.are.equal(r[1], ranges[i].start)
          assert.are.equal(r[2], ranges[i].length)
          assert.matches(k.why, ranges[i].reason)
        end
        local plain, msg, code = img:digest()
        if #k.corrupt == 0 then
          assert.are.equal(h.sha256(base.raw), plain)
        else
          assert.is_nil(plain)
          assert.are.equal("corrupt", code, msg)
          -- a range that misses the damage digests normally
          local r = intact(k.corrupt)[1]
          assert.are.equal(h.sha256(base.raw:sub(r[1] + 1, r[1] + r[2])),
            img:digest("sha256", r[1], r[2]))
        end
        img:close()
      end)

      it("is checked as qemu-img check counts it", function()
        local img = assert(qcow2.open(path))
        local res = assert(img:check())
        local oracle = assert(h.check_json(path))
        assert.are.equal(oracle.corruptions or 0, res.corruptions)
        assert.are.equal(oracle.leaks or 0, res.leaks)
        assert.is_true(res.corruptions > 0)
        img:close()
      end)
    end)
  end

  it("digest pieces of one damaged unit cut by its chunks are one range", function()
    -- a 16 MiB L1 range unreadable: more than one 4 MiB digest chunk
    local dir = h.tmpdir()
    local p = dir .. "/big.qcow2"
    h.create(p, 64 * MiB)        -- 64 KiB clusters: one L1 entry maps 512 MiB
    h.qemu_io(p, { "write -P 0x66 0 64k" })
    put64(p, l1_entry_at(p, 0), COPIED | FAR)
    local img = assert(qcow2.open(p))
    local sum, ranges = img:digest("sha256", 1000, 20 * MiB, { on_error = "zero" })
    assert.are.equal(h.sha256(("\0"):rep(20 * MiB)), sum)
    assert.are.equal(1, #ranges)
    assert.are.same({ 1000, 20 * MiB }, { ranges[1].start, ranges[1].length })
    img:close()
  end)

  it("maps damage in a backing file as corrupt at its depth", function()
    local dir = h.tmpdir()
    local b = dir .. "/base.qcow2"
    h.copy(bases.plain.path, b)
    put64(b, l2_entry_at(b, 1 * MiB), COPIED | FAR)
    local top = dir .. "/top.qcow2"
    h.create(top, SIZE, "cluster_size=" .. CLUSTER, "base.qcow2")
    h.qemu_io(top, { "write -P 0x77 0 4k" })
    local img = assert(qcow2.open(top))
    local m = assert(img:map())
    local corrupt = {}
    for e in m:extents() do
      if e.type == "corrupt" then corrupt[#corrupt + 1] = { e.start, e.length, e.depth } end
    end
    assert.are.same({ { 1 * MiB, CLUSTER, 1 } }, corrupt)
    local data, msg, code = img:read(1 * MiB, CLUSTER)
    assert.is_nil(data)
    assert.are.equal("corrupt", code, msg)
    assert.matches("base%.qcow2", msg)
    local sum, ranges = img:digest("sha256", { on_error = "zero" })
    local want = zeroed(("\x77"):rep(4 * KiB) .. bases.plain.raw:sub(4 * KiB + 1), { { 1 * MiB, CLUSTER } })
    assert.are.equal(h.sha256(want), sum)
    assert.are.same({ 1 * MiB, CLUSTER }, { ranges[1].start, ranges[1].length })
    img:close()
  end)

  it("maps a 0-byte disk as the one record qemu-img prints", function()
    local dir = h.tmpdir()
    local p = dir .. "/empty.qcow2"
    h.create(p, 0)
    local img = assert(qcow2.open(p))
    local m = assert(img:map())
    assert.are.equal(1, #m)
    assert.are.same({ start = 0, length = 0, type = "unallocated", depth = 0 }, m[1])
    assert.are.same(h.map_json(p), h.json.decode(m:to_json()))
    assert.are.same(h.map_json(p), m:records())
    img:close()
  end)

  it("keeps refusing what QEMU refuses: an unaligned refcount table", function()
    local dir = h.tmpdir()
    local p = dir .. "/unaligned.qcow2"
    h.copy(bases.plain.path, p)
    put64(p, 48, h.get_be64(p, 48) + 512)
    assert.is_false((h.sh("qemu-img info " .. h.q(p))))
    local img, msg, code = qcow2.open(p)
    assert.is_nil(img)
    assert.are.equal("corrupt", code)
    assert.matches("refcount table offset 0x%x+ is not cluster aligned", msg)
  end)

  it("rejects a bad on_error value as misuse", function()
    local img = assert(qcow2.open(bases.plain.path))
    assert.has_error(function() img:digest({ on_error = "ignore" }) end)
    assert.has_error(function() img:digest("sha256", 0, 10, { onerror = "zero" }) end)
    -- "fail" is the default: the plain digest, one value
    assert.are.equal(select("#", img:digest("sha256", { on_error = "fail" })), 1)
    assert.are.equal(img:digest(), img:digest({ on_error = "fail" }))
    img:close()
  end)
end)
