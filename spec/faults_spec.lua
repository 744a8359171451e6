-- Failing writes: the crash workload (spec/model.lua) on a fresh copy
-- with io = {fail_after_writes = k, errno = "EIO" | "ENOSPC"}, so that
-- the (k+1)-th write to the image file and every one after it fail. The
-- failing call answers nil, message, "io" (or "nospace"); every later call
-- either works or answers the same code; after close qemu-img check finds
-- no corruption, every phase flushed before the failure reads back intact,
-- and the image opens read-write again and takes writes. Sampled for
-- `make test`; every index under QCOW2_SWEEP=full.
local h = require("helpers")
local model = require("model")
local crash = require("crash")
local qcow2 = require("qcow2")

local ERRNOS = { { "EIO", "io" }, { "ENOSPC", "nospace" } }

describe("a failing write", function()
  local dir, setup_info, m, total

  setup(function()
    dir = h.tmpdir()
    setup_info = model.crash_setup(dir)
    m = setup_info.model(dir .. "/model.raw")
    local work = dir .. "/traced.qcow2"
    h.copy(setup_info.fresh, work)
    local img = assert(qcow2.open(work, { mode = "rw", io = { trace = true } }))
    for _, phase in ipairs(setup_info.phases) do
      phase.run(img)
      if not phase.no_flush then assert(img:flush()) end
    end
    total = crash.writes(img:io_log())   -- flushes are not writes
    img:close()
  end)
  teardown(function()
    if m then m:close() end
    h.cleanup()
  end)

  -- One fault: returns nothing; asserts.
  local function fail_at(k, errno, code)
    local work = dir .. "/fault.qcow2"
    h.copy(setup_info.fresh, work)
    local img, msg, open_code = qcow2.open(work, { mode = "rw",
      io = { fail_after_writes = k, errno = errno } })
    assert(img or open_code == code, "open: " .. tostring(msg))
    local failure         -- {call =, msg =, code =} of the first failure
    local durable = {}    -- phases flushed before the first failure
    local function judge(results)
      for _, r in ipairs(results) do
        if r[1] == nil then
          assert.is_string(r[2], r.call .. " failed without a message")
          if failure then
            assert.are.equal(failure.code, r[3], ("%s after the failure of %s (%s): %s"):format(
              r.call, failure.call, failure.msg, tostring(r[2])))
          else
            assert.are.equal(code, r[3], ("%s: %s"):format(r.call, tostring(r[2])))
            failure = { call = r.call, msg = r[2], code = r[3] }
          end
        else
          assert.is_true(r[1], r.call .. " returned " .. tostring(r[1]))
        end
      end
    end
    if img then
      for j, phase in ipairs(setup_info.phases) do
        judge(phase.run(img))
        if not phase.no_flush then
          local results = { table.pack(img:flush()) }
          results[1].call = "flush"
          judge(results)
          if not failure then durable[j] = true end
        end
      end
      img:close()
    end
    -- the fault was met (k is inside the workload's writes)
    assert.is_true(failure ~= nil or not img or k >= total,
                   "no call failed with fail_after_writes = " .. k)

    local _, res, exit, out = model.check(work)
    assert.is_not_nil(res, "qemu-img check gave no result (exit " .. tostring(exit) .. "):\n" .. out)
    assert.are.equal(0, res.corruptions or 0, out)
    assert.are.equal(0, res["check-errors"] or 0, out)

    do
      local ro <close> = assert(qcow2.open(work))
      local function verify(ranges, what)
        local inside = {}
        for _, r in ipairs(ranges) do
          if r[1] + r[2] <= ro.size then inside[#inside + 1] = r end
        end
        local ok, why = m:verify(ro, inside)
        assert(ok, what .. ": " .. tostring(why))
      end
      verify(setup_info.always, "data never written")
      for j, phase in ipairs(setup_info.phases) do
        if durable[j] then verify(phase.regions, "flushed phase '" .. phase.name .. "'") end
      end
    end

    -- the disk is back: the image opens read-write and takes writes
    local rw = assert(qcow2.open(work, { mode = "rw" }))
    assert(rw:write(45056, "after the fault"))
    rw:close()
    local clean2, res2, _, out2 = model.check(work)
    assert.are.equal(0, res2 and res2.corruptions or 0, out2)
    assert.is_true(clean2 or (res2 and (res2.leaks or 0) > 0), out2)
  end

  for _, e in ipairs(ERRNOS) do
    it(("with %s fails that call with %q, then works or fails alike, and leaves no corruption"):format(
         e[1], e[2]), function()
      local indexes = model.sample_indexes(total - 1, 30)
      local failed = {}
      for _, k in ipairs(indexes) do
        local ok, err = pcall(fail_at, k, e[1], e[2])
        if not ok then failed[#failed + 1] = ("k=%d: %s"):format(k, tostring(err)) end
      end
      assert(#failed == 0, ("%d of %d faults failed:\n%s"):format(#failed, #indexes,
        table.concat(failed, "\n", 1, math.min(#failed, 6))))
    end)
  end
end)
