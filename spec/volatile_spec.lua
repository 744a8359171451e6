-- The fault backend's volatile cache, seen through raw writes (one write
-- each, no format in the way): at a power cut the writes issued since the
-- last completed flush are lost (all of them, or each by a seeded coin),
-- file extensions included, while flushed writes stay; flushes are in
-- the io_log; misuse of the option raises.
local h = require("helpers")
local qcow2 = require("qcow2")

local MiB = 1024 * 1024

describe("io = {volatile = ...}", function()
  local dir, path, pristine, size0
  setup(function()
    dir = h.tmpdir()
    pristine = dir .. "/pristine.qcow2"
    h.create(pristine, "1M")
    -- guest data fills the file past 1 MiB: raw writes from 512 KiB on
    -- land in data clusters, over '.' bytes, and leave metadata alone
    h.qemu_io(pristine, { "write -P 0x2e 0 1M" })
    size0 = #h.read_file(pristine)
    assert(size0 > MiB)
  end)
  teardown(h.cleanup)
  before_each(function()
    path = dir .. "/v.qcow2"
    h.copy(pristine, path)
  end)

  -- Open with the plan; the open itself must not write (the cut indexes
  -- below count the raw writes only).
  local function open(io)
    io.trace = true
    local img = assert(qcow2.open(path, { mode = "rw", io = io }))
    assert.are.same({}, img:io_log())
    return img
  end

  local function unit(i) return ("%04d"):format(i):rep(128) end   -- 512 bytes

  it("loses every unflushed write at the cut with \"all\", and keeps the flushed ones", function()
    local img = open({ stop_after_writes = 3, volatile = "all" })
    assert(img:raw_write(600000, "flushed"))
    assert(img:flush())
    assert(img:raw_write(600100, "lost-1"))
    assert(img:raw_write(size0 + MiB, "lost-extension"))   -- grows the file
    assert(img:raw_write(600200, "dropped"))               -- past the cut
    local log = img:io_log()
    img:close()
    local kinds = {}
    for i, r in ipairs(log) do kinds[i] = r.what end
    assert.are.same({ "raw", "flush", "raw", "raw", "raw" }, { table.unpack(kinds, 1, 5) })
    assert.are.equal("flushed", h.peek(path, 600000, 7))
    assert.are.equal(("."):rep(6), h.peek(path, 600100, 6))
    assert.are.equal(("."):rep(7), h.peek(path, 600200, 7))
    assert.are.equal(size0, #h.read_file(path), "the extension was not undone")
  end)

  it("keeps every write before the cut without a volatile cache", function()
    local img = open({ stop_after_writes = 2 })
    assert(img:raw_write(600000, "flushed"))
    assert(img:flush())
    assert(img:raw_write(600100, "kept"))
    assert(img:raw_write(600200, "dropped"))
    img:close()
    assert.are.equal("kept", h.peek(path, 600100, 4))
    assert.are.equal(("."):rep(7), h.peek(path, 600200, 7))
  end)

  it("counts a flush at the cut point as never completed", function()
    local img = open({ stop_after_writes = 1, volatile = "all" })
    assert(img:raw_write(600000, "unflushed"))
    assert(img:flush())          -- the engine believes it; the power is off
    img:close()
    assert.are.equal(("."):rep(9), h.peek(path, 600000, 9))
  end)

  it("loses nothing when the power stays on", function()
    local img = open({ stop_after_writes = 100, volatile = "all" })
    assert(img:raw_write(600000, "never flushed, never cut"))
    img:close()
    assert.are.equal("never flushed, never cut", h.peek(path, 600000, 24))
  end)

  -- 64 unflushed writes of distinct 512-byte units, then the cut: which
  -- of them survived.
  local function survivors(seed)
    h.copy(pristine, path)
    local img = open({ stop_after_writes = 64, volatile = true, seed = seed })
    for i = 1, 64 do assert(img:raw_write(512 * 1024 + i * 512, unit(i))) end
    img:close()
    local kept = {}
    for i = 1, 64 do
      local got = h.peek(path, 512 * 1024 + i * 512, 512)
      if got == unit(i) then kept[#kept + 1] = i
      else assert.are.equal(("."):rep(512), got, "write " .. i .. " half there") end
    end
    return kept
  end

  it("with a seed loses some unflushed writes and keeps others, the same for the same seed", function()
    local a, b = survivors(1), survivors(2)
    assert.is_true(#a > 8 and #a < 56, #a .. " of 64 kept")
    assert.is_true(#b > 8 and #b < 56, #b .. " of 64 kept")
    assert.are_not.same(a, b)
    assert.are.same(a, survivors(1))
  end)

  it("rolls overlapping writes back to the flushed bytes, then redoes the kept ones in order", function()
    -- the same 4 bytes written 40 times: what is left is the flushed value
    -- or the last kept write's, never anything else
    for seed = 1, 6 do
      h.copy(pristine, path)
      local img = open({ stop_after_writes = 41, volatile = true, seed = seed })
      assert(img:raw_write(700000, "base"))
      assert(img:flush())
      for i = 1, 40 do assert(img:raw_write(700000, ("%04d"):format(i))) end
      img:close()
      local got = h.peek(path, 700000, 4)
      assert.is_true(got == "base" or (tonumber(got) and tonumber(got) >= 1 and tonumber(got) <= 40),
                     "seed " .. seed .. ": " .. got)
    end
  end)

  it("undoes an unflushed truncate", function()
    local filled = dir .. "/filled.qcow2"
    h.copy(path, filled)
    -- where make_empty truncates the file, from a traced run
    local img = open({})
    assert(img:make_empty())
    local at, new_size, writes = nil, nil, 0
    for _, r in ipairs(img:io_log()) do
      if r.what ~= "flush" then writes = writes + 1 end
      if r.what == "truncate" and not at then at, new_size = writes, r.offset end
    end
    img:close()
    assert.is_not_nil(at, "make_empty did not truncate")
    assert.is_true(new_size < #h.read_file(filled))
    -- cut right after it: kept by a plain cut, undone by a volatile one
    for _, case in ipairs({ { volatile = nil, kept = true }, { volatile = "all", kept = false } }) do
      h.copy(filled, path)
      img = open({ stop_after_writes = at, volatile = case.volatile })
      img:make_empty()
      img:close()
      local size = #h.read_file(path)
      if case.kept then assert.are.equal(new_size, size)
      else assert.is_true(size > new_size, "truncate to " .. new_size .. " kept") end
      local res, code, out = h.check_json(path)
      assert.is_true((code == 0 or code == 3) and (res.corruptions or 0) == 0, out)
    end
  end)

  it("refuses misuse", function()
    for _, bad in ipairs({
      { volatile = true }, { volatile = "all" }, { volatile = false },
      { stop_after_writes = 3, volatile = "some" }, { stop_after_writes = 3, volatile = 1 },
      { stop_after_writes = 3, seed = 4 }, { stop_after_writes = 3, volatile = true, seed = 1.5 },
      { stop_after_writes = 3, volatile = true, seed = "4" },
      { fail_after_writes = 3, volatile = true },
    }) do
      assert.has_error(function() qcow2.open(path, { mode = "rw", io = bad }) end)
    end
    for _, good in ipairs({
      { stop_after_writes = 3, volatile = true, seed = -7 },
      { stop_after_writes = 3, volatile = "all", trace = true },
      { stop_after_writes = 3, volatile = false },
    }) do
      local img = assert(qcow2.open(path, { mode = "rw", io = good }))
      img:close()
    end
  end)
end)
