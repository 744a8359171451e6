-- Power cuts: the crash workload (spec/model.lua) is run once with every
-- write traced, then again for each cut index k on a fresh copy with
-- io = {stop_after_writes = k}, as if the machine lost power after the
-- k-th write, and with a volatile disk cache (volatile = "all" or seeded)
-- that also loses writes issued since the last completed flush. Whatever
-- k, qemu-img check and the library's check must find no corruption
-- (leaks are allowed: a crash may strand clusters) and every phase whose
-- flush had completed must read back intact through the library.
-- Sampled for `make test`; every index and several seeds under
-- QCOW2_SWEEP=full.
local h = require("helpers")
local model = require("model")
local crash = require("crash")
local qcow2 = require("qcow2")

-- Each cache mode (issue 14): write-back keeps metadata dirty until the
-- phase's flush, writethrough writes it at once, unsafe never syncs (so
-- only in-order cuts, or losing everything, are promised anything).
local MODES = {
  { cache = "writeback", samples = 36 },
  { cache = "writethrough", samples = 20 },
  { cache = "unsafe", samples = 16, ordered = true },
}

for _, mode in ipairs(MODES) do
describe("a power cut (cache " .. mode.cache .. ")", function()
  local dir, setup_info, m
  local checkpoints = {}    -- writes done when each phase's flush returned
  local total               -- writes done before close (flushes not counted)
  local log

  setup(function()
    dir = h.tmpdir()
    setup_info = model.crash_setup(dir)
    m = setup_info.model(dir .. "/model.raw")
    local work = dir .. "/traced.qcow2"
    h.copy(setup_info.fresh, work)
    local img = assert(qcow2.open(work, { mode = "rw", cache = mode.cache,
                                          io = { trace = true } }))
    for j, phase in ipairs(setup_info.phases) do
      for _, r in ipairs(phase.run(img)) do
        assert(r[1], ("%s: %s failed: %s"):format(phase.name, r.call, tostring(r[2])))
      end
      if not phase.no_flush then
        assert(img:flush())
        checkpoints[j] = crash.writes(img:io_log())
      end
    end
    log = img:io_log()
    total = crash.writes(log)
    img:close()
  end)
  teardown(function()
    if m then m:close() end
    h.cleanup()
  end)

  it("is prepared by a traced run that passes check and reads back the model", function()
    local work = dir .. "/traced.qcow2"
    local clean, _, code, out = model.check(work)
    assert.is_true(clean, "qemu-img check (exit " .. tostring(code) .. "):\n" .. out)
    local same, cmp = m:compare(work)
    assert.is_true(same, cmp)
  end)

  it("is traced write by write, naming the structure each write targets", function()
    local kinds = {}
    for _, r in ipairs(log) do
      assert.are.equal("integer", math.type(r.offset))
      if r.what == "flush" or r.what == "truncate" then
        assert.are.equal(0, r.length)
      else
        assert.is_true(r.length > 0)
      end
      kinds[r.what] = (kinds[r.what] or 0) + 1
    end
    for _, what in ipairs({ "data", "l2", "l1", "refcount_block", "refcount_table", "header", "flush" }) do
      if what ~= "flush" or not mode.ordered then
        assert.is_not_nil(kinds[what], "no write of " .. what .. " in the trace")
      end
    end
    -- the engine's barriers are flushes between a phase's writes, beyond
    -- the one img:flush() per phase
    local phases_flushed = 0
    for j = 1, #setup_info.phases do
      if checkpoints[j] then phases_flushed = phases_flushed + 1 end
    end
    if mode.ordered then
      assert.is_nil(kinds.flush, "an unsafe handle synced")
    else
      assert.is_true(kinds.flush > phases_flushed + 5,
                     kinds.flush .. " flushes for " .. phases_flushed .. " img:flush() calls")
    end
    -- checkpoints grow with the phases
    local last = 0
    for j = 1, #setup_info.phases do
      if checkpoints[j] then
        assert.is_true(checkpoints[j] >= last)
        last = checkpoints[j]
      end
    end
    assert.is_true(total > 50, "only " .. total .. " writes traced")
  end)

  -- One cut: copy, run, close, judge. Returns nothing; asserts.
  local function cut_at(plan)
    local k = plan.stop_after_writes
    local label = ("%s of %d"):format(crash.describe(plan), total)
    local work = dir .. "/cut.qcow2"
    h.copy(setup_info.fresh, work)
    local img, msg = qcow2.open(work, { mode = "rw", cache = mode.cache, io = plan })
    assert(img, "open: " .. tostring(msg))
    for _, phase in ipairs(setup_info.phases) do
      phase.run(img)                -- results ignored: the machine is "off"
      if not phase.no_flush then img:flush() end
    end
    img:close()

    crash.judge(work, label)

    -- A flush at the cut point never completes: with a volatile cache a
    -- phase is durable only when its flush came strictly before the cut.
    local function durable(j)
      if not checkpoints[j] then return false end
      if mode.ordered and plan.volatile then return false end
      if plan.volatile then return checkpoints[j] < k end
      return checkpoints[j] <= k
    end
    local ro <close> = assert(qcow2.open(work))
    local function verify(ranges, what)
      local inside = {}
      for _, r in ipairs(ranges) do
        if r[1] + r[2] <= ro.size then inside[#inside + 1] = r end
      end
      local ok, why = m:verify(ro, inside)
      assert(ok, ("%s: %s: %s"):format(label, what, tostring(why)))
    end
    verify(setup_info.always, "data never written")
    for j, phase in ipairs(setup_info.phases) do
      if durable(j) then
        if phase.grows_to then
          assert.are.equal(phase.grows_to, ro.size, label .. ": size after a flushed resize")
        end
        verify(phase.regions, "flushed phase '" .. phase.name .. "'")
      end
    end
  end

  it("after any write, cache kept or lost, leaves no corruption and keeps every flushed phase", function()
    crash.sweep(model.sample_indexes(total + 2, mode.samples), cut_at,
                mode.ordered and crash.ordered_plans or nil)
  end)
end)
end
