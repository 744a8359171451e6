-- examples/fuzz.lua: a sampled campaign of at least 2,000 mutations finds no
-- crash, hang, Lua error or uncoded error; the runner notices a crash and
-- an uncoded error when a child is made to produce one.
-- QCOW2_CAMPAIGN_SEED picks the campaign seed (default 11).
local helpers = require("helpers")

local SEED = tonumber(os.getenv("QCOW2_CAMPAIGN_SEED") or "") or 11

local function campaign(args, env)
  local ok, out = helpers.sh((env or "") .. " " .. helpers.LUA .. " examples/fuzz.lua " .. args, true)
  local line = out:match("SUMMARY ([^\n]*)")
  assert(line, "no SUMMARY line:\n" .. out:sub(-3000))
  local s = {}
  for k, v in line:gmatch("([%w_.]+)=(%d+)") do s[k] = tonumber(v) end
  return s, out, ok
end

describe("fuzz campaign (examples/fuzz.lua)", function()
  it("2,000+ mutations: no crash, hang, raised error or uncoded error", function()
    local s, out, ok = campaign(("--count 860 --per-case 4 --batch 110 --oracle 90 --quiet --seed %d"):format(SEED))
    print(("# campaign seed %d: %d cases, %d mutations, %d s, %d disagreements, "
      .. "%d repairs leaving corruption qemu-img repairs, %d unrepairable by both")
      :format(SEED, s.cases, s.mutations, s.seconds, s.disagreements, s.repair_left_corruption,
              s.repair_unrepairable))
    assert.is_true(s.mutations >= 2000, "only " .. s.mutations .. " mutations")
    assert.is_true(s.oracle_cases >= 9)
    -- repairs that leave corruption qemu-img's repair removes are reported
    -- (printed above), not asserted: they are the repair engine's open work
    for _, k in ipairs({ "crash", "hang", "raised", "uncoded" }) do
      assert(s[k] == 0, ("%d %s finding(s):\n%s"):format(s[k], k, out:sub(-4000)))
    end
    -- the mutations reach every verdict: a campaign that only breaks the
    -- header (or never does) would test little
    for _, k in ipairs({ "lib_clean", "lib_leaks", "lib_corrupt", "lib_refused" }) do
      assert.is_true(s[k] > 0, "no case with " .. k)
    end
    assert.is_true(ok)
  end)

  it("runs as it stands with --count 50", function()
    local s, _, ok = campaign("--count 50")
    assert.is_true(ok)
    assert.are.equal(50, s.cases)
    assert.is_true(s.oracle_cases >= 5)
  end)

  it("notices a child that dies and an error without a code, naming the case", function()
    local s, out, ok = campaign("--count 6 --oracle 0", "QCOW2_FUZZ_SELFTEST=crash:3")
    assert.is_false(ok)
    assert.are.equal(1, s.crash)
    assert.matches("case 3 %[.-%]: crash: child exit 134", out)
    assert.are.equal(6, s.cases)
    s, out, ok = campaign("--count 4 --oracle 0", "QCOW2_FUZZ_SELFTEST=uncoded:2")
    assert.is_false(ok)
    assert.are.equal(1, s.uncoded)
    assert.matches("case 2 %[.-%]: uncoded", out)
  end)
end)
