-- img:owners(): every byte of the image file attributed once, in file
-- order; data owners agree with qemu-img map; damage is reported, never
-- fatal; nothing is written.
local h = require("helpers")
local corpus = require("corpus")
local qcow2 = h.qcow2()

local KiB, MiB, GiB = corpus.KiB, corpus.MiB, corpus.GiB

local function file_size(path)
  return tonumber((h.stat(path):match("^(%d+)")))
end

-- The ranges cover [0, file size) exactly once, in order.
local function assert_cover(o, path)
  local size = file_size(path)
  local pos = 0
  for i, r in ipairs(o) do
    assert(r.offset == pos, ("%s: range %d starts at %#x, expected %#x"):format(path, i, r.offset, pos))
    assert(r.length > 0, ("%s: range %d is empty"):format(path, i))
    assert(type(r.owner) == "string")
    pos = r.offset + r.length
  end
  assert.are.equal(size, pos)
end

-- The range holding host byte `at` (binary search).
local function owner_at(o, at)
  local lo, hi = 1, #o
  while lo <= hi do
    local mid = (lo + hi) // 2
    local r = o[mid]
    if at < r.offset then hi = mid - 1
    elseif at >= r.offset + r.length then lo = mid + 1
    else return r end
  end
end

-- Every extent qemu-img map shows at depth 0 with a host offset is owned
-- by "data" at the same guest offset (zero-flagged ones too, marked as
-- shadow unless a snapshot reads them); every compressed cluster by a
-- "compressed" stream of that guest cluster.
local function assert_agrees_with_qemu(o, path, cs, has_snapshots)
  local compressed = {}
  for _, r in ipairs(o) do
    if r.owner == "compressed" and r.guest_offset then compressed[r.guest_offset] = r end
  end
  local checked = 0
  for _, e in ipairs(corpus.qemu_map_no_backing(path)) do
    if e.depth == 0 and e.offset then
      local at = e.offset
      while at < e.offset + e.length do
        local r = owner_at(o, at)
        assert(r and r.owner == "data", ("%s: host %#x (guest %#x) owned by %s"):format(
          path, at, e.start + at - e.offset, r and r.owner or "nothing"))
        assert.are.equal(e.start + (at - e.offset), r.guest_offset + (at - r.offset))
        if not e.data and not has_snapshots then assert.is_true(r.shadow, path) end
        if e.data then assert.is_nil(r.shadow) end
        checked = checked + 1
        at = r.offset + r.length
      end
    elseif e.depth == 0 and e.data then
      for g = e.start, e.start + e.length - 1, cs do
        local c = compressed[g - g % cs]
        assert(c, ("%s: compressed guest cluster %#x has no owner"):format(path, g))
      end
      checked = checked + 1
    end
  end
  assert(checked > 0, path .. ": nothing compared")
end

local function geometry_cs(path)
  return h.info_json(path)["cluster-size"]
end

