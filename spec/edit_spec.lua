-- qcow2.edit: every call on a qemu-img image changes exactly the bytes it
-- names (the file is diffed before and after), qemu-img check/info react
-- as the format says they must, and undo restores the file byte for byte.
local helpers = require("helpers")
local q = helpers.q

-- Offsets (0-based) of every byte that differs between two equal-length files.
local function diff(a, b)
  assert.are.equal(#a, #b, "file length changed")
  local out = {}
  for i = 1, #a do
    if a:byte(i) ~= b:byte(i) then out[#out + 1] = i - 1 end
  end
  return out
end

-- Every differing byte lies in [lo, hi).
local function assert_within(changes, lo, hi, what)
  assert.is_true(#changes > 0, what .. ": nothing changed")
  for _, off in ipairs(changes) do
    assert(off >= lo and off < hi, ("%s: byte 0x%x changed, outside [0x%x, 0x%x)"):format(what, off, lo, hi))
  end
end

local function check_rc(path)
  local ok, _, code = helpers.sh("qemu-img check " .. q(path))
  return ok and 0 or code
end

describe("qcow2.edit", function()
  local qcow2, dir
  setup(function()
    qcow2 = require("qcow2")
    dir = helpers.tmpdir()
  end)
  teardown(helpers.cleanup)

  local n = 0
  local function image(opts, cmds, size)
    n = n + 1
    local p = ("%s/img%d.qcow2"):format(dir, n)
    helpers.create(p, size or "4M", opts)
    if cmds then helpers.qemu_io(p, cmds) end
    return p
  end

  it("reads every header field as qemu-img wrote it, v3 and v2 layouts", function()
    local p = image("cluster_size=16384", { "write -P 1 0 64k" })
    local ed = assert(qcow2.edit(p))
    local h = assert(ed:header())
    local info = helpers.info_json(p)
    assert.are.equal(0x514649fb, h.magic)
    assert.are.equal(3, h.version)
    assert.are.equal(info["virtual-size"], h.size)
    assert.are.equal(info["cluster-size"], 1 << h.cluster_bits)
    assert.are.equal(helpers.get_be64(p, 40), h.l1_table_offset)
    assert.are.equal(4, h.refcount_order)
    assert.are.equal(112, h.header_length)
    assert.are.equal(0, h.compression_type)
    ed:close()
    local v2 = image("compat=0.10")
    ed = assert(qcow2.edit(v2))
    h = assert(ed:header())
    assert.are.equal(2, h.version)
    assert.is_nil(h.incompatible_features)
    assert.is_nil(h.refcount_order)
    ed:close()
  end)

  it("set_header writes only the field's bytes; qemu-img refuses; undo restores", function()
    local p = image(nil, { "write -P 1 0 64k" })
    local before = helpers.read_file(p)
    local ed = assert(qcow2.edit(p))
    local h = ed:header()
    assert.is_true(ed:set_header({ l1_table_offset = h.l1_table_offset + 1 }))
    assert_within(diff(before, helpers.read_file(p)), 40, 48, "l1_table_offset")
    assert.are.equal(h.l1_table_offset + 1, ed:header().l1_table_offset)   -- reads the file, no cache
    assert.is_false(helpers.sh("qemu-img info " .. q(p)))
    assert.is_nil(qcow2.open(p))
    local j = ed:journal()
    assert.are.equal(1, #j)
    assert.are.equal(40, j[1].offset)
    assert.are.equal(before:sub(41, 48), j[1].old)
    assert.are.equal(1, ed:undo())
    assert.are.equal(before, helpers.read_file(p))
    assert.are.equal(0, #ed:journal())
    ed:close()
  end)

  it("feature bits: dirty and corrupt show in qemu-img info, one bit each", function()
    local p = image()
    local before = helpers.read_file(p)
    local ed = assert(qcow2.edit(p))
    assert.is_true(ed:set_feature("incompatible", 0, true))
    local ch = diff(before, helpers.read_file(p))
    assert.are.same({ 79 }, ch)
    assert.are.equal(1, helpers.read_file(p):byte(80) ~ before:byte(80))
    assert.is_true(helpers.info_json(p)["dirty-flag"])
    assert.is_true(ed:set_feature("incompatible", 1, true))
    assert.is_true(helpers.info_json(p)["format-specific"].data.corrupt)
    assert.is_true(ed:set_feature("compatible", 0, true))
    assert.is_true(helpers.info_json(p)["format-specific"].data["lazy-refcounts"])
    assert.are.equal(3, ed:undo(3))
    assert.are.equal(before, helpers.read_file(p))
    ed:close()
  end)

  it("l2: an entry pointed into the refcount table is corruption for qemu-img check", function()
    local p = image(nil, { "write -P 1 0 64k", "write -P 2 1M 64k" })
    local before = helpers.read_file(p)
    local ed = assert(qcow2.edit(p))
    local h = ed:header()
    local old, where = ed:l2(1024 * 1024)
    assert.is_true(old ~= 0 and where > 0)
    assert.are.equal(helpers.get_be64(p, where), old)
    assert.is_true(ed:l2(1024 * 1024, h.refcount_table_offset | (1 << 63)))
    assert_within(diff(before, helpers.read_file(p)), where, where + 8, "l2 entry")
    assert.are.equal(2, check_rc(p))
    ed:undo()
    assert.are.equal(before, helpers.read_file(p))
    assert.are.equal(0, check_rc(p))
    -- an L2 table nobody allocated is reported, not invented
    local v, msg, code = ed:l2(3 * 1024 * 1024 * 1024)
    assert.is_nil(v); assert.are.equal("invalid", code); assert.matches("L1 index", msg)
    ed:close()
  end)

  it("l1: clearing an entry leaks the L2 table and its data for qemu-img check", function()
    local p = image(nil, { "write -P 1 0 64k" })
    local before = helpers.read_file(p)
    local ed = assert(qcow2.edit(p))
    local h = ed:header()
    assert.is_true(ed:l1(0) ~= 0)
    assert.is_true(ed:l1(0, 0))
    assert_within(diff(before, helpers.read_file(p)), h.l1_table_offset, h.l1_table_offset + 8, "l1[0]")
    assert.are.equal(3, check_rc(p))
    local v, _, code = ed:l1(h.l1_size)
    assert.is_nil(v); assert.are.equal("invalid", code)
    ed:undo()
    assert.are.equal(before, helpers.read_file(p))
    ed:close()
  end)

  for _, bits in ipairs({ 1, 4, 16, 64 }) do
    it(("refcount: %d-bit entries, one entry changed; qemu-img sees the leak"):format(bits), function()
      -- discarding the first data cluster leaves a free cluster inside the file
      local p = image("refcount_bits=" .. bits .. ",cluster_size=4096",
                      { "write -P 1 0 8k", "write -P 2 64k 4k", "discard 0 4k" })
      local before = helpers.read_file(p)
      local ed = assert(qcow2.edit(p))
      local h = ed:header()
      local l1_cluster = h.l1_table_offset >> 12
      assert.are.equal(1, ed:refcount(l1_cluster))
      local free
      for c = #before // 4096 - 1, 1, -1 do
        if ed:refcount(c) == 0 then free = c; break end
      end
      assert.is_truthy(free, "no free cluster inside the file")
      assert.is_true(ed:refcount(free, 1))
      local ch = diff(before, helpers.read_file(p))
      assert.are.equal(1, #ch)
      if bits < 8 then
        local b = helpers.read_file(p):byte(ch[1] + 1) ~ before:byte(ch[1] + 1)
        assert.is_true(b & (b - 1) == 0, "more than one bit changed")
      end
      assert.are.equal(1, ed:refcount(free))
      assert.are.equal(3, check_rc(p))
      -- the L1 table's refcount 0: corruption (referenced, not counted)
      assert.is_true(ed:refcount(l1_cluster, 0))
      assert.are.equal(2, check_rc(p))
      if bits < 64 then
        assert.has_error(function() ed:refcount(free, 1 << bits) end)
      end
      ed:undo(2)
      assert.are.equal(before, helpers.read_file(p))
      ed:close()
    end)
  end

  it("extensions: add, delete and set length; a backing name is moved, not overwritten", function()
    local base = image()
    local p = ("%s/ov.qcow2"):format(dir)
    helpers.create(p, "4M", nil, base)
    local before = helpers.read_file(p)
    local ed = assert(qcow2.edit(p))
    local exts = assert(ed:extensions())
    local magics = {}
    for _, e in ipairs(exts) do magics[e.magic] = e end
    assert.is_truthy(magics[0xe2792aca])                       -- backing format
    assert.are.equal("qcow2", magics[0xe2792aca].data)
    assert.is_true(ed:add_extension(0x12345678, "hello"))
    local hdr = assert(qcow2.open(p)):header()
    local found
    for _, e in ipairs(hdr.extensions) do if e.magic == 0x12345678 then found = e.data end end
    assert.are.equal("hello", found)
    assert.are.equal(base, helpers.info_json(p)["backing-filename"])
    -- every change is inside the first cluster, past the fixed header
    -- (and the backing_file_offset field)
    for _, off in ipairs(diff(before, helpers.read_file(p))) do
      assert(off >= 104 or (off >= 8 and off < 16), ("byte 0x%x changed"):format(off))
      assert(off < 65536)
    end
    assert.is_true(ed:del_extension(0x12345678))
    assert.are.equal(base, helpers.info_json(p)["backing-filename"])
    local nf, _, code = ed:del_extension(0x12345678)
    assert.is_nil(nf); assert.are.equal("notfound", code)
    -- a length that runs past the cluster: qemu-img refuses the image
    local mid = helpers.read_file(p)
    assert.is_true(ed:set_extension_length(0xe2792aca, 0xffffff))
    assert_within(diff(mid, helpers.read_file(p)), magics[0xe2792aca].offset + 4,
                  magics[0xe2792aca].offset + 8, "length field")
    local ok, out = helpers.sh("qemu-img info " .. q(p), true)
    assert.is_false(ok)
    assert.matches("extension", out)
    ed:undo(3)
    assert.are.equal(before, helpers.read_file(p))
    ed:close()
  end)

  it("snapshots: fields, names and snapshot L1 entries", function()
    local p = image(nil, { "write -P 1 0 64k" })
    helpers.qemu_img("snapshot -c first " .. q(p))
    helpers.qemu_io(p, { "write -P 2 0 64k" })
    helpers.qemu_img("snapshot -c second " .. q(p))
    helpers.qemu_io(p, { "write -P 3 1M 64k" })     -- the table is not at the end
    local before = helpers.read_file(p)
    local ed = assert(qcow2.edit(p))
    local s0, s1 = assert(ed:snapshot(0)), assert(ed:snapshot(1))
    assert.are.equal("first", s0.name)
    assert.are.equal("second", s1.name)
    assert.are.equal(4 * 1024 * 1024, s0.disk_size)
    assert.are.equal(s0.offset + s0.length, s1.offset)
    -- same length: in place
    assert.is_true(ed:snapshot(0, { name = "FIRST" }))
    assert_within(diff(before, helpers.read_file(p)), s0.offset + 40, s0.offset + s0.length, "name")
    assert.matches("FIRST", helpers.qemu_img("snapshot -l " .. q(p)))
    -- longer: the table after it moves; qemu-img still reads both, cleanly
    assert.is_true(ed:snapshot(0, { name = "a much longer name" }))
    local list = helpers.qemu_img("snapshot -l " .. q(p))
    assert.matches("a much longer name", list)
    assert.matches("second", list)
    assert.are.equal(0, check_rc(p))
    -- an L1 size past QEMU's limit: qemu-img check reports it
    assert.is_true(ed:snapshot(1, { l1_size = 0x7fffffff }))
    assert.are_not.equal(0, check_rc(p))
    ed:undo()
    -- a snapshot L1 entry cleared: its L2 table leaks
    local mid = helpers.read_file(p)
    local l1e = ed:snapshot_l1(0, 0)
    assert.is_true(l1e ~= 0)
    assert.is_true(ed:snapshot_l1(0, 0, 0))
    assert_within(diff(mid, helpers.read_file(p)), s0.l1_table_offset, s0.l1_table_offset + 8, "snapshot l1")
    assert.are.equal(3, check_rc(p))
    local v, _, code = ed:snapshot(2)
    assert.is_nil(v); assert.are.equal("invalid", code)
    ed:undo(3)
    assert.are.equal(before, helpers.read_file(p))
    ed:close()
  end)

  it("extended L2: the subcluster bitmap accessor; alloc and zero together is corruption", function()
    local p = image("extended_l2=on,cluster_size=32768", { "write -P 2 40k 2k" }, "2M")
    local before = helpers.read_file(p)
    local ed = assert(qcow2.edit(p))
    -- 1 KiB subclusters: 40k..42k of cluster 32k are subclusters 8 and 9
    local bm, where = ed:l2_bitmap(32768)
    assert.are.equal(0x300, bm)
    local _, l2where = ed:l2(32768)
    assert.are.equal(l2where + 8, where)
    assert.is_true(ed:l2_bitmap(32768, 0x300 | (0x300 << 32)))
    assert_within(diff(before, helpers.read_file(p)), where, where + 8, "bitmap")
    assert.are.equal(2, check_rc(p))
    ed:undo()
    assert.are.equal(before, helpers.read_file(p))
    ed:close()
    local plain = image()
    ed = assert(qcow2.edit(plain))
    local v, _, code = ed:l2_bitmap(0)
    assert.is_nil(v)
    assert.are.equal("notfound", code)    -- no L2 table yet
    ed:close()
  end)

  it("flags and compressed descriptors decode qemu-img's entries and encode them back", function()
    local p = image("cluster_size=4096", { "write -c -P 3 0 4k", "write -P 4 4k 4k" }, "1M")
    local ed = assert(qcow2.edit(p))
    local c = ed:l2(0)
    local d = qcow2.edit.compressed(c, 12)
    assert.is_true(d.compressed)
    assert.is_false(d.copied)
    assert.is_true(d.offset > 0 and d.offset < #helpers.read_file(p))
    assert.are.equal(c, qcow2.edit.compressed({ offset = d.offset, sectors = d.sectors }, 12))
    local f = qcow2.edit.flags(ed:l2(4096))
    assert.is_true(f.copied)
    assert.is_false(f.compressed)
    assert.are.equal(0, f.offset % 4096)
    assert.are.equal(ed:l2(4096), qcow2.edit.flags(f))
    assert.has_error(function() qcow2.edit.compressed({ offset = 0, sectors = 17 }, 12) end)
    ed:close()
  end)

  it("bitmap directory entries", function()
    local p = image()
    helpers.qemu_img("bitmap --add -f qcow2 " .. q(p) .. " bm0")
    local before = helpers.read_file(p)
    local ed = assert(qcow2.edit(p))
    local b = assert(ed:bitmap(0))
    assert.are.equal("bm0", b.name)
    assert.are.equal(16, b.granularity_bits)
    assert.are.equal(1, b.type)
    assert.is_true(ed:bitmap(0, { flags = b.flags | 1 }))
    assert_within(diff(before, helpers.read_file(p)), b.offset + 12, b.offset + 16, "flags")
    local flags = helpers.info_json(p)["format-specific"].data.bitmaps[1].flags
    assert.are.same({ "in-use", "auto" }, flags)
    ed:undo()
    assert.are.equal(before, helpers.read_file(p))
    local v, _, code = ed:bitmap(1)
    assert.is_nil(v); assert.are.equal("invalid", code)
    ed:close()
  end)

  it("works on images qcow2.open refuses and says what it cannot reach", function()
    local p = image(nil, { "write -P 1 0 64k" })
    local ed = assert(qcow2.edit(p))
    assert.is_true(ed:set_header({ cluster_bits = 40 }))
    assert.is_nil(qcow2.open(p))
    assert.are.equal(40, ed:header().cluster_bits)
    local v, msg, code = ed:l2(0)
    assert.is_nil(v); assert.are.equal("corrupt", code); assert.matches("cluster_bits", msg)
    assert.is_truthy(ed:l1(0))          -- the L1 table needs no geometry
    ed:undo()
    assert.is_true(ed:set_header({ l1_table_offset = 1 << 40 }))
    v, msg, code = ed:l1(0)
    assert.is_nil(v); assert.are.equal("corrupt", code); assert.matches("past the end", msg)
    ed:close()
    local short = dir .. "/short.qcow2"
    helpers.write_file(short, helpers.read_file(p):sub(1, 50))
    ed = assert(qcow2.edit(short))
    v, msg, code = ed:header()
    assert.is_nil(v); assert.are.equal("corrupt", code); assert.is_string(msg)
    ed:close()
  end)

  it("raises on misuse", function()
    local p = image()
    local ed = assert(qcow2.edit(p))
    assert.has_error(function() ed:set_header({ no_such_field = 1 }) end)
    assert.has_error(function() ed:set_header({ version = 1 << 40 }) end)
    assert.has_error(function() ed:set_feature("bogus", 0, true) end)
    assert.has_error(function() ed:set_feature("incompatible", 64, true) end)
    assert.has_error(function() ed:l1(-1) end)
    assert.has_error(function() ed:l2(0.5) end)
    assert.has_error(function() ed:snapshot(0, { bogus = 1 }) end)
    assert.has_error(function() qcow2.edit(p, { bogus = true }) end)
    ed:close()
    assert.has_error(function() ed:header() end)
    local v, _, code = qcow2.edit(dir .. "/missing.qcow2")
    assert.is_nil(v); assert.are.equal("notfound", code)
  end)

  it("read-only editors read but refuse writes with readonly", function()
    local p = image()
    local before = helpers.read_file(p)
    local ed = assert(qcow2.edit(p, { mode = "r" }))
    assert.is_true(ed.read_only)
    assert.are.equal(3, ed:header().version)
    local v, _, code = ed:set_header({ version = 2 })
    assert.is_nil(v); assert.are.equal("readonly", code)
    assert.are.equal(before, helpers.read_file(p))
    ed:close()
  end)

  it("refuses writes with busy while qemu-io holds the image for writing", function()
    local p = image()
    local before = helpers.read_file(p)
    local pidf = dir .. "/qemu-io.pid"
    os.execute(("qemu-io -f qcow2 -c 'sleep 20000' %s >/dev/null 2>&1 & echo $! > %s"):format(q(p), q(pidf)))
    local pid = helpers.read_file(pidf):match("%d+")
    -- wait until qemu-io holds its locks
    local held = false
    for _ = 1, 100 do
      local img, _, c = qcow2.open(p)
      if img then img:close() elseif c == "busy" then held = true; break end
      helpers.sh("sleep 0.05")
    end
    local ed = assert(qcow2.edit(p))
    local v, _, code = ed:set_header({ version = 2 })
    local h = ed:header()
    os.execute("kill " .. pid)
    assert.is_true(held, "qemu-io never held the image")
    assert.is_nil(v); assert.are.equal("busy", code)
    assert.are.equal(3, h.version)
    assert.are.equal(before, helpers.read_file(p))
    ed:close()
  end)
end)
