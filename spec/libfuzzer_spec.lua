-- The libFuzzer harnesses (csrc/fuzz/, `make fuzz`): they build with clang,
-- and each replays the qemu-img seed corpus and runs a few dozen mutations
-- without a crash, a leak or a sanitizer report. The long runs are
-- `make fuzz` (FUZZ_SECONDS per harness); this only proves they work.
local h = require "helpers"

-- Always the plain build's folder: the harnesses carry their own
-- sanitizers, and the seed builder loads the plain module (under make
-- sanitize BUILD is build-san, whose module needs the preloaded runtime).
local BUILD = "build"
local FUZZ = BUILD .. "/fuzz"
local NAMES = { "open", "read", "map", "check", "repair", "snapshot", "write" }
local RUNS = 60        -- the seeds (about 30) and as many mutations

-- One harness over the seeds (a fresh folder takes what it finds).
local function run(name, extra)
  local scratch = h.tmpdir()
  return h.sh(("%s/fuzz_%s -dict=csrc/fuzz/qcow2.dict -max_len=1048576 -rss_limit_mb=2048"
    .. " -timeout=10 -seed=1 -artifact_prefix=%s/ %s %s %s"):format(
    FUZZ, name, h.q(scratch), extra, h.q(scratch), h.q(FUZZ .. "/seeds")), true)
end

describe("libFuzzer harnesses", function()
  teardown(h.cleanup)

  it("build with clang and get a seed corpus from qemu-img images", function()
    assert.is_true(h.sh("command -v clang"), "clang is missing: make deps (clang libclang-rt-14-dev)")
    local ok, out = h.sh(("unset MAKEFLAGS MFLAGS; make -s fuzz-build BUILD=%s"):format(h.q(BUILD)), true)
    assert.is_true(ok, out)
    local seeds = h.must(("ls %s/seeds/*.qcow2 | wc -l"):format(h.q(FUZZ)))
    assert.is_true(tonumber(seeds) >= 20, "only " .. seeds .. " seed images")
  end)

  for _, name in ipairs(NAMES) do
    it(("fuzz_%s replays the seeds and runs mutations without a crash"):format(name), function()
      local ok, out = run(name, "-runs=" .. RUNS)
      assert.is_true(ok, out)
      assert.matches("Done " .. RUNS .. " runs", out)
      -- every seed was loaded (the replay is real, not an empty corpus)
      assert.matches("INFO: seed corpus: files: %d+", out)
    end)
  end
end)
