-- img:bitmaps() and bm:extents(): persistent dirty bitmaps made and
-- dirtied by qemu-img/qemu-io 7.2 (qemu-io loads the image's enabled
-- bitmaps, dirties them on every write and stores them on close), read
-- back and compared with qemu-img info and with the ranges the writes
-- allocated (qemu-img map), rounded out to each bitmap's granularity. And
-- every bitmap table entry validated before the iteration starts.
local h = require("helpers")
local corpus = require("corpus")
local qcow2 = require("qcow2")

local KiB, MiB, GiB = corpus.KiB, corpus.MiB, corpus.GiB

local function collect(bm)
  local out = {}
  for e in assert(bm:extents()) do out[#out + 1] = { start = e.start, length = e.length } end
  return out
end

-- qemu-img map's allocated ranges of the top image (data or zero written
-- there), rounded out to `gran` and merged: the dirty ranges of a bitmap
-- enabled before every write of a fresh image.
local function oracle(path, gran, size)
  local out = {}
  for _, e in ipairs(h.map_json(path)) do
    if e.depth == 0 and e.present then
      local s = e.start // gran * gran
      local t = math.min((e.start + e.length + gran - 1) // gran * gran, size)
      local last = out[#out]
      if last and last.start + last.length >= s then
        last.length = math.max(last.length, t - last.start)
      else
        out[#out + 1] = { start = s, length = t - s }
      end
    end
  end
  return out
end

-- The bitmap directory's entries, parsed by hand from the extension.
local function directory(path)
  local img = assert(qcow2.open(path))
  local ext
  for _, e in ipairs(img:header().extensions) do
    if e.magic == 0x23852875 then ext = e.data end
  end
  img:close()
  local n, _, dir_size, dir_offset = string.unpack(">I4I4I8I8", ext)
  local entries, pos = {}, dir_offset
  for _ = 1, n do
    local raw = h.peek(path, pos, 24)
    local t_off, t_size, flags, _, _, name_size, extra = string.unpack(">I8I4I4BBI2I4", raw)
    entries[#entries + 1] = {
      at = pos, table_offset = t_off, table_size = t_size, flags = flags,
      name = h.peek(path, pos + 24 + extra, name_size),
    }
    pos = pos + (24 + extra + name_size + 7) // 8 * 8
  end
  assert(pos - dir_offset <= dir_size)
  return entries
end

describe("Image:bitmaps", function()
  local dir, path
  local size = 64 * MiB
  setup(function()
    dir = h.tmpdir()
    path = dir .. "/bm.qcow2"
    h.create(path, size, "cluster_size=64k")
    h.qemu_img("bitmap --add --granularity 64k " .. h.q(path) .. " b0")
    h.qemu_img("bitmap --add --granularity 1M " .. h.q(path) .. " coarse")
    h.qemu_img("bitmap --add --granularity 64k " .. h.q(path) .. " off")
    h.qemu_img("bitmap --disable " .. h.q(path) .. " off")
    h.qemu_io(path, {
      "write -P 0x11 100k 4k",            -- inside one granule
      "write -P 0x22 10M 200k",           -- several granules
      "write -P 0x33 " .. (20 * MiB - 1000) .. " 3000",  -- across a 1M boundary
      "write -z 30M 64k",
      "write -P 0x44 " .. (size - 512) .. " 512",        -- the last sector
    })
  end)
  teardown(function() h.cleanup() end)

  it("lists the bitmaps with qemu-img info's names, granularities and flags", function()
    local info = h.info_json(path)["format-specific"].data.bitmaps
    local img = assert(qcow2.open(path))
    local list = img:bitmaps()
    assert.are.equal(#info, #list)
    for i, bm in ipairs(list) do
      assert.are.equal(info[i].name, bm.name)
      assert.are.equal(info[i].granularity, bm.granularity)
      assert.are.same(info[i].flags, bm.flags)
    end
    img:close()
  end)

  it("gives the dirty ranges qemu-io's writes made, at each bitmap's granularity", function()
    local img = assert(qcow2.open(path))
    local by_name = {}
    for _, bm in ipairs(img:bitmaps()) do by_name[bm.name] = bm end
    local fine = oracle(path, 64 * KiB, size)
    assert.are.equal(5, #fine)
    assert.are.same(fine, collect(by_name.b0))
    assert.are.same(oracle(path, MiB, size), collect(by_name.coarse))
    assert.are.same({}, collect(by_name.off))     -- disabled: never dirtied
    img:close()
  end)

  it("works on read-only handles, keeps its image alive and refuses a closed one", function()
    local img = assert(qcow2.open(path))
    local bm = img:bitmaps()[1]
    img = nil -- luacheck: ignore 311 (dropped on purpose: the bitmap keeps it alive)
    collectgarbage()
    assert.are.equal(5, #collect(bm))
    local other = assert(qcow2.open(path))
    local b2 = other:bitmaps()[1]
    local iter = assert(b2:extents())
    other:close()
    assert.has_error(function() iter() end)
    assert.has_error(function() b2:extents() end)
    assert.has_error(function() b2.extents(other) end)    -- not a Bitmap
  end)

  it("gives an empty list for an image without bitmaps", function()
    local p = dir .. "/none.qcow2"
    h.create(p, MiB)
    local img = assert(qcow2.open(p))
    assert.are.same({}, img:bitmaps())
    img:close()
  end)

  describe("validates the bitmap table", function()
    local function damaged(name, poke)
      local p = dir .. "/" .. name .. ".qcow2"
      h.copy(path, p)
      local d = directory(p)[1]
      assert.are.equal("b0", d.name)
      poke(p, d)
      return p
    end
    local function extents_of(p)
      local img = assert(qcow2.open(p))
      local r, msg, code = img:bitmaps()[1]:extents()
      img:close()
      return r, msg, code
    end

    it("reads an all-ones entry as a whole dirty cluster of bits", function()
      local p = damaged("ones", function(q, d) h.poke(q, d.table_offset, h.be64(1)) end)
      local img = assert(qcow2.open(p))
      assert.are.same({ { start = 0, length = size } }, collect(img:bitmaps()[1]))
      img:close()
    end)

    it("refuses reserved bits in an entry", function()
      local p = damaged("reserved", function(q, d)
        local e = h.get_be64(q, d.table_offset)
        h.poke(q, d.table_offset, h.be64(e | (1 << 60)))
      end)
      local r, msg, code = extents_of(p)
      assert.is_nil(r)
      assert.are.equal("corrupt", code)
      assert.is_truthy(msg:find("table entry 0", 1, true) and msg:find("reserved", 1, true))
    end)

    it("refuses a data cluster that is unaligned or past the end of the file", function()
      local p = damaged("unaligned", function(q, d)
        h.poke(q, d.table_offset, h.be64(h.get_be64(q, d.table_offset) + 512))
      end)
      local r, msg, code = extents_of(p)
      assert.is_nil(r)
      assert.are.equal("corrupt", code)
      assert.is_truthy(msg:find("not cluster aligned", 1, true))
      p = damaged("pasteof", function(q, d) h.poke(q, d.table_offset, h.be64(1 << 40)) end)
      r, msg, code = extents_of(p)
      assert.is_nil(r)
      assert.are.equal("corrupt", code)
      assert.is_truthy(msg:find("past the end of the file", 1, true))
    end)

    it("refuses the all-ones flag beside an offset", function()
      local p = damaged("onesoff", function(q, d)
        h.poke(q, d.table_offset, h.be64(h.get_be64(q, d.table_offset) | 1))
      end)
      local r, msg, code = extents_of(p)
      assert.is_nil(r)
      assert.are.equal("corrupt", code)
      assert.is_truthy(msg:find("all-ones", 1, true))
    end)

    it("refuses a table size the disk does not need, before reading it", function()
      local p = damaged("tsize", function(q, d) h.poke(q, d.at + 8, h.be32(0x7fffffff)) end)
      local r, msg, code = extents_of(p)
      assert.is_nil(r)
      assert.are.equal("corrupt", code)
      assert.is_truthy(msg:find("table size", 1, true))
    end)

    it("refuses an in-use bitmap as inconsistent", function()
      local p = damaged("inuse", function(q, d) h.poke(q, d.at + 12, h.be32(3)) end)
      local img = assert(qcow2.open(p))
      local bm = img:bitmaps()[1]
      assert.are.same({ "in-use", "auto" }, bm.flags)
      local r, msg, code = bm:extents()
      assert.is_nil(r)
      assert.are.equal("unsupported", code)
      assert.is_truthy(msg:find("in use", 1, true))
      img:close()
    end)
  end)

  it("streams a bitmap over a large disk, granule by granule", function()
    local p = dir .. "/large.qcow2"
    local big = 64 * GiB
    h.create(p, big, "cluster_size=4k")
    h.qemu_img("bitmap --add --granularity 512 " .. h.q(p) .. " fine")
    h.qemu_io(p, { "write -P 1 1000 10", "write -P 2 40G 1536", "write -P 3 " .. (big - 1) .. " 1" })
    local img = assert(qcow2.open(p))
    local bm = img:bitmaps()[1]
    assert.is_true(bm.table_size > 512)   -- more than one chunk of the table
    assert.are.same({
      { start = 512, length = 512 },
      { start = 40 * GiB, length = 1536 },
      { start = big - 512, length = 512 },
    }, collect(bm))
    img:close()
  end)
end)
