-- The README's first two commands on a simulated new machine: a copy of the
-- checkout, with PATH shims so that dpkg-query and pkg-config know nothing
-- until the command's own `apt-get install` has run (apt-get itself is a
-- shim that only records the install). The packages are really on this
-- machine, so after the install the shims hand over to the real tools.
local h = require "helpers"

-- The shell commands of the README's first ```sh block, comments dropped.
local function readme_commands()
  local f = assert(io.open("README.md"))
  local text = f:read("a")
  f:close()
  local block = assert(text:match("```sh\n(.-)```"), "README has no ```sh block")
  local cmds = {}
  for line in block:gmatch("[^\n]+") do
    local cmd = line:gsub("#.*", ""):gsub("%s+$", "")
    if cmd:match("%S") then cmds[#cmds + 1] = cmd end
  end
  return cmds
end

-- A copy of the tracked files as they are in the working tree, and shims.
local function new_machine()
  local dir = h.tmpdir()
  local copy, bin = dir .. "/checkout", dir .. "/bin"
  h.must(("mkdir -p %s %s && git ls-files -z | xargs -0 cp --parents -t %s")
    :format(h.q(copy), h.q(bin), h.q(copy)))
  local flag = dir .. "/installed"
  local pkg_config = h.must("command -v pkg-config"):gsub("%s+$", "")
  local shims = {
    ["dpkg-query"] = ('[ -f %s ] && exec /usr/bin/dpkg-query "$@"; exit 1'):format(h.q(flag)),
    ["pkg-config"] = ('[ -f %s ] && exec %s "$@"; exit 1'):format(h.q(flag), h.q(pkg_config)),
    ["apt-get"] = ('case " $* " in *" install "*) echo "$*" >> %s/apt.log; touch %s;; esac; exit 0')
      :format(h.q(dir), h.q(flag)),
  }
  for name, body in pairs(shims) do
    local f = assert(io.open(bin .. "/" .. name, "w"))
    f:write("#!/bin/sh\n", body, "\n")
    f:close()
  end
  h.must("chmod +x " .. h.q(bin) .. "/*")
  return dir, copy, bin
end

-- Run one README command there, in a user's environment (nothing of the
-- running suite's: under make sanitize it would preload ASan into every
-- child, qemu-img included); the environment may narrow what it does
-- (SPECS picks the spec files `make test` runs), never the command itself.
local function run(cmd, env)
  local dir, copy, bin = new_machine()
  local ok, out = h.sh(("cd %s && env -u MAKEFLAGS -u MAKELEVEL -u MFLAGS -u LUA -u BUILD -u SPECS -u LUA_PATH -u LUA_CPATH -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS PATH=%s:\"$PATH\" %s MAKEFLAGS=-j2 sh -c %s")
    :format(h.q(copy), h.q(bin), env or "", h.q(cmd)), true)
  local log = io.open(dir .. "/apt.log")
  local apt = log and log:read("a") or ""
  if log then log:close() end
  return ok, out, apt
end

describe("README on a machine without the packages", function()
  teardown(h.cleanup)
  local cmds = readme_commands()

  it("starts with the demo command and the test command", function()
    assert.are.equal("make deps demo", cmds[1])
    assert.are.equal("make deps test", cmds[2])
  end)

  it("the shims really hide the packages until apt-get install", function()
    local _, _, bin = new_machine()
    local ok = h.sh(("PATH=%s:\"$PATH\" pkg-config --cflags lua5.4"):format(h.q(bin)))
    assert.is_false(ok)
    ok = h.sh(("PATH=%s:\"$PATH\" dpkg-query -W lua5.4"):format(h.q(bin)))
    assert.is_false(ok)
  end)

  it("'" .. (cmds[1] or "?") .. "' installs, builds and prints the report", function()
    local ok, out, apt = run(cmds[1])
    assert.is_true(ok, out)
    assert.matches("install", apt)          -- it asked for the packages
    assert.matches("liblua5.4%-dev", apt)
    assert.matches("qemu%-utils", apt)
    assert.matches("Consistency check", out)
  end)

  it("'" .. (cmds[2] or "?") .. "' installs, builds and ends with the summary line", function()
    local ok, out, apt = run(cmds[2], "SPECS=spec/refcount_cache_spec.lua")
    assert.is_true(ok, out)
    assert.matches("liblua5.4%-dev", apt)
    assert.matches("\n%d+ passed, 0 failed\n?$", out)
  end)
end)
