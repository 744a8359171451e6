-- The qcow2 tool's rebase, commit, resize and amend, against qemu-img's
-- subcommands of the same spelling run on copies: the same guest bytes
-- (qemu-img compare), the same header results, exit statuses, and clean
-- checks.
local h = require "helpers"

local MiB = 1024 * 1024

local run = h.run_tool

local function same(a, b)
  local ok, out = h.sh("qemu-img compare " .. h.q(a) .. " " .. h.q(b), true)
  assert(ok, out)
  assert.equal(0, h.check_json(a).corruptions or 0)
end

describe("qcow2 tool lifecycle commands", function()
  local dir
  before_each(function()
    dir = h.tmpdir()
    h.create(dir .. "/base.qcow2", 2 * MiB)
    h.qemu_io(dir .. "/base.qcow2", { "write -P 0x10 0 1M" })
    h.create(dir .. "/new.qcow2", 2 * MiB)
    h.qemu_io(dir .. "/new.qcow2", { "write -P 0x30 512k 1M" })
    h.create(dir .. "/top.qcow2", 2 * MiB, "", "base.qcow2")
    h.qemu_io(dir .. "/top.qcow2", { "write -P 0x20 64k 64k", "write -z 1536k 64k" })
  end)
  after_each(h.cleanup)

  it("rebase -b -F, and -u, as qemu-img rebase", function()
    for _, u in ipairs({ "", "-u " }) do
      h.copy(dir .. "/top.qcow2", dir .. "/a.qcow2")
      h.copy(dir .. "/top.qcow2", dir .. "/b.qcow2")
      local _, err, code = run("rebase " .. u .. "-b new.qcow2 -F qcow2 " .. h.q(dir .. "/a.qcow2"))
      assert.equal(0, code, err)
      h.must("cd " .. h.q(dir) .. " && qemu-img rebase " .. u .. "-b new.qcow2 -F qcow2 b.qcow2")
      same(dir .. "/a.qcow2", dir .. "/b.qcow2")
      assert.equal("new.qcow2", h.info_json(dir .. "/a.qcow2")["backing-filename"])
    end
    -- without -F: refused as qemu-img refuses it
    local _, err, code = run("rebase -b new.qcow2 " .. h.q(dir .. "/top.qcow2"))
    assert.equal(1, code)
    assert.matches("backing format must be specified", err)
    assert.equal("base.qcow2", h.info_json(dir .. "/top.qcow2")["backing-filename"])
  end)

  it("commit, as qemu-img commit", function()
    h.must("mkdir " .. h.q(dir .. "/q") .. " && cp " .. h.q(dir .. "/base.qcow2") .. " "
           .. h.q(dir .. "/top.qcow2") .. " " .. h.q(dir .. "/q/"))
    local out, err, code = run("commit " .. h.q(dir .. "/top.qcow2"))
    assert.equal(0, code, err)
    assert.equal("Image committed.\n", out)
    assert.equal("Image committed.\n", h.must("qemu-img commit " .. h.q(dir .. "/q/top.qcow2")))
    same(dir .. "/base.qcow2", dir .. "/q/base.qcow2")
    same(dir .. "/top.qcow2", dir .. "/q/top.qcow2")
  end)

  it("convert -t CACHE -O FMT, as qemu-img convert -t", function()
    local top = dir .. "/top.qcow2"
    for _, t in ipairs({ "unsafe", "writeback", "writethrough" }) do
      for _, fmt in ipairs({ "qcow2", "raw" }) do
        local out = dir .. "/conv-" .. t .. "." .. fmt
        local _, err, code = run(("convert -t %s -O %s %s %s"):format(t, fmt, h.q(top), h.q(out)))
        assert.equal(0, code, err)
        local ok, cmp = h.sh(("qemu-img compare %s %s %s"):format(fmt == "raw" and "-F raw" or "",
          h.q(top), h.q(out)), true)
        assert(ok, cmp)
      end
    end
    local _, _, code = run(("convert -t sometimes %s %s"):format(h.q(top), h.q(dir .. "/x.qcow2")))
    assert.is_not.equal(0, code)
  end)

  it("resize SIZE, +SIZE, -SIZE with --shrink, as qemu-img resize", function()
    h.copy(dir .. "/base.qcow2", dir .. "/b.qcow2")
    for _, args in ipairs({ { "", "3M" }, { "", "+1M" }, { "--shrink ", "-1536k" } }) do
      local out, err, code = run("resize " .. args[1] .. h.q(dir .. "/base.qcow2") .. " " .. args[2])
      assert.equal(0, code, err)
      assert.equal("Image resized.\n", out)
      h.must("qemu-img resize -q " .. args[1] .. h.q(dir .. "/b.qcow2") .. " -- " .. args[2])
      same(dir .. "/base.qcow2", dir .. "/b.qcow2")
      assert.equal(h.info_json(dir .. "/b.qcow2")["virtual-size"], h.info_json(dir .. "/base.qcow2")["virtual-size"])
    end
    -- a shrink without --shrink is refused, nothing changes
    local _, err, code = run("resize " .. h.q(dir .. "/base.qcow2") .. " 1M")
    assert.equal(1, code)
    assert.matches("%-%-shrink", err)
    assert.equal(2560 * 1024, h.info_json(dir .. "/base.qcow2")["virtual-size"])
  end)

  it("amend -o, as qemu-img amend", function()
    h.copy(dir .. "/base.qcow2", dir .. "/b.qcow2")
    local opts = "compat=0.10"
    local _, err, code = run("amend -o " .. opts .. " " .. h.q(dir .. "/base.qcow2"))
    assert.equal(0, code, err)
    h.must("qemu-img amend -o " .. opts .. " " .. h.q(dir .. "/b.qcow2"))
    assert.equal("0.10", h.info_json(dir .. "/base.qcow2")["format-specific"].data.compat)
    same(dir .. "/base.qcow2", dir .. "/b.qcow2")
    _, err, code = run("amend -o compat=1.1,lazy_refcounts=on " .. h.q(dir .. "/base.qcow2"))
    assert.equal(0, code, err)
    assert.is_true(h.info_json(dir .. "/base.qcow2")["format-specific"].data["lazy-refcounts"])
    _, err, code = run("amend -o cluster_size=4096 " .. h.q(dir .. "/base.qcow2"))
    assert.equal(1, code)
    assert.matches("Cannot change cluster_size", err)
    _, _, code = run("amend -o bogus=1 " .. h.q(dir .. "/base.qcow2"))
    assert.equal(1, code)
    _, _, code = run("amend " .. h.q(dir .. "/base.qcow2"))
    assert.equal(2, code)
  end)
end)