describe("img:owners()", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.cleanup() end)

  for _, kind in ipairs(corpus.small_kinds) do
    it("covers " .. kind.name .. " once and agrees with qemu-img map", function()
      local path = kind.build(dir)
      local img = assert(qcow2.open(path, { backing = false }))
      local o = assert(img:owners())
      assert_cover(o, path)
      local has_snapshots = #img:snapshots() > 0
      assert_agrees_with_qemu(o, path, geometry_cs(path), has_snapshots)
      for _, r in ipairs(o) do
        assert.are_not.equal("overlap", r.owner, r.detail)
        assert.is_nil(r.problems, r.detail)
      end
      img:close()
    end)
  end

  it("names the views reading each cluster on an image with snapshots", function()
    local path, names = corpus.snapshots(dir)
    local img = assert(qcow2.open(path))
    local o = assert(img:owners())
    assert_cover(o, path)
    assert_agrees_with_qemu(o, path, 64 * KiB, true)
    -- each snapshot's own map: every host range it reads lists it
    for _, name in ipairs(names) do
      local view = assert(img:snapshot(name):open())
      for e in view:map():extents() do
        if e.type == "data" and e.depth == 0 then
          local r = owner_at(o, e.offset)
          assert.are.equal("data", r.owner)
          local seen = false
          for _, v in ipairs(r.views) do seen = seen or v == name end
          assert(seen, ("%s: host %#x does not list view %q"):format(path, e.offset, name))
        end
      end
      -- a view's owners are its image's (the same file)
      assert.are.same(o, assert(view:owners()))
      view:close()
    end
    local kinds = {}
    for _, r in ipairs(o) do kinds[r.owner] = true end
    assert.is_true(kinds.snapshot_table and kinds.snapshot_l1 and kinds.l1 and kinds.l2 and true)
    img:close()
  end)

  it("merges contiguous data of one view into one range with its guest range", function()
    local path = dir .. "/seq.qcow2"
    h.create(path, 64 * MiB, "cluster_size=4k")
    h.qemu_io(path, { "write -P 0x61 0 8M" })   -- 2048 clusters, two L2 tables
    local o = assert(qcow2.open(path)):owners()
    local data = {}
    for _, r in ipairs(o) do if r.owner == "data" then data[#data + 1] = r end end
    -- QEMU puts each new L2 table between the data clusters: a few runs
    assert(#data <= 4, "data in " .. #data .. " ranges")
    local total = 0
    for _, r in ipairs(data) do total = total + r.length end
    assert.are.equal(8 * MiB, total)
    assert.matches("^guest 0x0%-", data[1].detail)
  end)

  it("holds on a chain whose top is dirty", function()
    local c = corpus.chain(dir)
    local v = h.get_be64(c.top, 72)
    h.poke(c.top, 72, h.be64(v | 1))        -- dirty bit
    local img = assert(qcow2.open(c.top))
    local o = assert(img:owners())
    assert_cover(o, c.top)
    assert_agrees_with_qemu(o, c.top, 64 * KiB, false)
    local mid = img:backing()
    local om = assert(mid:owners())
    assert_cover(om, c.mid)
    assert_agrees_with_qemu(om, c.mid, 4 * KiB, false)
    local base = assert(mid:backing():owners())
    assert.are.same({ { offset = 0, length = 4 * MiB, owner = "data", guest_offset = 0,
      detail = "raw image: guest data", views = { "active" } } }, base)
    img:close()
  end)

  it("reports an L2 entry past the end of the file and one into the refcount table", function()
    local path = dir .. "/bad.qcow2"
    h.create(path, 4 * MiB, "cluster_size=64k")
    h.qemu_io(path, { "write -P 0x41 0 128k" })
    local img = assert(qcow2.open(path))
    local l1 = img:l1()
    local l2_off = l1[1] & 0x00fffffffffffe00
    local reftable = h.info_json(path) and img:header().refcount_table_offset
    img:close()
    local size = file_size(path)
    h.poke(path, l2_off, h.be64((1 << 63) | (size + 100 * 64 * KiB)))   -- guest 0: past EOF
    h.poke(path, l2_off + 8, h.be64((1 << 63) | reftable))              -- guest 64k: reftable
    img = assert(qcow2.open(path))
    local o = assert(img:owners())
    assert_cover(o, path)
    local l2 = owner_at(o, l2_off)
    assert.are.equal("l2", l2.owner)
    assert.is_table(l2.problems)
    assert.matches("past the end of the file", l2.problems[1])
    local r = owner_at(o, reftable)
    assert.are.equal("overlap", r.owner)
    assert.matches("refcount_table", r.detail)
    assert.matches("data %(guest 0x10000", r.detail)
    -- the unreferenced old data cluster is leaked now
    local leaked = 0
    for _, x in ipairs(o) do if x.owner == "leaked" then leaked = leaked + x.length end end
    assert.are.equal(128 * KiB, leaked)
    img:close()
  end)

  it("reports an L1 entry pointing past the end of the file", function()
    local path = dir .. "/badl1.qcow2"
    h.create(path, 4 * MiB, "cluster_size=64k")
    h.qemu_io(path, { "write -P 0x41 0 64k" })
    local hdr = assert(qcow2.open(path)):header()
    h.poke(path, hdr.l1_table_offset, h.be64((1 << 63) | (1 << 40)))
    local o = assert(assert(qcow2.open(path)):owners())
    assert_cover(o, path)
    local l1 = owner_at(o, hdr.l1_table_offset)
    assert.are.equal("l1", l1.owner)
    assert.matches("L2 table at 0x10000000000 is past the end of the file", l1.problems[1])
  end)

  it("shows a cluster whose refcount was poked up as leaked", function()
    local path = dir .. "/leak.qcow2"
    h.create(path, 4 * MiB, "cluster_size=64k")
    h.qemu_io(path, { "write -P 0x41 0 64k" })
    local size = file_size(path)
    h.truncate(path, size + 64 * KiB)
    local img = assert(qcow2.open(path))
    local block = img:header().refcount_table_offset
    block = h.get_be64(path, block)
    img:close()
    h.poke(path, block + (size // (64 * KiB)) * 2, h.be16(3))
    local o = assert(assert(qcow2.open(path)):owners())
    local last = o[#o]
    assert.are.same({ size, 64 * KiB, "leaked", 3 }, { last.offset, last.length, last.owner, last.refcount })
  end)

  it("writes nothing, on read-only handles", function()
    local path = corpus.compressed(dir, "zlib")
    local before = corpus.fingerprint(path)
    local img = assert(qcow2.open(path))
    assert(img:owners())
    assert(img:residue())
    img:close()
    assert.are.same(before, corpus.fingerprint(path))
  end)

  it("is instant on a 10 GiB sparse image, whatever its virtual size", function()
    local path = dir .. "/sparse.qcow2"
    h.create(path, 10 * GiB, "cluster_size=64k")
    local cmds = {}
    for i = 0, 1999 do cmds[#cmds + 1] = ("write -P 0x%02x %d 4k"):format(i % 255 + 1, i * 5 * MiB) end
    h.qemu_io(path, cmds)
    local img = assert(qcow2.open(path))
    local t0 = os.clock()
    local o = assert(img:owners())
    assert(os.clock() - t0 < 1, "owners took " .. (os.clock() - t0) .. " s")
    assert_cover(o, path)
    local data = 0
    for _, r in ipairs(o) do if r.owner == "data" then data = data + r.length end end
    assert.are.equal(2000 * 64 * KiB, data)
  end)
end)
