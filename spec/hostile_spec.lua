-- Hostile images: qemu-img images with precise pokes (spec/hostile.lua).
-- Every case must end in the stated nil, message, code (or a clean read of
-- the good ranges), never a crash, a hang or a stray Lua error. The spec
-- finishing its TAP plan is the "no crash, no hang" proof; each case also
-- has a CPU-time budget.
local helpers = require("helpers")
local hostile = require("hostile")

local CASE_BUDGET = 10 -- CPU seconds per case

describe("hostile images", function()
  local qcow2
  setup(function() qcow2 = require("qcow2") end)
  teardown(helpers.cleanup)

  it("has a catalogue of at least 40 cases", function()
    assert.is_true(#hostile.cases >= 40, "only " .. #hostile.cases .. " cases")
    local seen = {}
    for _, c in ipairs(hostile.cases) do
      assert.is_nil(seen[c.name], "duplicate case name " .. c.name)
      seen[c.name] = true
    end
  end)

  -- Controls: the unpoked bases open and read what qemu-io wrote, so that
  -- every failure below is caused by its poke.
  describe("pristine bases", function()
    local kinds = {}
    for k in pairs(hostile.bases) do kinds[#kinds + 1] = k end
    table.sort(kinds)
    for _, kind in ipairs(kinds) do
      it(kind .. " opens, reads and maps cleanly", function()
        local path = hostile.instance(kind)
        local img, msg, code = qcow2.open(path)
        assert(img, ("open: %s (%s)"):format(tostring(msg), tostring(code)))
        local ok, err = pcall(function()
          hostile.check_good(img, hostile.base_contents[kind], kind)
          local m, mmsg = img:map()
          assert(m, "map: " .. tostring(mmsg))
          assert.is_true(#m >= 1)
          local snaps = assert(img:snapshots())
          for _, s in ipairs(snaps) do
            local v = assert(s:open())
            assert(v:read(0, 65536))
            v:close()
          end
        end)
        img:close()
        assert(ok, err)
      end)
    end

    it("a data cluster cut short by end of file reads its tail as zeroes", function()
      local path = hostile.instance("v3")
      local d = hostile.data_offset(path, hostile.G512)
      helpers.truncate(path, d + 4096)
      local img = assert(qcow2.open(path))
      local data, msg = img:read(hostile.G512, 65536)
      img:close()
      assert(data, msg)
      assert.are.equal(string.char(0xa3):rep(4096) .. ("\0"):rep(65536 - 4096), data)
    end)

    it("a v3 header_length of 104 (no compression_type byte) is accepted", function()
      local path = hostile.instance("v3")
      hostile.set(path, "header_length", 104)
      helpers.qemu_io(path, { "read -P 0xa1 0 64k" }) -- the oracle agrees
      local img, msg, code = qcow2.open(path)
      assert(img, ("open: %s (%s)"):format(tostring(msg), tostring(code)))
      local ok, err = pcall(hostile.check_good, img, hostile.base_contents.v3, "v3/104")
      img:close()
      assert(ok, err)
    end)

    it("a compressed stream whose sectors run past end of file reads", function()
      local _, dir = hostile.instance("v3")
      local path = dir .. "/tailz.qcow2"
      helpers.create(path, "1M")
      helpers.qemu_io(path, { "write -c -P 0x5a 0 64k" })
      local coffset, csize = hostile.compressed(path, 0)
      assert(coffset + csize > hostile.file_size(path), "layout: stream sectors inside the file")
      local img = assert(qcow2.open(path))
      local data, msg = img:read(0, 65536)
      img:close()
      assert(data, msg)
      assert.is_true(data == ("\x5a"):rep(65536), "wrong bytes")
    end)

    it("a compressed stream longer than a cluster reads its first cluster", function()
      -- two stored deflate blocks, 65535 + 11 bytes, appended at end of file
      local path = hostile.instance("zlib")
      local h = hostile.header(path)
      local stream = "\0\255\255\0\0" .. ("A"):rep(65535) .. "\1\11\0\244\255" .. ("B"):rep(11)
      local coffset = (hostile.file_size(path) + 511) // 512 * 512
      helpers.poke(path, coffset, stream)
      local x = 70 - h.cluster_bits
      local extra = (coffset + #stream - 1) // 512 - coffset // 512
      hostile.put64(path, (hostile.l2_entry_offset(path, 0)), (1 << 62) | (extra << x) | coffset)
      helpers.qemu_io(path, { "read -P 0x41 0 65535", "read -P 0x42 65535 1" }) -- the oracle agrees
      local img = assert(qcow2.open(path))
      local data, msg, code = img:read(0, 65536)
      img:close()
      assert(data, ("read: %s (%s)"):format(tostring(msg), tostring(code)))
      assert.is_true(data == ("A"):rep(65535) .. "B", "wrong bytes")
    end)

    it("a backing chain 3 deep reads through every level", function()
      local path, dir = hostile.instance("backing")
      local top = dir .. "/top.qcow2"
      helpers.create(top, "1G", nil, "ov.qcow2")
      helpers.qemu_io(top, { "write -P 0xd3 128k 64k" })
      local img = assert(qcow2.open(top))
      local ok, err = pcall(hostile.check_good, img,
        { { 0, 65536, 0xd1 }, { 65536, 65536, 0xd2 }, { 131072, 65536, 0xd3 } }, "chain")
      img:close()
      assert(ok, err)
      assert(path)
    end)
  end)

  local ran = 0
  describe("each case", function()
    for i, c in ipairs(hostile.cases) do
      it(("%02d %s -> %s %s"):format(i, c.name, c.expect.stage,
          type(c.expect.code) == "table" and table.concat(c.expect.code, "|") or c.expect.code),
        function()
          local t0 = os.clock()
          hostile.run(qcow2, c)
          local spent = os.clock() - t0
          assert(spent < CASE_BUDGET, ("case took %.1f s of CPU"):format(spent))
          ran = ran + 1
        end)
    end
  end)

  -- qemu-img 7.2 opens an image whose known header extensions repeat,
  -- each copy overwriting the one before; a copy it would refuse on its
  -- own is refused even when a later one is fine (the hostile cases)
  describe("repeated known header extensions", function()
    local function repeat_ext(p, magic, data)
      local ed = assert(qcow2.edit(p))
      if not data then
        for _, e in ipairs(assert(ed:extensions())) do
          if e.magic == magic then data = e.data end
        end
      end
      assert(ed:add_extension(magic, assert(data, "no extension to repeat")))
      ed:close()
    end
    local function both(p, opts)
      local theirs = helpers.info_json(p)
      local img, msg, code = qcow2.open(p, opts)
      assert(img, ("open: %s (%s)"):format(tostring(msg), tostring(code)))
      local ours = assert(img:info())
      local bitmaps = assert(img:bitmaps())
      img:close()
      return theirs, ours, bitmaps
    end

    it("the backing format: the last copy counts", function()
      local dir = helpers.tmpdir()
      local b, p = dir .. "/base.qcow2", dir .. "/top.qcow2"
      helpers.create(b, "1M")
      helpers.create(p, "1M", nil, "base.qcow2", "qcow2")
      repeat_ext(p, hostile.EXT_BACKING_FORMAT, "raw")
      local theirs, ours = both(p, { backing = false })
      assert.are.equal("raw", theirs["backing-filename-format"])
      assert.are.equal(theirs["backing-filename-format"], ours["backing-filename-format"])
    end)

    it("the external data file name: the last copy counts", function()
      local dir = helpers.tmpdir()
      local p = dir .. "/image.qcow2"
      helpers.create(p, "1M", "data_file=" .. dir .. "/one.raw")
      helpers.write_file(dir .. "/two.raw", "")
      repeat_ext(p, 0x44415441, dir .. "/two.raw")
      local theirs, ours = both(p, { backing = false })
      local want = theirs["format-specific"].data["data-file"]
      assert.are.equal(dir .. "/two.raw", want)
      assert.are.equal(want, ours["format-specific"].data["data-file"])
    end)

    it("the feature-name table and the bitmaps extension, copied", function()
      local dir = helpers.tmpdir()
      local p = dir .. "/image.qcow2"
      helpers.create(p, "1M")
      helpers.qemu_img("bitmap --add " .. helpers.q(p) .. " b0")
      repeat_ext(p, hostile.EXT_FEATURE_TABLE)
      repeat_ext(p, hostile.EXT_BITMAPS)
      local theirs, _, bitmaps = both(p)
      assert.are.equal(1, #theirs["format-specific"].data.bitmaps)
      assert.are.equal(1, #bitmaps)
      assert.are.equal("b0", bitmaps[1].name)
    end)
  end)

  -- QEMU 7.2 only bounds backing_file_offset by the cluster: a name
  -- inside the header leaves no room for extensions, and an empty one
  -- means no backing file (found by examples/fuzz.lua --seed 5, case 130)
  it("a backing_file_offset inside the header opens as qemu-img opens it", function()
    local p = hostile.instance("v3")
    hostile.set(p, "backing_file_offset", 1)
    hostile.set(p, "backing_file_size", 0)
    local theirs = helpers.info_json(p)
    local img, msg, code = qcow2.open(p)
    assert(img, ("open: %s (%s)"):format(tostring(msg), tostring(code)))
    local ours = assert(img:info())
    local r = assert(img:check())
    img:close()
    assert.is_nil(theirs["backing-filename"])
    assert.is_nil(ours["backing-filename"])
    assert.are.same(helpers.check_json(p).corruptions or 0, r.corruptions)
  end)

  it("ran every case to its end (no hang, no crash, no case left)", function()
    -- failing cases do not count: this states how many completed cleanly
    assert.are.equal(#hostile.cases, ran,
      ("%d of %d cases completed as expected"):format(ran, #hostile.cases))
  end)
end)
