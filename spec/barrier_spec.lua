-- The power-cut sweep can fail: the crash workload's sweep run against a
-- test-only build whose qcow2_barrier does nothing (make nobarrier, with
-- -DQCOW2_TEST_NO_BARRIER into build-nobarrier/) finds corruption once the
-- fault backend's volatile cache loses unflushed writes by a seeded coin,
-- while the build under test finds none. The build under test orders an
-- allocating write's data before its L2 entry with a flush between them.
--
-- Why the seeded coin: a plain cut keeps every write issued before it, in
-- order, and volatile = "all" always rolls back to the state of the last
-- completed flush; removing barriers only removes such states, so neither
-- can ever tell a missing barrier. Losing some unflushed writes but not
-- others is what reorders them.
local h = require("helpers")
local probe = require("crash_probe")
local qcow2 = require("qcow2")

describe("the write barrier", function()
  teardown(h.cleanup)

  for _, cache in ipairs({ "writethrough", "writeback" }) do
    it("orders an allocating write: data, flush, then the L2 entry (cache " .. cache .. ")", function()
      local dir = h.tmpdir()
      local p = dir .. "/d.qcow2"
      h.create(p, "1M", "cluster_size=4096")
      -- the L2 table exists: the entry is written in place, not in a new
      -- table that only the L1 entry (after a barrier) makes reachable
      h.qemu_io(p, { "write -P 0x11 0 4k" })
      local img = assert(qcow2.open(p, { mode = "rw", cache = cache, io = { trace = true } }))
      assert(img:write(8192, ("d"):rep(4096)))
      assert(img:flush())    -- write-back: the L2 table is written here
      local log = img:io_log()
      img:close()
      local seen_data, flushed
      for _, r in ipairs(log) do
        if r.what == "data" then seen_data, flushed = true, false
        elseif r.what == "flush" then flushed = true
        elseif r.what == "l2" and seen_data then
          assert.is_true(flushed, "the L2 entry is written with its data unflushed")
          return
        end
      end
      error("no data write followed by an L2 write in the trace")
    end)
  end

  it("is what keeps a volatile-cache power cut from corrupting the image", function()
    assert(io.open("Makefile"), "run from the source folder")
    local ok, out = h.sh("make -s nobarrier", true)
    assert(ok, "make nobarrier failed:\n" .. out)
    ok, out = h.sh("QCOW2_SWEEP= LUA_CPATH='./build-nobarrier/?.so;;' lua5.4"
                   .. [[ -e 'print(require("crash_probe").report())']], true)
    assert(ok, "probe without barriers failed to run:\n" .. out)
    local seeded = tonumber(out:match("seeded=(%d+)"))
    assert(seeded and seeded > 0,
           "the sweep found no corruption with the barrier compiled out:\n" .. out)

    -- the build under test, same sweep: nothing
    local c = probe.run()
    assert(c.plain + c.all + c.seeded == 0, ("%d plain, %d all, %d seeded of %d cuts corrupt:\n%s")
      :format(c.plain, c.all, c.seeded, c.cuts, tostring(c.example)))
  end)
end)
