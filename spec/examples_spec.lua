-- The forensic examples (examples/*.lua), each run as it stands with
-- lua5.4 on qemu-img-made images; their output is held against what
-- qemu-img and the files themselves say. Also `make doc`.
local h = require "helpers"

local KiB = 1024
local CLUSTER = 64 * KiB
local OFFSET_MASK = 0x00fffffffffffe00

-- stdout and exit status of an example (stderr merged on failure).
local function example(name, args)
  local ok, out, code = h.sh((os.getenv("LUA") or "lua5.4") .. " examples/" .. name .. ".lua " .. args)
  if not ok then
    local _, all = h.sh((os.getenv("LUA") or "lua5.4") .. " examples/" .. name .. ".lua " .. args, true)
    error(("examples/%s.lua failed (%s):\n%s"):format(name, tostring(code), all))
  end
  return out
end

local sha256 = h.sha256

describe("examples", function()
  local dir, snaps, base, top, leak, leak_host
  setup(function()
    dir = h.tmpdir()
    snaps = dir .. "/snaps.qcow2"
    h.create(snaps, "8M")
    h.qemu_io(snaps, { "write -P 1 0 64k" })
    h.qemu_img("snapshot -c early " .. h.q(snaps))
    h.qemu_io(snaps, { "write -P 2 1M 64k" })
    h.qemu_img("snapshot -c late " .. h.q(snaps))
    h.qemu_io(snaps, { "write -P 3 5M 128k" })
    -- the table order (early, late) is the reverse of the date order
    local ed = h.qcow2().edit(snaps)
    ed:snapshot(0, { date_sec = 2000000000 })
    ed:snapshot(1, { date_sec = 1000000000 })
    ed:close()
    base = dir .. "/base.qcow2"
    h.create(base, "4M")
    h.qemu_io(base, { "write -P 0x61 0 128k" })
    top = dir .. "/top.qcow2"
    h.create(top, "4M", nil, base, "qcow2")
    h.qemu_io(top, { "write -P 0x71 2M 64k" })
    -- a leaked cluster with data
    leak = dir .. "/leak.qcow2"
    h.create(leak, "4M")
    h.qemu_io(leak, { "write -P 0x11 0 64k", "write -P 0x22 64k 64k" })
    local l1 = h.get_be64(leak, h.get_be64(leak, 40))
    local at = (l1 & OFFSET_MASK) + 8
    leak_host = h.get_be64(leak, at) & OFFSET_MASK
    h.poke(leak, at, h.be64(0))
  end)
  teardown(h.cleanup)

  it("inspect.lua reports the check, owners and qemu-img's digests", function()
    local out = example("inspect", h.q(snaps))
    assert.matches("check: clean, 0 corruptions, 0 leaks", out, 1, true)
    assert.matches("digest active " .. sha256(h.raw_bytes(snaps)), out, 1, true)
    assert.matches("digest snapshot early " .. sha256(h.raw_bytes(snaps, "early")), out, 1, true)
    assert.matches("owner data ", out, 1, true)
    local leaky = example("inspect", h.q(leak))
    assert.matches("check: PROBLEMS, 0 corruptions, 1 leaks", leaky, 1, true)
    assert.matches(("residue leaked           at 0x%x, 65536 bytes"):format(leak_host), leaky, 1, true)
  end)

  it("carve.lua writes each residue region to a file named by its offset", function()
    local outdir = dir .. "/carved"
    local out = example("carve", h.q(leak) .. " " .. h.q(outdir))
    local name = ("%s/0x%08x-leaked.bin"):format(outdir, leak_host)
    assert.matches(name, out, 1, true)
    -- the bytes qemu-io wrote to the cluster whose L2 entry was cleared
    assert.are.equal(("\x22"):rep(CLUSTER), h.read_file(name))
  end)

  it("timeline.lua lists snapshots by date and what changed between them", function()
    local out = example("timeline", h.q(snaps))
    local late = out:find("snapshot 2 (late)", 1, true)
    local early = out:find("snapshot 1 (early)", 1, true)
    local active = out:find("active disk", 1, true)
    assert.is_truthy(late and early and active)
    assert.is_true(late < early and early < active)
    -- late (dated first) -> early: the 1M write is not in early
    local first = out:sub(early, active)
    assert.matches("changed since snapshot 2 %(late%): 1 ranges, 65536 bytes", first)
    assert.matches("0x100000 %+0x10000", first)
    -- early -> active: the 1M and 5M writes
    local second = out:sub(active)
    assert.matches("changed since snapshot 1 %(early%): 2 ranges, 196608 bytes", second)
    assert.matches("0x500000 %+0x20000", second)
  end)

  it("chain.lua names the layer providing each guest range", function()
    local out = example("chain", h.q(top))
    assert.matches("0x000000000000 +0x20000      data        layer 1 " .. base, out, 1, true)
    assert.matches("0x000000200000 +0x10000      data        layer 0 " .. top, out, 1, true)
    assert.matches("layer 0 provides 65536 bytes", out, 1, true)
    assert.matches("layer 1 provides 131072 bytes", out, 1, true)
  end)

  it("evidence.lua digests every view and proves no file changed", function()
    local before_top, before_base = h.stat(top), h.sha256_file(base)
    local out = example("evidence", h.q(top))
    assert.matches("unchanged: every file has the same hash, size and mtime", out, 1, true)
    assert.matches("view    " .. sha256(h.raw_bytes(top)) .. "  active", out, 1, true)
    assert.matches("view    " .. sha256(h.raw_bytes(base)) .. "  backing layer 1", out, 1, true)
    assert.matches("before  " .. h.sha256_file(top), out, 1, true)
    assert.matches("after   " .. h.sha256_file(top), out, 1, true)
    assert.are.equal(before_top, h.stat(top))
    assert.are.equal(before_base, h.sha256_file(base))
    local snap_out = example("evidence", h.q(snaps))
    assert.matches("view    " .. sha256(h.raw_bytes(snaps, "late")) .. "  snapshot 2 (late)",
                   snap_out, 1, true)
  end)
end)

describe("make doc", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(h.cleanup)

  it("generates the API reference with LDoc", function()
    h.must("make -s doc BUILD=" .. h.q(dir))
    local index = h.read_file(dir .. "/doc/index.html")
    for _, name in ipairs({ "qcow2.open", "Image:owners", "Image:residue", "Image:diff" }) do
      assert.is_truthy(index:find(name, 1, true), name)
    end
    -- the functions are documented (anchors LDoc makes from doc/qcow2.luadoc)
    local mod = h.read_file(dir .. "/doc/modules/qcow2.html")
    for _, name in ipairs({ "open", "Image:owners", "Image:residue", "Image:diff",
                            "Image:digest", "Snapshot:open", "ClusterMap:extents" }) do
      assert.is_truthy(mod:find('name = "' .. name .. '"', 1, true), name)
    end
    assert.is_truthy(h.read_file(dir .. "/doc/modules/qcow2.edit.html"):find("qcow2.edit", 1, true))
  end)
end)
