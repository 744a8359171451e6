-- img:commit against qemu-img commit doing the same on copies: the same
-- guest bytes in the overlay and in the backing file (qemu-img compare,
-- raw exports), qemu-img check clean on both, the overlay emptied, and
-- the writer's lock taken on the backing file.
local h = require("helpers")
local qcow2 = require("qcow2")

local MiB = 1024 * 1024

local export_sha = h.export_sha256
local clean = h.assert_clean

describe("img:commit", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(h.cleanup)

  -- Build the chain in `sub` twice (ours, theirs), commit each, compare.
  local function both(build, base_fmt)
    for _, sub in ipairs({ "ours", "theirs" }) do
      h.must("mkdir -p " .. h.q(dir .. "/" .. sub))
      build(dir .. "/" .. sub)
    end
    local ours, theirs = dir .. "/ours", dir .. "/theirs"
    local before = export_sha(ours .. "/top.qcow2")
    h.must("qemu-img commit -q " .. h.q(theirs .. "/top.qcow2"))
    local img = assert(qcow2.open(ours .. "/top.qcow2", { mode = "rw" }))
    assert(img:commit())
    -- the chain is open again, read-only, and reads the same
    assert.is_not_nil(img:backing())
    assert.is_true(img:backing().read_only)
    img:close()
    local base = base_fmt == "raw" and "/base.raw" or "/base.qcow2"
    assert.equal(before, export_sha(ours .. "/top.qcow2"))
    assert.equal(export_sha(theirs .. base, base_fmt), export_sha(ours .. base, base_fmt))
    h.must("qemu-img compare " .. h.q(ours .. "/top.qcow2") .. " " .. h.q(theirs .. "/top.qcow2"))
    clean(ours .. "/top.qcow2")
    if base_fmt ~= "raw" then clean(ours .. base) end
    -- emptied: the overlay holds no data of its own
    for _, e in ipairs(h.map_json(ours .. "/top.qcow2")) do
      assert.is_true(e.depth > 0 or not e.data, "overlay still holds data at " .. e.start)
    end
    return ours
  end

  it("into a qcow2 backing file: data, zero clusters, partial clusters", function()
    both(function(d)
      h.create(d .. "/base.qcow2", 4 * MiB, "cluster_size=4096")
      h.qemu_io(d .. "/base.qcow2", { "write -P 0x10 0 2M", "write -c -P 0x12 3M 64k" })
      h.create(d .. "/top.qcow2", 4 * MiB, "cluster_size=65536", "base.qcow2")
      h.qemu_io(d .. "/top.qcow2", { "write -P 0x20 100k 3k", "write -z 1M 128k",
                                     "write -P 0x21 3M 70k", "write -c -P 0x22 2M 64k" })
    end)
  end)

  it("into a raw backing file", function()
    both(function(d)
      h.write_file(d .. "/base.raw", h.random_bytes(2 * MiB, 7))
      h.create(d .. "/top.qcow2", 2 * MiB, "", "base.raw", "raw")
      h.qemu_io(d .. "/top.qcow2", { "write -P 0x20 100k 3k", "write -z 1M 128k" })
    end, "raw")
  end)

  it("grows a smaller backing file to the overlay's size", function()
    local ours = both(function(d)
      h.create(d .. "/base.qcow2", 1 * MiB)
      h.qemu_io(d .. "/base.qcow2", { "write -P 0x10 0 1M" })
      h.create(d .. "/top.qcow2", 3 * MiB, "", "base.qcow2")
      h.qemu_io(d .. "/top.qcow2", { "write -P 0x20 2M 64k", "write -P 0x21 512k 4k" })
    end)
    assert.equal(3 * MiB, h.info_json(ours .. "/base.qcow2")["virtual-size"])
  end)

  it("of a middle image in a chain, with extended L2 and snapshots kept", function()
    both(function(d)
      h.create(d .. "/root.qcow2", 2 * MiB)
      h.qemu_io(d .. "/root.qcow2", { "write -P 0x01 0 2M" })
      h.create(d .. "/base.qcow2", 2 * MiB, "extended_l2=on", "root.qcow2")
      h.qemu_io(d .. "/base.qcow2", { "write -P 0x10 4k 8k" })
      h.create(d .. "/top.qcow2", 2 * MiB, "extended_l2=on", "base.qcow2")
      h.qemu_io(d .. "/top.qcow2", { "write -P 0x20 34k 2k", "write -z 1M 32k" })
      h.qemu_img("snapshot -c s1 " .. h.q(d .. "/top.qcow2"))
    end)
  end)

  it("clusters written out of guest order, next to zero and compressed ones", function()
    both(function(d)
      h.create(d .. "/base.qcow2", 4 * MiB, "cluster_size=4096")
      h.qemu_io(d .. "/base.qcow2", { "write -P 0x10 0 4M" })
      h.create(d .. "/top.qcow2", 4 * MiB, "cluster_size=65536", "base.qcow2")
      -- host clusters allocated backwards: guest-contiguous, host-descending
      h.qemu_io(d .. "/top.qcow2", { "write -P 0x23 192k 64k", "write -P 0x22 128k 64k",
                                     "write -P 0x21 64k 64k", "write -P 0x20 0 5k",
                                     "write -z 256k 128k", "write -P 0x24 384k 1k",
                                     "write -c -P 0x25 448k 64k", "write -P 0x26 512k 64k",
                                     "write -P 0x27 4032k 64k" })
    end)
  end)

  it("takes the writer's lock: refused while another handle reads the backing file", function()
    h.create(dir .. "/base.qcow2", 1 * MiB)
    h.create(dir .. "/top.qcow2", 1 * MiB, "", "base.qcow2")
    h.qemu_io(dir .. "/top.qcow2", { "write -P 0x20 0 64k" })
    local sha_top = h.sha256_file(dir .. "/top.qcow2")
    local sha_base = h.sha256_file(dir .. "/base.qcow2")
    -- a reader without -U does not share writes (QEMU's qcow2 locks)
    local other = assert(qcow2.open(dir .. "/base.qcow2"))
    local img = assert(qcow2.open(dir .. "/top.qcow2", { mode = "rw" }))
    local ok, msg, code = img:commit()
    assert.is_nil(ok)
    assert.equal("busy", code, msg)
    other:close()
    img:close()
    assert.equal(sha_top, h.sha256_file(dir .. "/top.qcow2"))
    assert.equal(sha_base, h.sha256_file(dir .. "/base.qcow2"))
  end)

  it("refuses what it cannot do", function()
    h.create(dir .. "/alone.qcow2", 1 * MiB)
    local img = assert(qcow2.open(dir .. "/alone.qcow2", { mode = "rw" }))
    local _, _, code = img:commit()
    assert.equal("invalid", code)
    img:close()
    h.create(dir .. "/base.qcow2", 1 * MiB)
    h.create(dir .. "/top.qcow2", 1 * MiB, "", "base.qcow2")
    img = assert(qcow2.open(dir .. "/top.qcow2"))
    _, _, code = img:commit()
    assert.equal("readonly", code)
    img:close()
    img = assert(qcow2.open(dir .. "/top.qcow2", { mode = "rw", backing = false }))
    _, _, code = img:commit()
    assert.equal("unsupported", code)
    img:close()
  end)
end)
