-- Power cuts during whole-image operations: snapshot create, apply and
-- delete, amend (downgrade, lazy refcounts, growth), shrinking resize,
-- make_empty, leak and refcount repair, and the repair of a dirty image
-- at open. Each operation is traced once to count its writes, then run
-- on a fresh copy for cut indexes k with io = {stop_after_writes = k}, and
-- with a volatile cache that loses writes since the last completed flush
-- (all, or by a seeded coin). qemu-img check and the library's check must
-- find no corruption after any cut (leaks allowed), and the guest disk
-- must read as before the operation or, where the operation changes it,
-- as after. Sampled for `make test`; every index and several seeds under
-- QCOW2_SWEEP=full.
local h = require("helpers")
local model = require("model")
local crash = require("crash")
local qcow2 = require("qcow2")

local KiB, MiB = 1024, 1024 * 1024
local SAMPLES = 10

describe("a power cut during", function()
  local dir, base, no_snap
  setup(function()
    dir = h.tmpdir()
    -- 2 MiB, 4 KiB clusters: data, a compressed cluster, zero clusters, a
    -- snapshot sharing them, and a rewrite after it (COW of shared data).
    base = dir .. "/base.qcow2"
    h.create(base, 2 * MiB, "cluster_size=4096")
    h.qemu_io(base, { "write -P 0x11 0 256k", "write -c -P 0x22 512k 4k",
                      "write -z 640k 64k", "write -P 0x33 1M 64k" })
    h.qemu_img("snapshot -c old " .. h.q(base))
    h.qemu_io(base, { "write -P 0x55 64k 64k", "write -P 0x66 1536k 32k" })
    no_snap = dir .. "/nosnap.qcow2"
    h.create(no_snap, 2 * MiB, "cluster_size=4096")
    h.qemu_io(no_snap, { "write -P 0x11 0 1M", "write -P 0x44 1792k 128k" })
  end)
  teardown(h.cleanup)

  local function digest(path, length)
    local img <close> = assert(qcow2.open(path))
    return assert(img:digest("sha256", 0, length or img.size)), img.size
  end

  -- Sweep `op` (a function of a read-write Image returning truthy on
  -- success) over the cuts of its writes on copies of `from`. `accept`
  -- (default: the disk as before) judges the guest disk after each cut,
  -- given the path, the digests before and after the uncut operation.
  local function sweep(name, from, op, accept)
    local work = dir .. "/cut.qcow2"
    h.copy(from, work)
    local before = digest(work)
    local img = assert(qcow2.open(work, { mode = "rw", io = { trace = true } }))
    assert(op(img))
    local writes = crash.writes(img:io_log())
    img:close()
    crash.judge(work, name .. " without a cut")
    local after = digest(work)
    assert.is_true(writes > 2, name .. ": only " .. writes .. " writes")
    accept = accept or function(path, b) return digest(path) == b end

    crash.sweep(model.sample_indexes(writes + 1, SAMPLES), function(plan)
      local label = name .. ", " .. crash.describe(plan)
      h.copy(from, work)
      local rw = assert(qcow2.open(work, { mode = "rw", io = plan }))
      op(rw)                        -- results ignored: the machine is "off"
      rw:close()
      crash.judge(work, label)
      assert(accept(work, before, after), label .. ": the guest disk is neither as before nor as after")
    end)
  end

  local function either(path, b, a)
    local d = digest(path)
    return d == b or d == a
  end

  it("snapshot create", function()
    sweep("create_snapshot", base, function(img)
      return img:create_snapshot("new", { vm_state = ("V"):rep(3000) })
    end)
  end)

  it("snapshot apply", function()
    sweep("apply", base, function(img) return img:snapshot("old"):apply() end, either)
  end)

  it("snapshot delete", function()
    sweep("delete", base, function(img) return img:snapshot("old"):delete() end)
  end)

  it("amend to version 2 (zero clusters allocated, a snapshot)", function()
    sweep("amend version 2", base, function(img) return img:amend({ version = 2 }) end)
  end)

  it("amend of lazy refcounts, on then off, with a write between", function()
    sweep("amend lazy_refcounts", no_snap, function(img)
      return img:amend({ lazy_refcounts = true }) and img:write(1500 * KiB, ("L"):rep(20000))
        and img:amend({ lazy_refcounts = false })
    end, function(path)
      -- the write may be lost or not; everything before it stays
      return digest(path, 1500 * KiB) == digest(no_snap, 1500 * KiB)
    end)
  end)

  it("amend of the size (growth)", function()
    sweep("amend size", base, function(img) return img:amend({ size = 5 * MiB }) end,
      function(path)
        local _, size = digest(path)
        local ro <close> = assert(qcow2.open(path))
        return digest(path, 2 * MiB) == digest(base, 2 * MiB)
          and (size == 2 * MiB or size == 5 * MiB and ro:read(2 * MiB, 3 * MiB) == ("\0"):rep(3 * MiB))
      end)
  end)

  it("a shrinking resize", function()
    sweep("resize shrink", no_snap, function(img) return img:resize(768 * KiB) end,
      function(path)
        local _, size = digest(path)
        return (size == 2 * MiB or size == 768 * KiB)
          and digest(path, 768 * KiB) == digest(no_snap, 768 * KiB)
      end)
  end)

  it("a growing resize over a raw data file (the new range preallocated, two groups of tables)", function()
    -- 512-byte clusters: an L2 table maps 32 KiB, so 513 new tables, more
    -- than one group (prealloc.c writes up to 512 tables per barrier)
    local grow = dir .. "/grow.qcow2"
    h.create(grow, 64 * KiB, "cluster_size=512,data_file_raw=on,data_file=" .. dir .. "/grow.data")
    h.qemu_io(grow, { "write -P 0x5c 0 40k", "write -P 0x6d 50k 14k" })
    local old, new = 64 * KiB, 64 * KiB + 513 * 32 * KiB
    sweep("resize grow, raw data file", grow, function(img) return img:resize(new) end,
      function(path)
        local _, size = digest(path)
        local ro <close> = assert(qcow2.open(path))
        return digest(path, old) == digest(grow, old)
          and (size == old or size == new and ro:read(old, new - old) == ("\0"):rep(new - old))
      end)
    -- and the grown image maps the new range 1:1 as qemu-img's would
    local fresh = dir .. "/fresh.qcow2"
    h.copy(grow, fresh)
    do
      local img <close> = assert(qcow2.open(fresh, { mode = "rw" }))
      assert(img:resize(new))
    end
    h.assert_clean(fresh)
    local m = h.map_json(fresh)
    local last = m[#m]
    assert.are.equal(new, last.start + last.length)
    assert.are.equal(last.start, last.offset)
  end)

  it("make_empty", function()
    sweep("make_empty", base, function(img) return img:make_empty() end,
      function(path)
        -- discarded cluster by cluster: each range is old data or zeroes
        local img <close> = assert(qcow2.open(path))
        local old <close> = assert(qcow2.open(base))
        for at = 0, img.size - 1, 4 * KiB do
          local got = img:read(at, 4 * KiB)
          if got ~= old:read(at, 4 * KiB) and got ~= ("\0"):rep(4 * KiB) then return false end
        end
        return true
      end)
  end)

  it("check { repair = \"all\" } of leaked clusters", function()
    -- leaks from a cut of our own: refcounts raised, the L2 entry not written
    local leaky = dir .. "/leaky.qcow2"
    h.copy(no_snap, leaky)
    local img = assert(qcow2.open(leaky, { mode = "rw", io = { trace = true } }))
    assert(img:write(1200 * KiB, ("x"):rep(200 * KiB)))
    assert(img:flush())    -- write-back: the L2 table reaches the file here
    local k, writes = nil, 0
    for _, r in ipairs(img:io_log()) do
      if r.what ~= "flush" then writes = writes + 1 end
      if r.what == "l2" and not k then k = writes - 1 end
    end
    img:close()
    h.copy(no_snap, leaky)
    img = assert(qcow2.open(leaky, { mode = "rw", io = { stop_after_writes = k } }))
    img:write(1200 * KiB, ("x"):rep(200 * KiB))
    img:close()
    local res = crash.judge(leaky, "the leaky image")
    assert.is_true((res.leaks or 0) > 0, "no leak made")
    sweep("repair of leaks", leaky, function(rw) return rw:check({ repair = "all" }) end)
  end)

  it("check { repair = \"all\" } of a zeroed refcount, never making it worse", function()
    -- a data cluster's refcount zeroed: qemu-img counts a corruption
    local bad = dir .. "/bad.qcow2"
    h.copy(no_snap, bad)
    local host
    do
      local ro <close> = assert(qcow2.open(bad))
      host = ro:map(0, 4 * KiB)[1].offset
    end
    assert.is_not_nil(host)
    local reftable = h.get_be64(bad, 48)
    local refblock = h.get_be64(bad, reftable)
    h.poke(bad, refblock + (host // (4 * KiB)) * 2, h.be16(0))
    local res0 = h.check_json(bad)
    assert.is_true(res0.corruptions > 0)
    local work = dir .. "/cut.qcow2"
    local before = digest(bad)
    h.copy(bad, work)
    local img = assert(qcow2.open(work, { mode = "rw", repair = true, io = { trace = true } }))
    assert(img:check({ repair = "all" }))
    local writes = crash.writes(img:io_log())
    img:close()
    crash.judge(work, "repair without a cut")
    crash.sweep(model.sample_indexes(writes + 1, SAMPLES), function(plan)
      local label = "repair, " .. crash.describe(plan)
      h.copy(bad, work)
      local rw = assert(qcow2.open(work, { mode = "rw", repair = true, io = plan }))
      rw:check({ repair = "all" })
      rw:close()
      local res = h.check_json(work)
      assert(res and (res.corruptions or 0) <= res0.corruptions and (res["check-errors"] or 0) == 0,
             label .. ": worse than before the repair")
      assert(digest(work) == before, label .. ": the guest disk changed")
      -- and a repair without a cut finishes the job
      rw = assert(qcow2.open(work, { mode = "rw", repair = true }))
      assert(rw:check({ repair = "all" }))
      rw:close()
      crash.judge(work, label .. ", repaired again")
    end)
  end)

  it("the repair of a dirty image at a read-write open", function()
    local dirty = dir .. "/dirty.qcow2"
    h.create(dirty, 2 * MiB, "cluster_size=4096,lazy_refcounts=on")
    h.sh("qemu-io -c 'write -P 0x33 0 256k' -c 'write -P 0x34 1M 64k' -c abort " .. h.q(dirty))
    assert.is_true(h.info_json(dirty)["dirty-flag"])
    local work = dir .. "/cut.qcow2"
    h.copy(dirty, work)
    local img = assert(qcow2.open(work, { mode = "rw", io = { trace = true } }))
    local writes = crash.writes(img:io_log())
    img:close()
    assert.is_true(writes > 2, "the open repaired with " .. writes .. " writes")
    crash.judge(work, "dirty repair without a cut")
    local want = digest(work)
    crash.sweep(model.sample_indexes(writes + 1, SAMPLES), function(plan)
      local label = "dirty repair, " .. crash.describe(plan)
      h.copy(dirty, work)
      local rw = qcow2.open(work, { mode = "rw", io = plan })
      if rw then rw:close() end
      -- still dirty: the next open repairs (refcounts may lag behind);
      -- clean: nothing may be wrong
      if h.info_json(work)["dirty-flag"] then
        rw = assert(qcow2.open(work, { mode = "rw" }))
        rw:close()
      end
      crash.judge(work, label)
      assert(digest(work) == want, label .. ": the guest disk changed")
    end)
  end)
end)
