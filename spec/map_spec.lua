-- Image:map and ClusterMap against `qemu-img map --output=json`.
local h = require("helpers")
local corpus = require("corpus")
local qcow2 = require("qcow2")

local KiB = corpus.KiB

-- The ClusterMap type a qemu-img map record stands for.
local function record_type(r)
  if not r.present then return "unallocated" end
  if r.zero and not r.data then return "zero" end
  if r.data and r.offset == nil then return "compressed" end
  return "data"
end

-- Check that every extent of m agrees with the qemu-img records it
-- overlaps (type and depth), that the extents tile [from, from+len) in
-- order, and return bytes per type.
local function check_extents(m, records, from, len)
  local pos, bytes = from, {}
  assert.is_true(#m >= 1)
  for i = 1, #m do
    local e = m[i]
    assert.are.equal(pos, e.start, ("extent %d starts where the previous ended"):format(i))
    assert.is_true(e.length > 0)
    local e_end = e.start + e.length
    for _, r in ipairs(records) do
      if r.start < e_end and r.start + r.length > e.start then
        local what = ("extent %d [%d,+%d) over qemu [%d,+%d)"):format(i, e.start, e.length, r.start, r.length)
        assert.are.equal(record_type(r), e.type, what .. ": type")
        assert.are.equal(r.depth, e.depth, what .. ": depth")
        if e.type == "data" then
          local at = math.max(e.start, r.start)
          assert.are.equal(r.offset + (at - r.start), e.offset + (at - e.start), what .. ": offset")
        elseif e.type == "compressed" then
          assert.is_true((e.compressed_size or 0) > 0, what .. ": compressed_size")
        end
      end
    end
    bytes[e.type] = (bytes[e.type] or 0) + e.length
    pos = e_end
  end
  assert.are.equal(from + len, pos)
  return bytes
end

-- Bytes per type as qemu-img's records count them.
local function record_bytes(records)
  local bytes = {}
  for _, r in ipairs(records) do
    local t = record_type(r)
    bytes[t] = (bytes[t] or 0) + r.length
  end
  return bytes
end

describe("Image:map", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  -- to_json (C, csrc/lua/map_json.c) is qemu-img's text byte for byte,
  -- and to_json(file) writes that same text.
  local function agrees(path, opts)
    local raw = h.qemu_img("map --output=json " .. h.q(path))
    local want = corpus.records(h.json.decode(raw))
    local img = assert(qcow2.open(path, opts))
    local m = assert(img:map())
    local json = m:to_json()
    assert.are.same(want, corpus.decode_map(json))
    assert.are.equal((raw:gsub("\n$", "")), json)
    local out = dir .. "/map.json"
    local f = assert(io.open(out, "w"))
    assert.is_true(m:to_json(f))
    f:close()
    assert.are.equal(json, h.read_file(out))
    local pieces = {}
    assert.is_true(m:to_json(function(piece) pieces[#pieces + 1] = piece end))
    assert.are.equal(json, table.concat(pieces))
    img:close()
  end

  for _, kind in ipairs(corpus.small_kinds) do
    it("maps " .. kind.name .. " as qemu-img map does", function()
      agrees(kind.build(dir))
    end)
  end

  it("maps a raw <- qcow2 <- qcow2 chain with each layer's depth", function()
    local chain = corpus.chain(dir)
    agrees(chain.top)
    agrees(chain.mid)
  end)

  it("maps overlays on backing files shorter than themselves", function()
    local s = corpus.short_backing(dir)
    agrees(s.top)
    agrees(s.rtop)
  end)

  it("maps an extended-L2 overlay at subcluster granularity", function()
    agrees(corpus.extended_l2_overlay(dir).top)
  end)

  it("maps the active layer of an image with internal snapshots", function()
    agrees((corpus.snapshots(dir)))
  end)

  it("maps a 1 TiB image written near its end", function()
    agrees((corpus.huge(dir)))
  end)

  -- QEMU asks the file about every data cluster of an image it guesses to
  -- be metadata-preallocated (SEEK_DATA/SEEK_HOLE; answers are kept for
  -- the walk): data written in pieces inside clusters, holes between, a
  -- raw backing file with holes of its own.
  it("maps a metadata-preallocated image's holes and a sparse raw backing file as qemu-img", function()
    local pre = dir .. "/prealloc.qcow2"
    h.create(pre, "8M", "preallocation=metadata,cluster_size=65536")
    h.qemu_io(pre, { "write -P 0x11 0 4k", "write -P 0x12 12k 4k", "write -P 0x13 64k 64k",
                     "write -P 0x14 1M 8k", "write -P 0x15 1060k 4k", "write -P 0x16 8188k 4k" })
    agrees(pre)
    local raw = dir .. "/holes.raw"
    h.must("truncate -s 3M " .. h.q(raw))
    h.must("dd if=/dev/urandom of=" .. h.q(raw) .. " bs=4k seek=3 count=2 conv=notrunc 2>/dev/null")
    h.must("dd if=/dev/urandom of=" .. h.q(raw) .. " bs=4k seek=300 count=1 conv=notrunc 2>/dev/null")
    local top = dir .. "/over-holes.qcow2"
    h.create(top, "4M", "cluster_size=4096", "holes.raw", "raw")
    h.qemu_io(top, { "write -P 0x21 16k 4k", "write -P 0x22 2M 4k" })
    agrees(top)
  end)

  it("maps a sub-range at odd offsets like qemu-img map --start-offset --max-length", function()
    local chain = corpus.chain(dir)
    local v512 = corpus.v3(dir, 512)
    local cases = {
      { chain.top, 70001, 300001 }, { chain.top, 0, 4096 }, { chain.top, 4 * 1024 * 1024 - 1, 1 },
      { v512, 1001, 40000 }, { v512, 32767, 2 },
    }
    for _, c in ipairs(cases) do
      local path, off, len = c[1], c[2], c[3]
      local want = corpus.qemu_map(path, ("--start-offset=%d --max-length=%d"):format(off, len))
      local img = assert(qcow2.open(path))
      assert.are.same(want, corpus.decode_map(assert(img:map(off, len)):to_json()),
        ("%s map(%d, %d)"):format(path, off, len))
      img:close()
    end
  end)
end)

describe("ClusterMap", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  local list
  setup(function()
    local chain = corpus.chain(dir)
    list = {
      corpus.v3(dir, 4 * KiB), corpus.compressed(dir, "zlib"), corpus.extended_l2(dir),
      corpus.converted(dir, "zlib", 64 * KiB), chain.top, (corpus.snapshots(dir)),
    }
  end)
  local function each_image(fn)
    for _, path in ipairs(list) do fn(path) end
  end

  it("has extents that tile the disk in order, with qemu-img's types and depths", function()
    each_image(function(path)
      local records = corpus.qemu_map(path)
      local img = assert(qcow2.open(path))
      local m = img:map()
      local bytes = check_extents(m, records, 0, img.size)
      assert.are.same(record_bytes(records), bytes, path)
      img:close()
    end)
  end)

  it("iterates with extents() the same extents as m[i]", function()
    each_image(function(path)
      local img = assert(qcow2.open(path))
      local m = img:map()
      local i = 0
      for e in m:extents() do
        i = i + 1
        assert.are.same(m[i], e)
      end
      assert.are.equal(#m, i)
      img:close()
    end)
  end)

  it("counts bytes per type in stats() as qemu-img's map adds up", function()
    each_image(function(path)
      local want = record_bytes(corpus.qemu_map(path))
      local img = assert(qcow2.open(path))
      local stats = img:map():stats()
      for _, t in ipairs({ "data", "zero", "unallocated", "compressed" }) do
        assert.are.equal(want[t] or 0, stats[t] or 0, path .. ": " .. t)
      end
      img:close()
    end)
  end)

  it("covers only the requested range of map(offset, length)", function()
    local path = corpus.v3(dir, 512)
    local records = corpus.qemu_map(path, "--start-offset=1001 --max-length=40000")
    local img = assert(qcow2.open(path))
    check_extents(img:map(1001, 40000), records, 1001, 40000)
    img:close()
  end)
end)

describe("ClusterMap:to_json", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  -- A bad L2 entry in a file whose name needs JSON escapes: the corrupt
  -- record stands alone and its reason (which names the file) decodes to
  -- the extent's reason.
  it("escapes a corrupt record's reason and keeps it a record of its own", function()
    local path = dir .. '/q"uo\\te.qcow2'
    h.create(path, "1M", "cluster_size=4096")
    h.qemu_io(path, { "write -P 0x11 0 12k" })
    local l2 = h.get_be64(path, h.get_be64(path, 40)) & 0x00fffffffffffe00
    h.poke(path, l2 + 8, h.be64(h.get_be64(path, l2 + 8) | 2))
    local img = assert(qcow2.open(path))
    local m = img:map()
    local json = h.json.decode(m:to_json())
    assert.are.same(m:records(), json)
    assert.are.equal(4, #json)
    assert.is_true(json[2].corrupt)
    assert.are.equal(m[2].reason, json[2].reason)
    assert.truthy(json[2].reason:find(path, 1, true))
    -- the records on either side do not merge across it
    assert.are.same({ 0, 4096, 8192 }, { json[1].start, json[2].start, json[3].start })
    assert.are.equal(4096, json[3].length)
    img:close()
  end)

  it("gives [] for an empty range and qemu-img's one record for a 0-byte disk", function()
    local path = dir .. "/empty.qcow2"
    h.create(path, "0")
    local img = assert(qcow2.open(path))
    assert.are.equal((h.qemu_img("map --output=json " .. h.q(path)):gsub("\n$", "")),
      img:map():to_json())
    img:close()
    local other = corpus.v3(dir, 4 * KiB)
    img = assert(qcow2.open(other))
    assert.are.equal("[]", img:map(4096, 0):to_json())
    img:close()
  end)

  -- Thousands of scattered clusters (host offsets going back and forth,
  -- compressed ones among them): a map of many extents, kept compact.
  local function scattered(path)
    local f = io.open(path)
    if f then f:close(); return path end
    h.create(path, "4G", "cluster_size=4096")
    local cmds, x = {}, 12345
    for i = 1, 3000 do
      x = (x * 1103515245 + 12345) % 2147483648
      local off = (x % (1024 * 1024)) * 4096
      cmds[#cmds + 1] = (i % 50 == 0 and "write -c -P 0x%x %d 4k" or "write -P 0x%x %d 4k")
        :format(1 + i % 200, off)
    end
    cmds[#cmds + 1] = "write -z 1G 64k"
    h.qemu_io(path, cmds)
    return path
  end

  it("to_json(fn) hands qemu-img's text over in pieces, in order; fn's error is raised", function()
    local path = scattered(dir .. "/scattered.qcow2")
    local img = assert(qcow2.open(path))
    local m = img:map()
    local pieces = {}
    assert.is_true(m:to_json(function(piece) pieces[#pieces + 1] = piece end))
    assert.is_true(#pieces > 3, "pieces: " .. #pieces)
    for i = 1, #pieces - 1 do assert.is_true(#pieces[i] >= 65536 and #pieces[i] < 65536 + 512) end
    assert.are.equal((h.qemu_img("map --output=json " .. h.q(path)):gsub("\n$", "")),
      table.concat(pieces))
    assert.are.equal(table.concat(pieces), m:to_json())
    local n = 0
    assert.has_error(function() m:to_json(function() n = n + 1; error("stop here") end) end, "stop here")
    assert.are.equal(1, n)
    -- the map is still whole after the error
    assert.are.equal(table.concat(pieces), m:to_json())
    img:close()
  end)

  it("m[i] in any order gives the extents of an in-order walk", function()
    local path = scattered(dir .. "/scattered.qcow2")
    local img = assert(qcow2.open(path))
    local m = img:map()
    local walk = {}
    for e in m:extents() do walk[#walk + 1] = e end
    assert.is_true(#walk > 3000)
    assert.are.equal(#walk, #m)
    local compressed = 0
    for i = #walk, 1, -1 do
      assert.are.same(walk[i], m[i])
      if walk[i].type == "compressed" then compressed = compressed + 1 end
    end
    assert.is_true(compressed > 0)
    local x = 7
    for _ = 1, 2000 do
      x = (x * 1103515245 + 12345) % 2147483648
      local i = 1 + x % #walk
      assert.are.same(walk[i], m[i])
    end
    assert.is_nil(m[0])
    assert.is_nil(m[#walk + 1])
    -- extents tile the disk
    local at = 0
    for _, e in ipairs(walk) do
      assert.are.equal(at, e.start)
      at = at + e.length
    end
    assert.are.equal(img.size, at)
    img:close()
  end)

  it("refuses what is not an open file", function()
    local img = assert(qcow2.open(corpus.v3(dir, 4 * KiB)))
    local m = img:map()
    assert.has_error(function() m:to_json(42) end)
    assert.has_error(function() m:to_json({}) end)
    assert.has_error(function() m:to_json("path") end)
    local f = assert(io.open(dir .. "/closed.json", "w"))
    f:close()
    assert.has_error(function() m:to_json(f) end)
    img:close()
  end)

  it("reports a failing write as nil, message, io", function()
    local f = io.open("/dev/full", "w")
    if not f then return pending("no /dev/full") end
    local img = assert(qcow2.open(corpus.v3(dir, 4 * KiB)))
    local ok, msg, code = img:map():to_json(f)
    f:close()
    assert.is_nil(ok)
    assert.are.equal("io", code)
    assert.matches("map's JSON", msg)
    img:close()
  end)
end)
