-- Bounded work on any input (issue 8, items 3 and 7): what a caller or an
-- image asks for never decides alone how much is allocated; allocation
-- failure is nil, message, "nomem"; and the smaller defects found on the
-- way (a garbled repair message, strerror, the end-of-extensions marker,
-- a ClusterMap that kept its Image alive).
local h = require("helpers")
local hostile = require("hostile")

local KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024

-- The active L1 and L2 entries straight from the file (not through the
-- library): {l1 = {...}, l2 = function(l1_index) -> entries}.
local function tables(path)
  local hd = hostile.header(path)
  local function entry(off) return h.get_be64(path, off) & 0x00fffffffffffe00 end
  local l1 = {}
  for i = 0, hd.l1_size - 1 do l1[i] = entry(hd.l1_table_offset + 8 * i) end
  return hd, l1, function(l2_offset, index) return entry(l2_offset + 8 * index) end
end

describe("Image:load_vmstate", function()
  local qcow2, dir
  setup(function() qcow2 = require("qcow2") end)
  before_each(function() dir = h.tmpdir() end)
  after_each(h.cleanup)

  it("returns \"\" for 1 GiB, 8 GiB and 2^40 bytes of an empty 4 MiB image, allocating nothing", function()
    local p = dir .. "/empty.qcow2"
    h.create(p, 4 * MiB)
    for _, mode in ipairs({ "r", "rw" }) do
      local img = assert(qcow2.open(p, { mode = mode }))
      for _, n in ipairs({ GiB, 8 * GiB, 1 << 40 }) do
        collectgarbage()
        local before = collectgarbage("count")
        local data, msg, code = img:load_vmstate(0, n)
        assert(data, ("%s: %s (%s)"):format(n, tostring(msg), tostring(code)))
        assert.are.equal("", data)
        -- KiB: the 1 GiB string of old would show as 1048576
        assert.is_true(collectgarbage("count") - before < 1024)
      end
      img:close()
    end
  end)

  it("stops at the end of the last VM-state cluster, where the file holds the data", function()
    local p = dir .. "/vm.qcow2"
    h.create(p, 4 * MiB, "cluster_size=64k")
    local img = assert(qcow2.open(p, { mode = "rw" }))
    local state = h.random_bytes(1000, 11)
    assert(img:save_vmstate(0, state))
    -- one 64 KiB cluster holds it: the area ends there
    local got = assert(img:load_vmstate(0, 1 << 40))
    assert.are.equal(64 * KiB, #got)
    assert.is_true(got == state .. ("\0"):rep(64 * KiB - 1000))
    assert.are.equal(state:sub(501), img:load_vmstate(500, 500))
    assert.are.equal(64 * KiB - 60000, #img:load_vmstate(60000, 8 * GiB))
    assert.are.equal("", img:load_vmstate(64 * KiB, 10))
    assert.are.equal("", img:load_vmstate(1 << 50, 10))
    -- a later write moves the end to its cluster's end
    assert(img:save_vmstate(200000, "yy"))
    got = assert(img:load_vmstate(0, 1 << 40))
    assert.are.equal(256 * KiB, #got)
    assert.are.equal("yy", got:sub(200001, 200002))
    assert.is_true(got:sub(64 * KiB + 1, 200000) == ("\0"):rep(200000 - 64 * KiB))
    img:close()

    -- The layout, read from the file: QEMU's vm_state_offset is the end
    -- of what L1 entry 0 maps (64 KiB clusters: 512 MiB), so the state
    -- sits in the L2 table of L1 entry 1; the disk's entry 0 is empty.
    local hd, l1, l2 = tables(p)
    assert.is_true(hd.l1_size >= 2)
    assert.are.equal(0, l1[0])
    assert.are_not.equal(0, l1[1])
    local data0 = l2(l1[1], 0)
    assert.are_not.equal(0, data0)
    assert.is_true(h.peek(p, data0, 1000) == state)
    assert.are.equal(0, l2(l1[1], 1)) -- 64 KiB..128 KiB never written
    local data3 = l2(l1[1], 3)        -- 200000 lies in cluster 3
    assert.are.equal("yy", h.peek(p, data3 + 200000 - 3 * 64 * KiB, 2))
    local _, status, out = h.check_json(p)
    assert.are.equal(0, status, out)
  end)

  it("finds the end in bounded time when a hostile L1 points a million entries at one empty table", function()
    local p = dir .. "/wide.qcow2"
    h.create(p, 4 * MiB, "cluster_size=64k")
    local img = assert(qcow2.open(p, { mode = "rw" }))
    assert(img:save_vmstate(0, "state"))
    img:close()
    -- A new L1 of 2^20 entries at the end of the file: entry 0 and 1 as
    -- they were, every other one pointing at one all-zero cluster.
    local hd, l1 = tables(p)
    local size = hostile.file_size(p)
    local zero_at = (size + 65535) // 65536 * 65536
    local l1_at = zero_at + 65536
    local n = 1 << 20
    local raw = h.read_file(p)
    local parts = { raw, ("\0"):rep(zero_at - #raw), ("\0"):rep(65536) }
    local entries = { h.be64(0), h.be64(l1[1] | (1 << 63)) }
    local filler = h.be64(zero_at)
    for _ = 3, n do entries[#entries + 1] = filler end
    parts[#parts + 1] = table.concat(entries)
    h.write_file(p, table.concat(parts))
    hostile.set(p, "l1_size", n)
    hostile.set(p, "l1_table_offset", l1_at)
    assert(hd.l1_size < n)

    img = assert(qcow2.open(p))
    local t0 = os.clock()
    local got, msg = img:load_vmstate(0, 1 << 40)
    local spent = os.clock() - t0
    img:close()
    assert(got, msg)
    assert.are.equal(64 * KiB, #got)
    assert.are.equal("state", got:sub(1, 5))
    -- each distinct table is searched once: 2^20 searches would take minutes
    assert.is_true(spent < 5, ("took %.1f s"):format(spent))
  end)
end)

-- Allocation failure of a result the caller sized: run in a child whose
-- address space is capped (ulimit -v), or under ASan with its allocation
-- limit, so nothing near the requested size exists.
describe("a result too big for memory", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(h.cleanup)

  local CHILD = [[
local qcow2 = require("qcow2")
local img = assert(qcow2.open(arg[1]))
local function show(tag, ...)
  local v, msg, code = ...
  print(tag, type(v) == "string" and #v or tostring(v), tostring(code), tostring(msg))
end
show("read1g", img:read(0, 1 << 30))
show("read300m", img:read(0, 300 << 20))
show("raw1g", img:raw_read(0, 1 << 30))
show("raw300m", img:raw_read(0, 300 << 20))
show("small", img:read(4096, 4096))
img:close()
]]

  it("is nil, message, \"nomem\" for read and raw_read, and the handle still reads", function()
    -- 2 GiB of guest disk, and a sparse 1.5 GiB file for raw_read
    local p = dir .. "/sparse.qcow2"
    h.create(p, 2 * GiB)
    h.truncate(p, 1536 * MiB)
    local script = dir .. "/child.lua"
    h.write_file(script, CHILD)
    local lua = os.getenv("LUA") or "lua5.4"
    local cmd
    if lua:find("asan", 1, true) then
      -- ulimit -v and ASan's shadow memory do not mix: ASan's own limit
      cmd = ("ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:max_allocation_size_mb=200 %s %s %s")
        :format(lua, h.q(script), h.q(p))
    else
      cmd = ("ulimit -v 450000; %s %s %s"):format(lua, h.q(script), h.q(p))
    end
    local f = assert(io.popen(cmd .. " 2>&1"))
    local out = f:read("a")
    f:close()
    local seen = {}
    for tag, len, code, msg in out:gmatch("(%w+)\t(%S+)\t(%S+)\t([^\n]*)") do
      seen[tag] = { len = len, code = code, msg = msg }
    end
    for _, tag in ipairs({ "read1g", "read300m", "raw1g", "raw300m" }) do
      local r = seen[tag]
      assert(r, tag .. " missing; child said:\n" .. out)
      assert.are.equal("nomem", r.code, tag .. ": " .. out)
      assert.are.equal("nil", r.len)
      assert.matches("sparse%.qcow2: out of memory", r.msg)
    end
    assert(seen.small, out)
    assert.are.equal("4096", seen.small.len)
  end)
end)

describe("a dirty image whose repair fails at open", function()
  local qcow2, dir
  setup(function() qcow2 = require("qcow2") end)
  before_each(function() dir = h.tmpdir() end)
  after_each(h.cleanup)

  it("says why in one clean message", function()
    local p = dir .. "/dirty.qcow2"
    h.create(p, "1M", "lazy_refcounts=on")
    h.sh("ulimit -c 0; qemu-io -c 'write -P 0x33 0 128k' -c abort " .. h.q(p))
    assert.is_true(h.info_json(p)["dirty-flag"])
    local img, msg, code = qcow2.open(p, { mode = "rw", io = { fail_after_writes = 0 } })
    assert.is_nil(img)
    assert.are.equal("io", code)
    local _, prefixes = msg:gsub(p:gsub("%p", "%%%0"), "")
    assert.are.equal(1, prefixes, msg)
    local _, wraps = msg:gsub("cannot repair the dirty image", "")
    assert.are.equal(1, wraps, msg)
    assert.matches("^.*dirty%.qcow2: cannot repair the dirty image: write of [%w_ ]+ at 0x%x+ %(%d+ bytes%) failed: [%w/ ]+$", msg)
  end)
end)

describe("error texts", function()
  it("come from one thread-safe helper: no strerror in the engine", function()
    local f = assert(io.popen("grep -n 'strerror *(' csrc/engine/*.c csrc/lua/*.c"))
    local hits = f:read("a")
    f:close()
    assert.are.equal("", hits)
  end)

  it("still name the system error", function()
    local qcow2 = require("qcow2")
    local img, msg, code = qcow2.create("/nonexistent-dir/x.qcow2", { size = 1 * MiB })
    assert.is_nil(img)
    assert.are.equal("notfound", code)
    assert.matches("No such file or directory", msg)
  end)
end)

describe("the end-of-extensions marker", function()
  local qcow2, dir
  setup(function() qcow2 = require("qcow2") end)
  before_each(function() dir = h.tmpdir() end)
  after_each(h.cleanup)

  -- qemu-img is the oracle: a length that fits in the extension area is
  -- ignored, one that does not is "Header extension too large".
  it("opens exactly when qemu-img opens it", function()
    local base = dir .. "/base.qcow2"
    h.create(base, 4 * MiB)
    local at = hostile.extensions_end(base)
    local area = 65536 - (at + 8)
    for _, len in ipairs({ 0, 1, 8, area, area + 1, 65536, 0xffffffff }) do
      local p = ("%s/end-%d.qcow2"):format(dir, len)
      h.copy(base, p)
      h.poke(p, at + 4, h.be32(len))
      local qemu_ok = h.sh("qemu-img info " .. h.q(p) .. " >/dev/null 2>&1")
      local img, msg, code = qcow2.open(p)
      if img then img:close() end
      assert.are.equal(qemu_ok, img ~= nil,
        ("length %d: qemu-img %s, we %s"):format(len, qemu_ok and "opens" or "refuses", tostring(msg)))
      if not img then
        assert.are.equal("corrupt", code)
        assert.matches("end%-of%-extensions marker", msg)
      end
    end
  end)
end)

describe("a ClusterMap", function()
  local qcow2, dir
  setup(function() qcow2 = require("qcow2") end)
  before_each(function() dir = h.tmpdir() end)
  after_each(h.cleanup)

  -- Descriptors of this process open on path (the shell's parent is us).
  local function fds_on(path)
    local f = assert(io.popen("for l in /proc/$PPID/fd/*; do readlink \"$l\"; done 2>/dev/null"))
    local n = 0
    for line in f:lines() do if line == path then n = n + 1 end end
    f:close()
    return n
  end

  it("does not keep its Image (or its file) alive, and still works after", function()
    local p = dir .. "/m.qcow2"
    h.create(p, 4 * MiB)
    h.qemu_io(p, { "write -P 0x11 0 64k", "write -z 1M 64k" })
    h.qemu_img("snapshot -c s " .. h.q(p))
    local img = assert(qcow2.open(p))
    local m = assert(img:map())
    local sm = assert(img:snapshot("s"):map())
    local weak = setmetatable({ img }, { __mode = "v" })
    assert.are.equal(1, fds_on(p))
    img = nil -- luacheck: ignore
    for _ = 1, 4 do collectgarbage() end
    assert.is_nil(weak[1], "the Image was not collected")
    assert.are.equal(0, fds_on(p))
    assert.are.equal("data", m[1].type)
    assert.are.equal(65536, m[1].length)
    local total = 0
    for e in m:extents() do total = total + e.length end
    assert.are.equal(4 * MiB, total)
    assert.are.equal(65536, m:stats().data)
    assert.are.equal(65536, sm:stats().data)
  end)
end)
