-- csrc/layer-check, the check that keeps csrc/README.md's layer map true:
-- run on tiny object files compiled here from a few lines of C each, with a
-- layer table of their own, so every verdict is known in advance.
local h = require "helpers"

-- A fake source tree: engine files (name -> C text), binding files, a
-- public header and the table rows; compiled with cc -c into dir/obj.
local function tree(spec)
  local dir = h.tmpdir()
  h.must("mkdir -p " .. h.q(dir .. "/src/engine") .. " " .. h.q(dir .. "/src/lua") ..
         " " .. h.q(dir .. "/obj/engine") .. " " .. h.q(dir .. "/obj/lua"))
  for name, text in pairs(spec.headers or {}) do h.write_file(dir .. "/src/engine/" .. name, text) end
  for part, files in pairs({ engine = spec.engine or {}, lua = spec.lua or {} }) do
    for name, code in pairs(files) do
      local c = ("%s/src/%s/%s"):format(dir, part, name)
      h.write_file(c, code)
      h.must(("cc -c -o %s %s"):format(h.q(("%s/obj/%s/%s"):format(dir, part, name:gsub("%.c$", ".o"))), h.q(c)))
    end
  end
  h.write_file(dir .. "/pub.h", spec.header or "")
  h.write_file(dir .. "/map.md", "| layer | file | concern |\n|---|---|---|\n" ..
               table.concat(spec.rows, "\n") .. "\n")
  return dir
end

-- Runs the check on a tree; returns the exit code and the output.
local function check(dir, mode)
  local ok, out, code = h.sh(("lua5.4 csrc/layer-check %s --table %s --src %s --obj %s --header %s")
    :format(mode, h.q(dir .. "/map.md"), h.q(dir .. "/src"), h.q(dir .. "/obj"), h.q(dir .. "/pub.h")), true)
  return ok and 0 or code, out
end

