-- Guest writes through the library, judged by qemu-img: every image the
-- library writes passes `qemu-img check` with no corruption and no leak,
-- `qemu-img compare` finds it identical to a raw model that received the
-- same operations, and the library reads the model back. The option
-- matrix is sampled (every pair of option values at least once) for
-- `make test` and run whole under QCOW2_SWEEP=full (`make sweep`).
local h = require("helpers")
local model = require("model")
local qcow2 = require("qcow2")

local FULL = os.getenv("QCOW2_SWEEP") == "full"
local KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

-- Byte strings compared with a readable failure: the first differing
-- offset and the bytes there, not megabytes of binary.
local function same_bytes(expected, got, what)
  if expected == got then return end
  local at = 1
  while at <= #expected and expected:byte(at) == (got or ""):byte(at) do at = at + 1 end
  error(("%sbytes differ at +%d: expected 0x%02x, got %s (lengths %d and %s)"):format(
    what and (what .. ": ") or "", at - 1, expected:byte(at) or 0,
    got and got:byte(at) and ("0x%02x"):format(got:byte(at)) or "nothing",
    #expected, got and #got or "nil"), 2)
end

-- A disk of a few MiB with a last cluster that is partial for the large
-- cluster sizes; small clusters get many L2 tables and refcount blocks.
local DISK = 4 * MiB + 3 * 512

-- The backing file of the overlay cases: a qcow2 of the disk's size with
-- patterns here and there, and its guest bytes as raw for the model.
local function make_backing(dir, size)
  local base = dir .. "/base.qcow2"
  h.create(base, size, "cluster_size=65536")
  h.qemu_io(base, {
    "write -P 0xb1 0 300k",
    "write -P 0xb2 1000000 70000",
    ("write -P 0xb3 %d 5000"):format(size - 5000),
    "write -P 0xb4 2M 512k",
  })
  local raw = dir .. "/base.raw"
  h.qemu_img("convert -O raw " .. h.q(base) .. " " .. h.q(raw))
  return base, raw
end

-- Run `ops` on a library-created image of `case` and judge the result.
-- Returns nothing; every step asserts.
local function run_case(case, ops)
  local dir = h.tmpdir()
  local path = dir .. "/disk.qcow2"
  local size = case.size or DISK
  local opts = {
    size = size, version = case.version, cluster_size = case.cs,
    refcount_bits = case.rb, lazy_refcounts = case.lazy or nil,
    preallocation = case.prealloc,
  }
  local base_raw
  if case.backing then
    local _
    _, base_raw = make_backing(dir, size)
    opts.backing_file, opts.backing_format = "base.qcow2", "qcow2"
  end
  local img = assert(qcow2.create(path, opts))
  local m = model.new(dir .. "/model.raw", size, {
    base = base_raw, cluster_size = case.cs, version = case.version })
  local function reopen() return assert(qcow2.open(path, { mode = "rw" })) end
  for i, op in ipairs(ops) do
    local ok, msg, code
    img, ok, msg, code = model.apply_library(img, op, reopen)
    if op.kind ~= "reopen" then
      model.assert_op(i, op, ok, msg, code, case.version or 3, case.backing)
    end
    m:apply(op)
  end
  img:close()

  local clean, _, code, out = model.check(path)
  assert.is_true(clean, "qemu-img check (exit " .. tostring(code) .. "):\n" .. out)
  local same, cmp = m:compare(path)
  assert.is_true(same, "qemu-img compare with the model:\n" .. cmp)
  local ro <close> = assert(qcow2.open(path))
  assert(m:verify(ro))
  m:close()
end

-- ---- The option matrix --------------------------------------------------

local DIMENSIONS = { "version", "cs", "rb", "lazy", "prealloc", "backing" }

local function full_matrix()
  local cases = {}
  for _, version in ipairs({ 2, 3 }) do
    for _, cs in ipairs({ 512, 4 * KiB, 64 * KiB, 2 * MiB }) do
      for _, rb in ipairs(version == 3 and { 1, 2, 8, 16, 64 } or { 16 }) do
        for _, lazy in ipairs(version == 3 and { false, true } or { false }) do
          for _, prealloc in ipairs({ "off", "metadata" }) do
            for _, backing in ipairs({ false, true }) do
              -- qemu-img refuses a backing file with preallocation
              -- (unless extended_l2)
              if not (backing and prealloc ~= "off") then
                cases[#cases + 1] = { version = version, cs = cs, rb = rb,
                  lazy = lazy, prealloc = prealloc, backing = backing }
              end
            end
          end
        end
      end
    end
  end
  return cases
end

-- Greedy pairwise sample: cases chosen until every pair of values of two
-- dimensions that the full matrix holds appears in one chosen case.
local function pairwise(cases)
  local function pairs_of(c)
    local list = {}
    for i = 1, #DIMENSIONS do
      for j = i + 1, #DIMENSIONS do
        list[#list + 1] = ("%s=%s,%s=%s"):format(DIMENSIONS[i], tostring(c[DIMENSIONS[i]]),
                                               DIMENSIONS[j], tostring(c[DIMENSIONS[j]]))
      end
    end
    return list
  end
  local uncovered, left = {}, 0
  for _, c in ipairs(cases) do
    for _, p in ipairs(pairs_of(c)) do
      if not uncovered[p] then uncovered[p] = true; left = left + 1 end
    end
  end
  local chosen, used = {}, {}
  while left > 0 do
    local best, best_gain
    for i, c in ipairs(cases) do
      if not used[i] then
        local gain = 0
        for _, p in ipairs(pairs_of(c)) do if uncovered[p] then gain = gain + 1 end end
        if not best_gain or gain > best_gain then best, best_gain = i, gain end
      end
    end
    used[best] = true
    chosen[#chosen + 1] = cases[best]
    for _, p in ipairs(pairs_of(cases[best])) do
      if uncovered[p] then uncovered[p] = nil; left = left - 1 end
    end
  end
  return chosen
end

local function case_name(c)
  return ("v%d, %d-byte clusters, %d-bit refcounts%s%s%s"):format(
    c.version, c.cs, c.rb, c.lazy and ", lazy refcounts" or "",
    c.prealloc ~= "off" and (", preallocation " .. c.prealloc) or "",
    c.backing and ", over a backing file" or "")
end

describe("random writes over the option matrix", function()
  teardown(function() h.cleanup() end)
  local all = full_matrix()
  local cases = FULL and all or pairwise(all)
  for index, case in ipairs(cases) do
    it(case_name(case) .. ": check is clean, compare is identical, the model reads back", function()
      local ops = model.random_ops(index * 101 + case.cs % 977, case.size or DISK, case.cs,
                                   { count = FULL and 80 or 40,
                                     compressed = case.prealloc == "off" })
      run_case(case, ops)
    end)
  end
end)

-- ---- Method contract --------------------------------------------------------

describe("Image write methods", function()
  local dir, path, img
  before_each(function()
    dir = h.tmpdir()
    path = dir .. "/disk.qcow2"
    img = assert(qcow2.create(path, { size = 1 * MiB }))
  end)
  after_each(function()
    if img then img:close() end
    h.cleanup()
  end)

  it("return true on success and read back what they wrote", function()
    assert.is_true(img:write(1000, "hello"))
    assert.is_true(img:write_zeroes(1002, 2))
    assert.is_true(img:write_zeroes(64 * KiB, 64 * KiB, { unmap = true }))
    assert.is_true(img:discard(128 * KiB, 64 * KiB))
    assert.is_true(img:write_compressed(192 * KiB, ("z"):rep(64 * KiB)))
    assert.is_true(img:flush())
    assert.are.equal("he\0\0o", img:read(1000, 5))
    same_bytes(("z"):rep(64 * KiB), img:read(192 * KiB, 64 * KiB))
  end)

  it("accept empty writes", function()
    assert.is_true(img:write(5, ""))
    assert.is_true(img:write_zeroes(5, 0))
    assert.is_true(img:discard(5, 0))
    assert.is_true(img:write(1 * MiB, ""))
  end)

  it("refuse ranges outside the disk with invalid and write nothing", function()
    for _, call in ipairs({
      function() return img:write(1 * MiB - 2, "abc") end,
      function() return img:write_zeroes(1 * MiB, 1) end,
      function() return img:discard(2 * MiB, 512) end,
      function() return img:write_compressed(1 * MiB, ("c"):rep(64 * KiB)) end,
    }) do
      local ok, msg, code = call()
      assert.is_nil(ok)
      assert.are.equal("invalid", code)
      assert.matches("disk.qcow2", msg, 1, true)
    end
    img:close(); img = nil
    assert.is_true((model.check(path)))
    for _, extent in ipairs(h.map_json(path)) do assert.is_false(extent.data) end
  end)

  it("refuse a compressed write that is not one aligned cluster with invalid", function()
    for _, args in ipairs({ { 1000, ("c"):rep(64 * KiB) }, { 0, ("c"):rep(1000) },
                            { 0, ("c"):rep(128 * KiB) } }) do
      local ok, _, code = img:write_compressed(args[1], args[2])
      assert.is_nil(ok)
      assert.are.equal("invalid", code)
    end
  end)

  it("write the disk's last, partial cluster compressed", function()
    img:close()
    img = assert(qcow2.create(path, { size = 100 * KiB, overwrite = true }))
    local tail = ("t"):rep(100 * KiB - 64 * KiB)
    assert.is_true(img:write_compressed(64 * KiB, tail))
    same_bytes(tail, img:read(64 * KiB, #tail))
    img:close(); img = nil
    assert.is_true((model.check(path)))
    local m = h.map_json(path)
    assert.is_true(#m >= 1)
  end)

  it("raise on wrong argument types and negative offsets or lengths", function()
    assert.has_error(function() img:write(-1, "a") end, "bad argument #1 to 'write' (negative offset -1)")
    assert.has_error(function() img:write_zeroes(0, -5) end, "bad argument #2 to 'write_zeroes' (negative length -5)")
    assert.has_error(function() img:write({}, "x") end)
    assert.has_error(function() img:write(0.5, "x") end)
    assert.has_error(function() img:write(0, {}) end)
    assert.has_error(function() img:write(0) end)
    assert.has_error(function() img:write_zeroes(0, 512, { unmap = "yes" }) end)
    assert.has_error(function() img:write_zeroes(0, 512, true) end)
    assert.has_error(function() img:discard(0) end)
    assert.has_error(function() img:resize("big") end)
    assert.has_error(function() img:raw_write(0, {}) end)
    assert.has_error(function() img.write(io.stdout, 0, "x") end)
  end)

  it("raise on a closed image", function()
    img:close()
    assert.has_error(function() img:write(0, "x") end, "attempt to use a closed image")
    assert.has_error(function() img:flush() end, "attempt to use a closed image")
    assert.has_error(function() img:io_log() end, "attempt to use a closed image")
    img = nil
  end)

  it("refuse with readonly on a read-only handle, its backing image and snapshot views", function()
    img:close()
    h.qemu_img("snapshot -c s1 " .. h.q(path))
    local ro = assert(qcow2.open(path))
    for _, call in ipairs({
      function() return ro:write(0, "x") end,
      function() return ro:write_zeroes(0, 512) end,
      function() return ro:discard(0, 65536) end,
      function() return ro:write_compressed(0, ("c"):rep(65536)) end,
      function() return ro:resize(2 * MiB) end,
      function() return ro:raw_write(0, "x") end,
    }) do
      local ok, _, code = call()
      assert.is_nil(ok)
      assert.are.equal("readonly", code)
    end
    assert.is_true(ro:flush())
    ro:close()
    local rw = assert(qcow2.open(path, { mode = "rw" }))
    local view = assert(rw:snapshots()[1]:open())
    local ok, _, code = view:write(0, "x")
    assert.is_nil(ok)
    assert.are.equal("readonly", code)
    view:close()
    rw:close()
    img = nil

    local top = dir .. "/top.qcow2"
    img = assert(qcow2.create(top, { size = 1 * MiB, backing_file = "disk.qcow2",
                                     backing_format = "qcow2" }))
    ok, _, code = img:backing():write(0, "x")
    assert.is_nil(ok)
    assert.are.equal("readonly", code)
    assert.is_true(img:write(0, "x"))
  end)

  it("keep img.size in step with resize", function()
    assert.is_true(img:resize(3 * MiB))
    assert.are.equal(3 * MiB, img.size)
    assert.is_true(img:write(3 * MiB - 3, "end"))
    assert.is_true(img:resize(2 * MiB))
    assert.are.equal(2 * MiB, img.size)
    assert.has_error(function() img:resize(-1) end, "bad argument #1 to 'resize' (negative size -1)")
    assert.are.equal(2 * MiB, img.size)
  end)

  it("read and write the image file itself with raw_read and raw_write", function()
    assert.are.equal("QFI\xfb", img:raw_read(0, 4))
    assert.are.equal(string.pack(">I4", 3), img:raw_read(4, 4))
    -- reads are cut short at the end of the file, as io's are
    local file_size = #h.read_file(path)
    assert.are.equal(10, #img:raw_read(file_size - 10, 100))
    local ok, _, code = img:raw_read(file_size + 1, 1)
    assert.is_nil(ok)
    assert.are.equal("invalid", code)
    -- an unused byte of cluster 0, after the header
    assert.is_true(img:raw_write(60000, "mark"))
    assert.are.equal("mark", img:raw_read(60000, 4))
    img:close(); img = nil
    assert.are.equal("mark", h.peek(path, 60000, 4))
    local ro <close> = assert(qcow2.open(path))
    assert.are.equal("mark", ro:raw_read(60000, 4))
  end)

  it("give an empty io_log without tracing", function()
    assert.is_true(img:write(0, "x"))
    assert.are.same({}, img:io_log())
  end)

  it("record every write with io = {trace = true}", function()
    img:close()
    img = assert(qcow2.open(path, { mode = "rw", io = { trace = true } }))
    assert.is_true(img:write(0, ("a"):rep(4096)))
    assert.is_true(img:flush())
    local log = img:io_log()
    assert.is_true(#log >= 3)
    local kinds = {}
    for _, r in ipairs(log) do
      assert.are.equal("integer", math.type(r.offset))
      assert.is_true(r.length > 0 or r.what == "flush")
      kinds[r.what] = true
    end
    assert.is_true(kinds.data)
    assert.is_true(kinds.l2)
    assert.are.equal("flush", log[#log].what)   -- img:flush() is traced
  end)
end)

describe("open options of read-write handles", function()
  teardown(function() h.cleanup() end)

  it("check the types and values of repair, lazy_refcounts, overlap_check, discard and io", function()
    local dir = h.tmpdir()
    local p = dir .. "/d.qcow2"
    h.create(p, "1M")
    for _, bad in ipairs({
      { repair = "yes" }, { lazy_refcounts = 1 }, { overlap_check = "some" },
      { overlap_check = true }, { discard = "maybe" }, { io = true },
      { io = { fail_after_writes = -1 } }, { io = { fail_after_writes = 1.5 } },
      { io = { fail_after_writes = 3, errno = "EPERM" } }, { io = { errno = "EIO" } },
      { io = { stop_after_writes = "3" } }, { io = { trace = 1 } },
      { io = { fail_after = 3 } },
    }) do
      bad.mode = "rw"
      assert.has_error(function() qcow2.open(p, bad) end)
    end
  end)

  it("accept every documented value", function()
    local dir = h.tmpdir()
    local p = dir .. "/d.qcow2"
    h.create(p, "1M", "lazy_refcounts=on")
    for _, mode in ipairs({ "none", "constant", "cached", "all" }) do
      for _, discard in ipairs({ true, false, "ignore", "off", "unmap", "on" }) do
        local img = assert(qcow2.open(p, { mode = "rw", overlap_check = mode,
                                           discard = discard, lazy_refcounts = false }))
        assert.is_true(img:write(4096, "x"))
        assert.is_true(img:discard(0, 65536))
        img:close()
      end
    end
    assert.is_true((model.check(p)))
  end)

  it("with lazy_refcounts, leave the dirty bit set until close and clean after it", function()
    local dir = h.tmpdir()
    local p = dir .. "/d.qcow2"
    h.create(p, "1M", "lazy_refcounts=on")
    local img = assert(qcow2.open(p, { mode = "rw" }))
    assert.is_true(img:write(0, ("d"):rep(70000)))
    assert.is_true(img:flush())
    assert.are.equal(1, h.get_be64(p, 72) & 1)
    img:close()
    assert.are.equal(0, h.get_be64(p, 72) & 1)
    assert.is_true((model.check(p)))
  end)

  it("with repair, open an image carrying the corrupt bit read-write", function()
    local dir = h.tmpdir()
    local p = dir .. "/d.qcow2"
    h.create(p, "1M")
    h.poke(p, 72, h.be64(2))
    local img, _, code = qcow2.open(p, { mode = "rw" })
    assert.is_nil(img)
    assert.is_not_nil(code)
    img = assert(qcow2.open(p, { mode = "rw", repair = true }))
    img:close()
  end)
end)

-- ---- Other writers before and after ------------------------------------------

describe("images made by qemu-img, written by the library", function()
  teardown(function() h.cleanup() end)
  local variants = {
    { "v3 defaults", "", 3, 65536 },
    { "v2", "compat=0.10", 2, 65536 },
    { "512-byte clusters", "cluster_size=512", 3, 512 },
    { "2 MiB clusters", "cluster_size=2M", 3, 2 * MiB },
    { "1-bit refcounts", "refcount_bits=1", 3, 65536 },
    { "64-bit refcounts, 4 KiB clusters", "refcount_bits=64,cluster_size=4k", 3, 4096 },
    { "lazy refcounts", "lazy_refcounts=on", 3, 65536 },
    { "zstd compression", "compression_type=zstd", 3, 65536 },
    { "extended L2 entries", "extended_l2=on", 3, 65536 },
    { "preallocation=metadata", "preallocation=metadata", 3, 65536 },
    { "preallocation=full", "preallocation=full", 3, 65536 },
  }
  for i, v in ipairs(variants) do
    it(v[1] .. ", with data from qemu-io first, stay consistent", function()
      local dir = h.tmpdir()
      local path = dir .. "/disk.qcow2"
      h.create(path, DISK, v[2])
      local m = model.new(dir .. "/model.raw", DISK, { cluster_size = v[4], version = v[3] })
      local before = model.random_ops(500 + i, DISK, v[4], { count = 12, reopen = false,
        compressed = not v[2]:match("preallocation") })
      h.qemu_io(path, model.qemu_io_commands(before, dir))
      for _, op in ipairs(before) do m:apply(op) end
      local img = assert(qcow2.open(path, { mode = "rw" }))
      local ops = model.random_ops(600 + i, DISK, v[4], { count = 30, reopen = false,
        avoid = before, compressed = not v[2]:match("preallocation") })
      for j, op in ipairs(ops) do
        local ok, msg
        img, ok, msg = model.apply_library(img, op)
        assert(ok, ("op %d (%s): %s"):format(j, model.describe(op), tostring(msg)))
        m:apply(op)
      end
      img:close()
      local clean, _, code, out = model.check(path)
      assert.is_true(clean, "qemu-img check (exit " .. tostring(code) .. "):\n" .. out)
      local same, cmp = m:compare(path)
      assert.is_true(same, cmp)
    end)
  end
end)

describe("images made by the library, then written by qemu-io", function()
  teardown(function() h.cleanup() end)
  local variants = {
    { "v3 defaults", {}, 3, 65536 },
    { "v2", { version = 2 }, 2, 65536 },
    { "512-byte clusters with 2-bit refcounts", { cluster_size = 512, refcount_bits = 2 }, 3, 512 },
    { "2 MiB clusters", { cluster_size = 2 * MiB }, 3, 2 * MiB },
    { "lazy refcounts", { lazy_refcounts = true }, 3, 65536 },
    { "zstd compression", { compression_type = "zstd" }, 3, 65536 },
    { "preallocation=metadata, 8-bit refcounts", { preallocation = "metadata", refcount_bits = 8 }, 3, 65536 },
  }
  for i, v in ipairs(variants) do
    it(v[1] .. ": library writes, qemu-io writes, library writes again; all consistent", function()
      local dir = h.tmpdir()
      local path = dir .. "/disk.qcow2"
      local opts = { size = DISK }
      for k, val in pairs(v[2]) do opts[k] = val end
      local img = assert(qcow2.create(path, opts))
      local m = model.new(dir .. "/model.raw", DISK, { cluster_size = v[4], version = v[3] })
      local history = {}
      local compressed = v[2].preallocation == nil
      local function library_round(seed)
        local ops = model.random_ops(seed, DISK, v[4], { count = 20, reopen = false,
                                                         avoid = history, compressed = compressed })
        for _, op in ipairs(ops) do history[#history + 1] = op end
        for j, op in ipairs(ops) do
          local ok, msg
          img, ok, msg = model.apply_library(img, op)
          assert(ok, ("op %d (%s): %s"):format(j, model.describe(op), tostring(msg)))
          m:apply(op)
        end
      end
      library_round(700 + i)
      img:close()
      assert.is_true((model.check(path)))
      local ops = model.random_ops(800 + i, DISK, v[4], { count = 20, reopen = false,
                                                         avoid = history, compressed = compressed })
      for _, op in ipairs(ops) do history[#history + 1] = op end
      h.qemu_io(path, model.qemu_io_commands(ops, dir))
      for _, op in ipairs(ops) do m:apply(op) end
      local clean, _, code, out = model.check(path)
      assert.is_true(clean, "after qemu-io, qemu-img check (exit " .. tostring(code) .. "):\n" .. out)
      img = assert(qcow2.open(path, { mode = "rw" }))
      assert(m:verify(img))
      library_round(900 + i)
      img:close()
      clean, _, code, out = model.check(path)
      assert.is_true(clean, "qemu-img check (exit " .. tostring(code) .. "):\n" .. out)
      local same, cmp = m:compare(path)
      assert.is_true(same, cmp)
    end)
  end
end)

-- ---- Large disks -------------------------------------------------------------------

describe("large disks", function()
  teardown(function() h.cleanup() end)

  it("take random 4 KiB writes anywhere in a 16 GiB disk and pass check", function()
    local dir = h.tmpdir()
    local path = dir .. "/big.qcow2"
    local size = 16 * GiB
    local img = assert(qcow2.create(path, { size = size }))
    local rng = model.rng(16)
    local written = {}
    local count = FULL and 5000 or 600
    for i = 1, count do
      local offset = (rng(size // 4096) - 1) * 4096
      if rng() < 0.3 then offset = offset + rng(4095) end   -- unaligned too
      if offset + 4096 > size then offset = size - 4096 end
      local data = model.data(4096, i)
      assert(img:write(offset, data))
      written[offset] = i
      if i % 200 == 0 then assert.is_true(img:flush()) end
    end
    img:close()
    local clean, _, code, out = model.check(path)
    assert.is_true(clean, "qemu-img check (exit " .. tostring(code) .. "):\n" .. out)
    -- the last writer of every byte: later writes may overlap earlier ones
    local order = {}
    for offset, i in pairs(written) do order[#order + 1] = { offset, i } end
    table.sort(order, function(a, b) return a[2] < b[2] end)
    local ro <close> = assert(qcow2.open(path))
    local expected = {}
    for _, w in ipairs(order) do expected[#expected + 1] = w end
    -- check a sample of writes that no later write touched
    local checked = 0
    for k = #expected, 1, -1 do
      local offset, i = expected[k][1], expected[k][2]
      local clobbered = false
      for later = k + 1, #expected do
        if math.abs(expected[later][1] - offset) < 4096 then clobbered = true; break end
      end
      if not clobbered then
        same_bytes(model.data(4096, i), ro:read(offset, 4096), "write " .. i)
        checked = checked + 1
        if checked >= 100 then break end
      end
    end
    assert.is_true(checked >= 50)
  end)

  -- 64 KiB clusters mean 128 MiB of L2 tables, 20 s (qemu-img takes as
  -- long): the default cluster size runs under QCOW2_SWEEP=full.
  for _, cs in ipairs(FULL and { 2 * MiB, 64 * KiB } or { 2 * MiB }) do
  it(("create 1 TiB with preallocation=metadata and %d-byte clusters, take writes and pass check"):format(cs), function()
    local dir = h.tmpdir()
    local path = dir .. "/huge.qcow2"
    local img = assert(qcow2.create(path, { size = 1 * TiB, preallocation = "metadata",
                                            cluster_size = cs }))
    assert.are.equal(1 * TiB, img.size)
    assert.is_true(img:write(0, "first"))
    assert.is_true(img:write(1 * TiB - 5, "last!"))
    assert.is_true(img:write(333 * GiB + 12345, ("m"):rep(100000)))
    img:close()
    local clean, res, code, out = model.check(path)
    assert.is_true(clean, "qemu-img check (exit " .. tostring(code) .. "):\n" .. out)
    -- every cluster of the disk is mapped (metadata preallocated)
    assert.are.equal(1 * TiB // cs, res["allocated-clusters"])
    local info = h.info_json(path)
    assert.are.equal(1 * TiB, info["virtual-size"])
    local ro <close> = assert(qcow2.open(path))
    assert.are.equal("first", ro:read(0, 5))
    assert.are.equal("last!", ro:read(1 * TiB - 5, 5))
    same_bytes(("m"):rep(100000), ro:read(333 * GiB + 12345, 100000))
  end)
  end
end)

-- ---- Resize ---------------------------------------------------------------------

describe("Image:resize", function()
  teardown(function() h.cleanup() end)
  local variants = {
    { "v3, 64 KiB clusters", { cluster_size = 65536 }, 3, 40 * GiB },
    { "v2, 64 KiB clusters", { cluster_size = 65536, version = 2 }, 2, 40 * GiB },
    { "v3, 512-byte clusters, 1-bit refcounts", { cluster_size = 512, refcount_bits = 1 }, 3,
      FULL and 40 * GiB or 300 * MiB },
    { "v3, 2 MiB clusters", { cluster_size = 2 * MiB }, 3, 40 * GiB },
  }
  for _, v in ipairs(variants) do
    it(v[1] .. ": growing and shrinking keep the data and pass check", function()
      local dir = h.tmpdir()
      local path = dir .. "/disk.qcow2"
      local cs = v[2].cluster_size
      local opts = { size = 3 * MiB }
      for k, val in pairs(v[2]) do opts[k] = val end
      local img = assert(qcow2.create(path, opts))
      local m = model.new(dir .. "/model.raw", 3 * MiB, { cluster_size = cs, version = v[3] })
      local history = {}
      local function run(seed, size)
        local ops = model.random_ops(seed, size, cs, { count = 12, reopen = false, avoid = history })
        for _, op in ipairs(ops) do history[#history + 1] = op end
        for j, op in ipairs(ops) do
          local ok, msg
          img, ok, msg = model.apply_library(img, op)
          assert(ok, ("op %d (%s): %s"):format(j, model.describe(op), tostring(msg)))
          m:apply(op)
        end
      end
      local function judge(what)
        img:close()
        local clean, _, code, out = model.check(path)
        assert.is_true(clean, what .. ": qemu-img check (exit " .. tostring(code) .. "):\n" .. out)
        local same, cmp = m:compare(path)
        assert.is_true(same, what .. ": " .. cmp)
        img = assert(qcow2.open(path, { mode = "rw" }))
      end
      run(41, 3 * MiB)
      -- grow a little (same L1), then far (the L1 table moves)
      for _, size in ipairs({ 3 * MiB + 512, 5 * MiB, v[4] + 7 * 512 }) do
        assert.is_true(img:resize(size))
        assert.are.equal(size, img.size)
        m:resize(size)
        assert.is_true(img:write(size - 3000, model.data(3000, size % 1000)))
        m:write(size - 3000, model.data(3000, size % 1000))
        judge("grown to " .. size)
      end
      -- shrink back below the data, then write again
      for _, size in ipairs({ 2 * MiB + 512, 1 * MiB }) do
        assert.is_true(img:resize(size))
        assert.are.equal(size, img.size)
        m:resize(size)
        judge("shrunk to " .. size)
      end
      run(42, 1 * MiB)
      judge("written after shrinking")
      img:close()
      assert.are.equal(1 * MiB, h.info_json(path)["virtual-size"])
    end)
  end

  it("reads zeroes, not backing data, in the area a grown overlay exposes", function()
    local dir = h.tmpdir()
    local base = dir .. "/base.qcow2"
    h.create(base, "4M")
    h.qemu_io(base, { "write -P 0xaa 0 4M" })
    local path = dir .. "/top.qcow2"
    local img = assert(qcow2.create(path, { size = 1 * MiB, backing_file = "base.qcow2",
                                            backing_format = "qcow2" }))
    assert.is_true(img:resize(3 * MiB))
    same_bytes(("\170"):rep(1000), img:read(1 * MiB - 1000, 1000))
    same_bytes(("\0"):rep(1000), img:read(1 * MiB, 1000))
    img:close()
    assert.is_true((model.check(path)))
    same_bytes(("\0"):rep(2 * MiB), h.raw_bytes(path):sub(1 * MiB + 1))
  end)

  it("resizes an image with internal snapshots and leaves the snapshots as they were", function()
    local dir = h.tmpdir()
    local path = dir .. "/d.qcow2"
    h.create(path, "4M")
    h.qemu_io(path, { "write -P 0x5e 0 4M" })
    h.qemu_img("snapshot -c s1 " .. h.q(path))
    local img = assert(qcow2.open(path, { mode = "rw" }))
    assert.is_true(img:resize(2 * MiB))
    assert.is_true(img:resize(6 * MiB))
    same_bytes(("\94"):rep(4096), img:read(2 * MiB - 4096, 4096))
    same_bytes(("\0"):rep(4096), img:read(2 * MiB, 4096))
    img:close()
    assert.is_true((model.check(path)))
    -- qemu-img shows a snapshot at the disk's current size
    same_bytes(("\94"):rep(4 * MiB) .. ("\0"):rep(2 * MiB), h.raw_bytes(path, "s1"))
    local ro <close> = assert(qcow2.open(path))
    local view <close> = assert(ro:snapshot("s1"):open())
    assert.are.equal(4 * MiB, view.size)
    same_bytes(("\94"):rep(4 * MiB), view:read(0, 4 * MiB))
  end)
end)
