-- Our repair against qemu-img's on copies of the same image: the judge
-- shared by spec/repair_fuzz_spec.lua (random mutations) and
-- spec/repair_regress_spec.lua (every case the fuzzer ever found).
--
-- The rules (issue 8, item 2):
--   * a repair never raises (nor crashes: the process would die);
--   * after our repair, neither our check nor qemu-img check reports more
--     corruptions + leaks than it did before;
--   * where qemu-img check -r <mode> leaves its copy clean in one pass, our
--     one pass leaves ours clean too, judged by qemu-img check and by ours.
local h = require("helpers")

local M = {}

-- qemu-img check [-r mode]: {known =, code =, corruptions =, leaks =,
-- check_errors =, clean =} (known is false when qemu-img gave no JSON,
-- e.g. it could not open the image).
function M.qemu_check(path, mode)
  local args = "qemu-img check --output=json " .. (mode and ("-r " .. mode .. " ") or "")
  local ok, out, code = h.sh(args .. h.q(path))
  local okj, res = pcall(h.json.decode, out)
  code = ok and 0 or code
  if not okj or type(res) ~= "table" then
    return { known = false, code = code, clean = false }
  end
  local r = {
    known = true, code = code,
    corruptions = math.tointeger(res.corruptions or 0),
    leaks = math.tointeger(res.leaks or 0),
    check_errors = math.tointeger(res["check-errors"] or 0),
  }
  r.clean = code == 0 and r.corruptions == 0 and r.leaks == 0 and r.check_errors == 0
  return r
end

-- Our read-only verdict. A plain open first; an image only an open for
-- repair takes is checked through one (on a scratch copy: such an open
-- is read-write).
function M.our_check(qcow2, path)
  local img = qcow2.open(path)
  local scratch
  if not img then
    scratch = path .. ".ourcheck"
    h.copy(path, scratch)
    img = qcow2.open(scratch, { mode = "rw", repair = true })
  end
  local r, msg
  if img then
    r, msg = img:check()
    img:close()
  else
    msg = "cannot be opened"
  end
  if scratch then os.remove(scratch) end
  if not r then return { known = false, clean = false, msg = msg } end
  return {
    known = true, corruptions = r.corruptions, leaks = r.leaks,
    check_errors = r.check_errors,
    clean = r.corruptions == 0 and r.leaks == 0 and r.check_errors == 0,
  }
end

-- Our check{repair = mode} on an open for repair. Returns "raised", msg
-- when anything raised; "refused", msg when the open or repair returned
-- nil, msg; "repaired", result otherwise.
function M.our_repair(qcow2, path, mode)
  local outcome, detail
  local ok, err = pcall(function()
    local img, msg = qcow2.open(path, { mode = "rw", repair = true })
    if not img then
      outcome, detail = "refused", "open: " .. tostring(msg)
      return
    end
    local r, rmsg = img:check { repair = mode }
    img:close()
    if r then outcome, detail = "repaired", r
    else outcome, detail = "refused", "check: " .. tostring(rmsg) end
  end)
  if not ok then return "raised", tostring(err) end
  return outcome, detail
end

local function bad(r) return r.corruptions + r.leaks end

local function describe_counts(r)
  if not r.known then return "unknown" end
  return ("%d corruptions, %d leaks, %d check errors"):format(r.corruptions, r.leaks,
                                                           r.check_errors)
end

-- Repair copies of `path` with qemu-img and with ours, in mode "all" or
-- "leaks"; `dir` holds the copies. Returns a list of broken rules (empty
-- when all hold) and a table of what was seen.
function M.judge(qcow2, path, dir, mode)
  local theirs, mine = dir .. "/theirs-" .. mode .. ".qcow2", dir .. "/mine-" .. mode .. ".qcow2"
  local seen = {}
  seen.q_before = M.qemu_check(path)
  seen.o_before = M.our_check(qcow2, path)
  h.copy(path, theirs)
  M.qemu_check(theirs, mode)
  seen.q_theirs = M.qemu_check(theirs)
  h.copy(path, mine)
  seen.outcome, seen.detail = M.our_repair(qcow2, mine, mode)
  seen.q_after = M.qemu_check(mine)
  seen.o_after = M.our_check(qcow2, mine)

  local broken = {}
  local function rule(cond, fmt, ...)
    if not cond then broken[#broken + 1] = fmt:format(...) end
  end
  rule(seen.outcome ~= "raised", "repair raised: %s", tostring(seen.detail))
  if seen.q_before.known then
    rule(seen.q_after.known and bad(seen.q_after) <= bad(seen.q_before),
         "qemu-img check: before %s, after our repair %s", describe_counts(seen.q_before),
         describe_counts(seen.q_after))
  end
  if seen.o_before.known then
    rule(seen.o_after.known and bad(seen.o_after) <= bad(seen.o_before),
         "our check: before %s, after our repair %s", describe_counts(seen.o_before),
         describe_counts(seen.o_after))
  end
  -- qemu-img 7.2 clearing an unknown autoclear bit rewrites the header
  -- before the snapshot table is read, and loses every snapshot: a clean
  -- result bought so is not one to match
  seen.qemu_lost_snapshots = h.get_be32(path, 60) > 0 and h.get_be32(theirs, 60) == 0
  if seen.q_theirs.clean and not seen.qemu_lost_snapshots then
    rule(seen.q_after.clean and seen.o_after.clean,
         "qemu-img check -r %s leaves its copy clean, ours (%s%s) leaves qemu-img check: %s, "
         .. "our check: %s", mode, seen.outcome,
         seen.outcome == "refused" and (": " .. tostring(seen.detail)) or "",
         describe_counts(seen.q_after), describe_counts(seen.o_after))
  end
  return broken, seen
end

return M
