-- The power-cut sweep of the crash workload (spec/model.lua) reduced to a
-- count: how many cuts of each kind leave a corruption (qemu-img check or
-- the library's check). spec/barrier_spec.lua runs it in a child lua5.4
-- against the test-only build without write barriers:
--   LUA_CPATH='./build-nobarrier/?.so;;' lua5.4 -e 'print(require("crash_probe").report())'
local h = require("helpers")
local model = require("model")
local crash = require("crash")
local qcow2 = require("qcow2")

local M = {}

-- {plain =, all =, seeded =, cuts =, example =}: corrupt cuts per plan kind.
function M.run()
  local dir = h.tmpdir()
  local si = model.crash_setup(dir)
  local work = dir .. "/cut.qcow2"
  local function run(io)
    h.copy(si.fresh, work)
    local img = assert(qcow2.open(work, { mode = "rw", io = io }))
    for _, phase in ipairs(si.phases) do
      phase.run(img)
      if not phase.no_flush then img:flush() end
    end
    local log = img:io_log()
    img:close()
    return log
  end
  local total = crash.writes(run({ trace = true }))
  local counts = { plain = 0, all = 0, seeded = 0, cuts = 0 }
  for _, k in ipairs(model.sample_indexes(total + 2, 36)) do
    for _, plan in ipairs(crash.plans(k)) do
      run(plan)
      counts.cuts = counts.cuts + 1
      local ok, err = pcall(crash.judge, work, crash.describe(plan))
      if not ok then
        local kind = plan.volatile == nil and "plain" or plan.volatile == "all" and "all" or "seeded"
        counts[kind] = counts[kind] + 1
        counts.example = counts.example or tostring(err):sub(1, 400)
      end
    end
  end
  h.cleanup()
  return counts
end

-- One line: "plain=N all=N seeded=N cuts=N" (then the first failure).
function M.report()
  local c = M.run()
  return ("plain=%d all=%d seeded=%d cuts=%d\n%s"):format(c.plain, c.all, c.seeded, c.cuts,
                                                          c.example or "")
end

return M