local function violations(out)
  local v = {}
  for line in out:gmatch("[^\n]+") do
    if line:match("VIOLATION") or line:match("^UNLISTED") or line:match("^STALE") then v[#v + 1] = line end
  end
  return v
end

describe("csrc/layer-check", function()
  teardown(h.cleanup)

  local low_up = "int high_fn(void);\nint low_fn(void) { return high_fn(); }\n"
  local low = "int low_fn(void) { return 1; }\n"
  local high = "int low_fn(void);\nint high_fn(void) { return low_fn() + 1; }\n"
  local rows = { "| 1 io | `low.c` | the floor |", "| 2 | `high.c` | above it |" }

  it("passes a call down a layer, even in strict mode", function()
    local dir = tree { engine = { ["low.c"] = low, ["high.c"] = high }, rows = rows }
    local code, out = check(dir, "--strict")
    assert.are.same({}, violations(out))
    assert.are.equal(0, code, out)
    assert.truthy(out:find("0 violations", 1, true), out)
  end)

  it("reports a call up a layer; --strict exits 1, --report exits 0", function()
    local dir = tree { engine = { ["low.c"] = low_up, ["high.c"] = "int high_fn(void) { return 2; }\n" },
                       rows = rows }
    local code, out = check(dir, "--strict")
    assert.are.same({ "LAYER VIOLATION: low.o (1) -> high_fn in high.o (2)" }, violations(out))
    assert.are.equal(1, code, out)
    code, out = check(dir, "--report")
    assert.are.same({ "LAYER VIOLATION: low.o (1) -> high_fn in high.o (2)" }, violations(out))
    assert.are.equal(0, code, out)
  end)

  it("fails on a source file the table does not list, in report mode too", function()
    local dir = tree { engine = { ["low.c"] = low, ["high.c"] = high,
                                  ["stray.c"] = "int stray_fn(void) { return 3; }\n" }, rows = rows }
    local code, out = check(dir, "--report")
    assert.are.equal(1, code, out)
    assert.truthy(out:find("UNLISTED: [^\n]*stray%.c"), out)
  end)

  it("accepts a listed file that does not exist yet", function()
    local more = { rows[1], rows[2], "| 2 | `later.c` | not written yet |" }
    local dir = tree { engine = { ["low.c"] = low, ["high.c"] = high }, rows = more }
    local code, out = check(dir, "--strict")
    assert.are.equal(0, code, out)
    assert.truthy(out:find("Listed, not present (yet): later.c", 1, true), out)
  end)

  it("places an exception's symbol on its own layer, and reports it once it has moved", function()
    -- meta_fn lives in high.c but belongs to layer 1: low.c may call it.
    local high_mixed = "int meta_fn(void) { return 4; }\nint high_fn(void) { return meta_fn(); }\n"
    local low_meta = "int meta_fn(void);\nint low_fn(void) { return meta_fn(); }\n"
    local with_exc = { rows[1], rows[2], "", "| 1 | `meta_fn` | `high.c` | moves down |" }
    local dir = tree { engine = { ["low.c"] = low_meta, ["high.c"] = high_mixed }, rows = with_exc }
    local code, out = check(dir, "--strict")
    assert.are.same({}, violations(out))
    assert.are.equal(0, code, out)
    -- Without the exception the same call is a violation.
    dir = tree { engine = { ["low.c"] = low_meta, ["high.c"] = high_mixed }, rows = rows }
    code, out = check(dir, "--strict")
    assert.are.same({ "LAYER VIOLATION: low.o (1) -> meta_fn in high.o (2)" }, violations(out))
    assert.are.equal(1, code, out)
    -- meta_fn moved to low.c: the exception row is stale.
    dir = tree { engine = { ["low.c"] = low .. "int meta_fn(void) { return 4; }\n",
                            ["high.c"] = high }, rows = with_exc }
    code, out = check(dir, "--strict")
    assert.are.same({ "STALE EXCEPTION: meta_fn is no longer defined in high.c; drop its row" },
                    violations(out))
    assert.are.equal(1, code, out)
  end)

  it("allows calls within a layer and lists a cycle between its files", function()
    local a = "int b_fn(void);\nint a_fn(int n) { return n ? b_fn() : 0; }\n"
    local b = "int a_fn(int);\nint b_fn(void) { return a_fn(0); }\n"
    local dir = tree { engine = { ["a.c"] = a, ["b.c"] = b },
                       rows = { "| 3 codec | `a.c` | a |", "| 3 | `b.c` | b |" } }
    local code, out = check(dir, "--strict")
    assert.are.equal(0, code, out)
    assert.truthy(out:find("layer 3 codec: one cycle among a.o b.o", 1, true), out)
  end)

  it("reports binding objects that use engine symbols the public header does not declare", function()
    local bind = "int low_fn(void);\nint high_fn(void);\nint bind_fn(void) { return low_fn() + high_fn(); }\n"
    local dir = tree { engine = { ["low.c"] = low, ["high.c"] = high }, lua = { ["bind.c"] = bind },
                       header = "int low_fn(void);\n", rows = rows }
    local code, out = check(dir, "--strict")
    assert.are.same({ "BINDING VIOLATION: lua/bind.o -> high_fn in high.o (not declared in "
                      .. dir .. "/pub.h)" }, violations(out))
    assert.are.equal(1, code, out)
  end)

  it("reports a file including a higher layer's header; an umbrella header goes anywhere", function()
    local headers = { ["low.h"] = "int low_fn(void);\n", ["high.h"] = "int high_fn(void);\n",
                      ["all.h"] = "#include \"low.h\"\n#include \"high.h\"\n" }
    local hrows = { rows[1], rows[2], "| 1 | `low.h` | low |", "| 2 | `high.h` | high |",
                    "| umbrella | `all.h` | both |" }
    -- low.c includes high.h but calls nothing of it: only the include is wrong.
    local dir = tree { engine = { ["low.c"] = "#include \"high.h\"\n" .. low, ["high.c"] = high },
                       headers = headers, rows = hrows }
    local code, out = check(dir, "--strict")
    assert.are.same({ "INCLUDE VIOLATION: low.c (1) includes high.h (2)" }, violations(out))
    assert.are.equal(1, code, out)
    -- Down a layer, and through the umbrella: fine.
    dir = tree { engine = { ["low.c"] = "#include \"all.h\"\n" .. low,
                            ["high.c"] = "#include \"low.h\"\n" .. high },
                 headers = headers, rows = hrows }
    code, out = check(dir, "--strict")
    assert.are.same({}, violations(out))
    assert.are.equal(0, code, out)
    assert.truthy(out:find("umbrella header (allowed; per-layer headers preferred): low.c", 1, true), out)
    -- A header without a row fails the check in every mode.
    dir = tree { engine = { ["low.c"] = low, ["high.c"] = high },
                 headers = { ["stray.h"] = "int stray_fn(void);\n" }, rows = rows }
    code, out = check(dir, "--report")
    assert.are.equal(1, code, out)
    assert.truthy(out:find("UNLISTED: [^\n]*stray%.h"), out)
  end)

  it("finds every engine source of this tree in csrc/README.md", function()
    local ok, out = h.sh(("lua5.4 csrc/layer-check --report --summary --obj %s/obj")
      :format(h.q(os.getenv("BUILD") or "build")), true)
    assert.is_true(ok, out)
    assert.truthy(out:find("0 map errors", 1, true), out)
  end)
end)
