-- qcow2_open_memory (the C entry point of the libFuzzer harnesses), driven
-- by csrc/test/open_memory_test: an image read from a buffer reads as the
-- file does, follows no backing file or data file (even one sitting in the
-- working folder), and a read-write memory handle never touches the file.
local h = require "helpers"

local BUILD = os.getenv("BUILD") or "build"
local PROG = BUILD .. "/test/open_memory_test"

-- Runs the program in folder dir (where relative names would resolve).
local function open_memory(dir, file, mode)
  local prog = PROG:sub(1, 1) == "/" and PROG or (os.getenv("PWD") or ".") .. "/" .. PROG
  return h.must(("cd %s && %s %s %s"):format(h.q(dir), h.q(prog), h.q(file), mode or ""))
end

describe("qcow2_open_memory", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(h.cleanup)

  it("reads the image as qemu-io wrote it", function()
    h.create(dir .. "/a.qcow2", "1M", "cluster_size=4k")
    h.qemu_io(dir .. "/a.qcow2", { "write -P 0x5a 0 4k" })
    assert.are.equal("ok backing=- chain=0 byte0=5a size=1048576\n", open_memory(dir, "a.qcow2"))
  end)

  it("leaves the backing chain closed though the backing file is at hand", function()
    h.create(dir .. "/base.qcow2", "1M", "cluster_size=4k")
    h.qemu_io(dir .. "/base.qcow2", { "write -P 0x99 0 64k" })
    h.create(dir .. "/top.qcow2", "1M", "cluster_size=4k", "base.qcow2", "qcow2")
    -- through the chain byte 0 reads 0x99; without it, zero
    assert.are.equal("ok backing=base.qcow2 chain=0 byte0=00 size=1048576\n",
      open_memory(dir, "top.qcow2"))
  end)

  it("refuses an image whose data is in an external data file", function()
    h.create(dir .. "/d.qcow2", "1M", "cluster_size=4k,data_file=" .. dir .. "/d.raw")
    local out = open_memory(dir, "d.qcow2")
    assert.matches("^error unsupported <memory>: data file '[^']*/d.raw': not followed", out)
  end)

  it("writes a read-write handle's copy, never the file it came from", function()
    h.create(dir .. "/w.qcow2", "1M", "cluster_size=4k")
    local before = h.must("sha256sum " .. h.q(dir .. "/w.qcow2"))
    assert.are.equal("ok backing=- chain=0 byte0=7e size=1048576\n", open_memory(dir, "w.qcow2", "rw"))
    assert.are.equal(before, h.must("sha256sum " .. h.q(dir .. "/w.qcow2")))
  end)
end)
