-- Power-cut helpers shared by the crash specs: the cut plans to try at a
-- cut index, write counting in an io_log, and the judgement of an image
-- after a cut (qemu-img check and the library's check).
--
-- A cut at k is io = {stop_after_writes = k [, volatile =, seed =]}: every
-- write after the k-th vanishes and, with a volatile cache, the writes
-- since the last completed flush may be lost too (each by a seeded coin,
-- or all of them). Only the engine's flush barriers keep ordering then.
local h = require("helpers")
local qcow2 = require("qcow2")

local M = {}

M.full = os.getenv("QCOW2_SWEEP") == "full"

-- Writes in an io_log (flushes are entries too, but no cut counts them).
function M.writes(log)
  local n = 0
  for _, r in ipairs(log) do
    if r.what ~= "flush" then n = n + 1 end
  end
  return n
end

-- The plans to try at cut k: the plain cut (writes before it all kept),
-- a volatile cache losing all unflushed writes, and seeded coins (one
-- varying seed when sampled, several under QCOW2_SWEEP=full).
function M.plans(k)
  local plans = {
    { stop_after_writes = k },
    { stop_after_writes = k, volatile = "all" },
  }
  local seeds = M.full and { 1, 2, 3, 4 } or { k * 31 + 7 }
  for _, s in ipairs(seeds) do
    plans[#plans + 1] = { stop_after_writes = k, volatile = true, seed = s }
  end
  return plans
end

function M.describe(plan)
  local v = plan.volatile
  if v == nil then return ("cut after write %d"):format(plan.stop_after_writes) end
  return ("cut after write %d, volatile = %s%s"):format(plan.stop_after_writes,
    tostring(v), plan.seed and (", seed " .. plan.seed) or "")
end

-- After a cut: qemu-img check and the library's check must both find no
-- corruption (leaks are allowed: a crash may strand clusters). Asserts,
-- with `label` in the message. Returns the qemu-img result.
function M.judge(path, label)
  local dir, name = path:match("^(.*)/([^/]+)$")
  local ok, out, code = h.sh("cd " .. h.q(dir) .. " && qemu-img check --output=json " .. h.q(name))
  local okj, res = pcall(h.json.decode, out)
  assert(okj and res, label .. ": qemu-img check gave no result (exit "
         .. tostring(code) .. "):\n" .. out)
  assert((res.corruptions or 0) == 0, label .. ": qemu-img check:\n" .. out)
  assert((res["check-errors"] or 0) == 0, label .. ": qemu-img check:\n" .. out)
  assert(ok or code == 3, label .. ": qemu-img check exit " .. tostring(code) .. ":\n" .. out)
  local img <close> = assert(qcow2.open(path, { mode = "r" }))
  local r = assert(img:check())
  assert(r.corruptions == 0 and r.check_errors == 0,
         ("%s: library check: %d corruptions, %d errors\n%s"):format(
           label, r.corruptions, r.check_errors, tostring(r)))
  return res
end

-- The plans for a handle that never syncs (cache "unsafe"): writes reach
-- the disk in the order issued, or the cache loses every one of them; a
-- seeded coin may lose any subset, and nothing is promised then.
function M.ordered_plans(k)
  return { { stop_after_writes = k }, { stop_after_writes = k, volatile = "all" } }
end

-- Run cut(plan) for every plan (plans_of(k), default M.plans) at every
-- index in `indexes`, collecting failures; asserts once at the end naming
-- the first few.
function M.sweep(indexes, cut, plans_of)
  local failed, tried = {}, 0
  for _, k in ipairs(indexes) do
    for _, plan in ipairs((plans_of or M.plans)(k)) do
      tried = tried + 1
      local ok, err = pcall(cut, plan)
      if not ok then failed[#failed + 1] = M.describe(plan) .. ": " .. tostring(err) end
    end
  end
  assert(#failed == 0, ("%d of %d cuts failed:\n%s"):format(#failed, tried,
    table.concat(failed, "\n", 1, math.min(#failed, 6))))
  return tried
end

return M
