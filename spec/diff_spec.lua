-- a:diff(b) against a byte comparison of `qemu-img convert -O raw`
-- exports: between snapshots, between a layer and its backing, between
-- the active disk and a snapshot, across images of different sizes and
-- between unrelated images; and the maps-first promise (a sparse 10 GiB
-- diff reads only the clusters that hold data).
local h = require("helpers")
local corpus = require("corpus")
local qcow2 = require("qcow2")

local KiB, MiB, GiB = corpus.KiB, corpus.MiB, corpus.GiB
local SECTOR = 512

-- The oracle: ranges of 512-byte sectors in which two raw exports differ,
-- merged, the shorter export read as zeroes past its end (qemu-img
-- compare); the last range ends at the larger size.
local function raw_diff(x, y)
  local size = math.max(#x, #y)
  local ranges = {}
  local function byte_block(s, pos, len)
    local b = s:sub(pos + 1, pos + len)
    if #b < len then b = b .. string.rep("\0", len - #b) end
    return b
  end
  local BLOCK = 64 * KiB
  for pos = 0, size - 1, BLOCK do
    local len = math.min(BLOCK, size - pos)
    if byte_block(x, pos, len) ~= byte_block(y, pos, len) then
      for s = pos, pos + len - 1, SECTOR do
        local n = math.min(SECTOR, size - s)
        if byte_block(x, s, n) ~= byte_block(y, s, n) then h.add_range(ranges, s, n) end
      end
    end
  end
  return ranges
end

local function export(path, snapshot, fmt)
  local out = path .. ".oracle.raw"
  local snap = snapshot and (" -l " .. h.q("snapshot.name=" .. snapshot)) or ""
  h.qemu_img("convert" .. (fmt and (" -f " .. fmt) or "") .. " -O raw" .. snap .. " "
    .. h.q(path) .. " " .. h.q(out))
  local data = h.read_file(out)
  os.remove(out)
  return data
end

local function plain(ranges)
  local t = {}
  for i, r in ipairs(ranges) do t[i] = { start = r.start, length = r.length } end
  return t
end

-- a:diff(b) and b:diff(a) both equal the oracle's ranges.
local function assert_diff(a, b, xa, xb)
  local expected = raw_diff(xa, xb)
  local got = assert(a:diff(b))
  assert.are.same(expected, plain(got))
  assert.are.same(expected, plain(assert(b:diff(a))))
  return got
end

describe("Image:diff", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  describe("on internal snapshots", function()
    local path, names, img, raws
    setup(function()
      path, names = corpus.snapshots(dir)
      img = assert(qcow2.open(path))
      raws = { active = export(path) }
      for _, n in ipairs(names) do raws[n] = export(path, n) end
    end)
    teardown(function() img:close() end)

    it("between two snapshots equals a byte comparison of their exports", function()
      for i = 1, #names - 1 do
        local a = assert(img:snapshot(names[i])):open()
        local b = assert(img:snapshot(names[i + 1])):open()
        local got = assert_diff(a, b, raws[names[i]], raws[names[i + 1]])
        assert.is_true(#got > 0)
      end
      -- the first and the third differ in size (4 MiB, 6 MiB)
      local a = img:snapshot(names[1]):open()
      local c = img:snapshot(names[3]):open()
      assert.are_not.equal(a.size, c.size)
      assert_diff(a, c, raws[names[1]], raws[names[3]])
    end)

    it("between the active disk and each snapshot equals a byte comparison", function()
      for _, n in ipairs(names) do
        local v = img:snapshot(n):open()
        assert_diff(img, v, raws.active, raws[n])
      end
    end)

    it("decides clusters shared by a snapshot and the active disk without reading them", function()
      local p = dir .. "/shared.qcow2"
      h.create(p, 8 * MiB, "cluster_size=64k")
      h.qemu_io(p, { "write -P 0x41 0 4M" })
      h.qemu_img("snapshot -c s " .. h.q(p))
      h.qemu_io(p, { "write -P 0x42 1M 1000" })
      local i = assert(qcow2.open(p))
      local ranges, stats = assert(i:diff(i:snapshot("s"):open()))
      assert.are.same({ { start = 1 * MiB, length = 1024 } }, plain(ranges))
      -- only the one cluster the write copied is read, on both sides
      assert.are.equal(2 * 64 * KiB, stats.bytes_read)
      assert.are.equal(8 * MiB - 64 * KiB, stats.bytes_by_map)
      i:close()
    end)
  end)

  describe("along a backing chain", function()
    local paths, raws
    setup(function()
      paths = corpus.chain(dir)
      raws = {
        top = export(paths.top),
        mid = export(paths.mid),
        base = export(paths.base, nil, "raw"),
      }
    end)

    it("between a layer and its backing equals a byte comparison of their exports", function()
      local top = assert(qcow2.open(paths.top))
      local mid = top:backing()
      local base = mid:backing()
      assert_diff(top, mid, raws.top, raws.mid)
      assert_diff(mid, base, raws.mid, raws.base)
      assert_diff(top, base, raws.top, raws.base)
      top:close()
    end)

    it("finds what the backing provides equal without reading it", function()
      local top = assert(qcow2.open(paths.top))
      local _, stats = assert(top:diff(top:backing()))
      -- unallocated in the top: both sides resolve to the same clusters
      assert.is_true(stats.bytes_by_map > 0)
      assert.is_true(stats.bytes_read < 2 * top.size)
      top:close()
    end)

    it("handles backing files shorter than the overlay", function()
      local p = corpus.short_backing(dir)
      local top = assert(qcow2.open(p.top))
      assert_diff(top, top:backing(), export(p.top), export(p.base))
      local rtop = assert(qcow2.open(p.rtop))
      assert_diff(rtop, rtop:backing(), export(p.rtop), export(p.rbase, nil, "raw"))
      top:close()
      rtop:close()
    end)
  end)

  describe("between unrelated images", function()
    it("equals a byte comparison across cluster sizes, compression and zero clusters", function()
      local a = corpus.workload_image(dir, "wa.qcow2", 3 * MiB, 64 * KiB)
      local b = dir .. "/wb.qcow2"
      h.create(b, 3 * MiB, "cluster_size=4k")
      h.qemu_io(b, { "write -P 0x11 0 128k", "write -P 0x5a 1001 2999", "write -P 0x33 256k 64k",
        "write -z 300k 8k", "write -P 0x66 " .. (3 * MiB - 4000) .. " 4000" })
      local c = dir .. "/wc.qcow2"      -- a's disk, every cluster compressed
      h.qemu_img("convert -c -O qcow2 -o cluster_size=16k " .. h.q(a) .. " " .. h.q(c))
      local ia, ib, ic = assert(qcow2.open(a)), assert(qcow2.open(b)), assert(qcow2.open(c))
      local ra, rb = export(a), export(b)
      assert.is_true(#assert_diff(ia, ib, ra, rb) > 0)
      assert.are.same({}, plain(assert_diff(ia, ic, ra, export(c))))
      assert_diff(ib, ic, rb, ra)
      ia:close(); ib:close(); ic:close()
    end)

    it("compares images of different sizes as qemu-img compare does (the shorter reads zeroes)", function()
      local a = dir .. "/size-a.qcow2"
      local b = dir .. "/size-b.qcow2"
      h.create(a, 2 * MiB)
      h.create(b, 5 * MiB)
      h.qemu_io(a, { "write -P 0x01 0 2M" })
      h.qemu_io(b, { "write -P 0x01 0 1M", "write -P 0x00 3M 64k", "write -P 0x07 4M 100" })
      local ia, ib = assert(qcow2.open(a)), assert(qcow2.open(b))
      local got = assert_diff(ia, ib, export(a), export(b))
      -- the zeroes written at 3M equal a's missing tail; the 0x07s do not
      assert.are.same({ { start = 1 * MiB, length = 1 * MiB }, { start = 4 * MiB, length = 512 } },
        plain(got))
      ia:close(); ib:close()
    end)

    it("works on raw images and on an image against itself", function()
      local r = corpus.random_file(dir .. "/odd.raw", 1000000)
      local q = dir .. "/odd.qcow2"
      h.qemu_img("convert -f raw -O qcow2 " .. h.q(r) .. " " .. h.q(q))
      h.qemu_io(q, { "write -P 0x09 500000 1" })
      local ir, iq = assert(qcow2.open(r, { allow_raw = true })), assert(qcow2.open(q))
      assert_diff(ir, iq, export(r, nil, "raw"), export(q))
      local ranges, stats = assert(iq:diff(iq))
      assert.are.same({}, plain(ranges))
      assert.are.equal(0, stats.bytes_read)
      -- two handles of one file share every host cluster
      local again = assert(qcow2.open(q))
      ranges, stats = assert(iq:diff(again))
      assert.are.same({}, plain(ranges))
      assert.are.equal(0, stats.bytes_read)
      ir:close(); iq:close(); again:close()
    end)
  end)

  it("diffs two sparse 10 GiB disks from their maps, reading only clusters with data", function()
    local a, b = dir .. "/big-a.qcow2", dir .. "/big-b.qcow2"
    h.create(a, 10 * GiB)
    h.create(b, 10 * GiB)
    h.qemu_io(a, { "write -P 0x01 1G 64k", "write -P 0x02 5G 4k", "write -P 0x03 9G 64k" })
    h.qemu_io(b, { "write -P 0x01 1G 64k", "write -P 0x02 5G 8k", "write -P 0x04 " .. (9 * GiB + 1000) .. " 10" })
    local ia, ib = assert(qcow2.open(a)), assert(qcow2.open(b))
    local ranges, stats = assert(ia:diff(ib))
    assert.are.same({
      { start = 5 * GiB + 4 * KiB, length = 4 * KiB },
      { start = 9 * GiB, length = 64 * KiB },
    }, plain(ranges))
    -- three clusters on each side, nothing else
    assert.are.equal(6 * 64 * KiB, stats.bytes_read)
    assert.are.equal(10 * GiB - 3 * 64 * KiB, stats.bytes_by_map)
    ia:close(); ib:close()
  end)

  it("reports a damaged image as nil, message, code", function()
    local p = dir .. "/bad.qcow2"
    h.create(p, 4 * MiB)
    h.qemu_io(p, { "write -P 0x01 0 64k" })
    local l1_offset = h.get_be64(p, 40)
    local l2_offset = h.get_be64(p, l1_offset) & 0x00fffffffffffe00
    h.poke(p, l2_offset, h.be64((1 << 63) | (0x7ff << 9)))   -- data offset not cluster aligned
    local good = dir .. "/good.qcow2"
    h.create(good, 4 * MiB)
    local ib, ig = assert(qcow2.open(p)), assert(qcow2.open(good))
    local r, msg, code = ig:diff(ib)
    assert.is_nil(r)
    assert.are.equal("corrupt", code)
    assert.is_truthy(msg:find("bad.qcow2", 1, true))
    ib:close(); ig:close()
  end)

  it("gives ranges or nil, message, code on randomly damaged images (sampled; make fuzz: more)", function()
    local iterations = math.max(40, (tonumber(os.getenv("QCOW2_FUZZ_ITERATIONS") or "") or 200) // 5)
    local pristine = dir .. "/fz.qcow2"
    h.create(pristine, 2 * MiB, "cluster_size=4k")
    h.qemu_img("bitmap --add --granularity 4k " .. h.q(pristine) .. " fz")
    h.qemu_io(pristine, { "write -P 0x11 0 64k", "write -c -P 0x22 128k 4k", "write -z 256k 8k" })
    h.qemu_img("snapshot -c s " .. h.q(pristine))
    h.qemu_io(pristine, { "write -P 0x33 8k 4k", "write -P 0x44 1M 12k" })
    local bytes = h.read_file(pristine)
    -- the metadata the two calls walk, found by hand: L1, the first L2
    -- table, the snapshot's L1, the bitmap directory, table and data
    local function be64(off) return (string.unpack(">I8", bytes, off + 1)) end
    local l1 = be64(40)
    local snap_l1 = be64(be64(64))                 -- the first entry's L1 offset
    local ext_at = string.unpack(">I4", bytes, 101)  -- extensions follow the header
    local dir_off
    while true do
      local magic, len = string.unpack(">I4I4", bytes, ext_at + 1)
      if magic == 0 then break end
      if magic == 0x23852875 then dir_off = be64(ext_at + 8 + 16) end
      ext_at = ext_at + 8 + (len + 7) // 8 * 8
    end
    local table_off = be64(dir_off)
    local regions = {
      { l1, 8 }, { be64(l1) & 0x00fffffffffffe00, 4096 }, { snap_l1, 8 },
      { dir_off, 32 }, { table_off, 8 }, { be64(table_off) & 0x00fffffffffffe00, 64 },
    }
    local codes = { io = true, corrupt = true, unsupported = true, invalid = true, nomem = true,
                    notfound = true }
    local path = dir .. "/fz-run.qcow2"
    local stats = { diffed = 0, diff_failed = 0, iterated = 0, bitmap_refused = 0 }
    for i = 1, iterations do
      math.randomseed(20261125, i)
      local b = bytes
      for _ = 1, math.random(1, 3) do
        -- a random word, or one flipped bit, in one of the regions
        local r = regions[math.random(#regions)]
        local at = r[1] + math.random(0, r[2] // 8 - 1) * 8
        local word = string.unpack(">I8", b, at + 1)
        if math.random(2) == 1 then
          word = word ~ (1 << math.random(0, 63))
        else
          word = math.random(math.mininteger, math.maxinteger)
        end
        b = b:sub(1, at) .. string.pack(">i8", word) .. b:sub(at + 9)
      end
      h.write_file(path, b)
      local img = qcow2.open(path)
      if img then
        local function outcome(r, msg, code)
          if r == nil then
            assert.is_string(msg, "iteration " .. i)
            assert.is_nil(msg:find("\n", 1, true))
            assert.is_true(codes[code] == true, ("iteration %d: code %s (%s)"):format(i, tostring(code), msg))
          end
        end
        local snaps = img:snapshots()
        if snaps[1] then
          local v = snaps[1]:open()
          if v then
            local r, msg, code = img:diff(v)
            stats[r and "diffed" or "diff_failed"] = stats[r and "diffed" or "diff_failed"] + 1
            outcome(r, msg, code)
          end
        end
        local ok, list = pcall(img.bitmaps, img)
        assert.is_true(ok, list)
        for _, bm in ipairs(list or {}) do
          local it_or_nil, msg, code = bm:extents()
          stats[it_or_nil and "iterated" or "bitmap_refused"] = stats[it_or_nil and "iterated" or "bitmap_refused"] + 1
          if it_or_nil then
            local n = 0
            local iok, ierr = pcall(function() for _ in it_or_nil do n = n + 1 end end)
            -- a read failure mid-loop raises with the one-line message
            assert.is_true(iok or type(ierr) == "string", tostring(ierr))
          else
            outcome(nil, msg, code)
          end
        end
        img:close()
      end
    end
    -- both outcomes of both calls were exercised
    for k, n in pairs(stats) do assert.is_true(n > 0, k .. " never happened") end
  end)

  it("raises on misuse", function()
    local p = dir .. "/m.qcow2"
    h.create(p, 1 * MiB)
    local i = assert(qcow2.open(p))
    assert.has_error(function() i:diff("m.qcow2") end)
    assert.has_error(function() i:diff() end)
    local j = assert(qcow2.open(p))
    j:close()
    assert.has_error(function() i:diff(j) end)
    i:close()
  end)
end)
