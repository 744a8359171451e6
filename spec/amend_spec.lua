-- Image:amend and Image:make_empty against qemu-img: version round trips
-- keep the data (qemu-img compare) and pass qemu-img check, the settings
-- show in qemu-img info, refusals change nothing.
local h = require("helpers")
local qcow2 = require("qcow2")

local function qemu_check(path)
  local _, _, code = h.sh("qemu-img check " .. h.q(path))
  return code
end

local function amend(path, opts)
  local img = assert(qcow2.open(path, { mode = "rw" }))
  local ok, msg, code = img:amend(opts)
  img:close()
  return ok, msg, code
end

local function spec_info(path) return h.info_json(path)["format-specific"].data end

describe("Image:amend", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.cleanup() end)

  -- data, zero clusters (plain and preallocated), unallocated gaps
  local function with_zeroes(path, opts, backing)
    h.create(path, "4M", opts, backing)
    h.qemu_io(path, { "write -P 0x5a 0 192k", "write -z 64k 64k",
                      "write -P 0x6b 1M 64k", "write -z -u 2M 128k",
                      "write -z 1M 64k" })
  end

  it("goes from version 3 to 2 and back, keeping zero clusters' data", function()
    local path, orig = dir .. "/z.qcow2", dir .. "/z.orig.qcow2"
    with_zeroes(path)
    h.copy(path, orig)
    assert(amend(path, { version = 2 }))
    assert.are.equal("0.10", spec_info(path).compat)
    assert.are.equal(0, qemu_check(path))
    h.must("qemu-img compare " .. h.q(orig) .. " " .. h.q(path))
    assert(amend(path, { compat = "1.1" }))
    assert.are.equal("1.1", spec_info(path).compat)
    assert.are.equal(0, qemu_check(path))
    h.must("qemu-img compare " .. h.q(orig) .. " " .. h.q(path))
  end)

  it("allocates zeroes over a backing file when going to version 2", function()
    local base, path = dir .. "/base.qcow2", dir .. "/top.qcow2"
    h.create(base, "4M")
    h.qemu_io(base, { "write -P 0x77 0 4M" })
    with_zeroes(path, nil, base)
    local before = dir .. "/before.raw"
    h.qemu_img("convert -O raw " .. h.q(path) .. " " .. h.q(before))
    assert(amend(path, { version = 2 }))
    assert.are.equal(0, qemu_check(path))
    h.must("qemu-img compare -F raw " .. h.q(path) .. " " .. h.q(before))
    h.qemu_io(path, { "read -P 0 64k 64k", "read -P 0 2M 128k" })
  end)

  it("downgrades an image with a snapshot", function()
    local path, orig = dir .. "/s.qcow2", dir .. "/s.orig.qcow2"
    with_zeroes(path)
    h.qemu_img("snapshot -c s1 " .. h.q(path))
    h.qemu_io(path, { "write -z 0 64k" })
    h.copy(path, orig)
    assert(amend(path, { version = 2 }))
    assert.are.equal(0, qemu_check(path))
    h.must("qemu-img compare " .. h.q(orig) .. " " .. h.q(path))
    h.qemu_io(path, { "read -P 0 0 64k" })
  end)

  it("turns lazy refcounts on and off", function()
    local path = dir .. "/l.qcow2"
    h.create(path, "1M")
    assert(amend(path, { lazy_refcounts = true }))
    assert.is_true(spec_info(path)["lazy-refcounts"])
    assert(amend(path, { lazy_refcounts = false }))
    assert.is_false(spec_info(path)["lazy-refcounts"])
    assert.are.equal(0, qemu_check(path))
  end)

  it("changes the backing file and its format", function()
    local a, b, path = dir .. "/a.qcow2", dir .. "/b.raw", dir .. "/o.qcow2"
    h.create(a, "1M")
    h.must("truncate -s 1M " .. h.q(b))
    h.create(path, "1M", nil, a)
    assert(amend(path, { backing_file = b, backing_format = "raw" }))
    local info = h.info_json(path)
    assert.are.equal(b, info["backing-filename"])
    assert.are.equal("raw", info["backing-filename-format"])
    assert.are.equal(0, qemu_check(path))
  end)

  it("refuses a backing name that does not fit in the header cluster", function()
    local path = dir .. "/small.qcow2"
    h.create(path, "1M", "cluster_size=512")
    local ok, msg, code = amend(path, { backing_file = string.rep("x", 1000) })
    assert.is_nil(ok)
    assert.are.equal("invalid", code)
    assert.is_string(msg)
    assert.is_nil(h.info_json(path)["backing-filename"])
  end)

  it("changes the size", function()
    local path = dir .. "/g.qcow2"
    h.create(path, "1M")
    assert(amend(path, { size = 8 * 1024 * 1024 }))
    assert.are.equal(8 * 1024 * 1024, h.info_json(path)["virtual-size"])
    assert.are.equal(0, qemu_check(path))
  end)

  it("refuses what version 2 cannot hold, changing nothing", function()
    local shapes = {
      { "refcount_bits=8", "compat=0.10 requires refcount_bits=16" },
      { "extended_l2=on", "incompatible features 0x10" },
      { "compression_type=zstd", "zstd" },
    }
    for _, s in ipairs(shapes) do
      local path = dir .. "/r.qcow2"
      h.create(path, "1M", s[1])
      local sum = h.sha256_file(path)
      local ok, msg, code = amend(path, { version = 2 })
      assert.is_nil(ok)
      assert.are.equal("unsupported", code)
      assert.is_truthy(msg:find(s[2], 1, true))
      assert.are.equal(sum, h.sha256_file(path))
    end
    local path = dir .. "/lazy.qcow2"
    h.create(path, "1M")
    local ok, msg = amend(path, { version = 2, lazy_refcounts = true })
    assert.is_nil(ok)
    assert.is_truthy(msg:find("Lazy refcounts only supported", 1, true))
  end)

  it("refuses options only creation can set", function()
    local path = dir .. "/u.qcow2"
    h.create(path, "1M")
    for _, opts in ipairs { { cluster_size = 4096 }, { refcount_bits = 8 },
                            { preallocation = "full" }, { extended_l2 = true },
                            { compression_type = "zstd" } } do
      local ok, _, code = amend(path, opts)
      assert.is_nil(ok)
      assert.are.equal("unsupported", code)
    end
    assert(amend(path, { cluster_size = 65536 }))
  end)

  it("answers readonly on a read-only handle", function()
    local path = dir .. "/ro.qcow2"
    h.create(path, "1M")
    local img = assert(qcow2.open(path))
    local ok, _, code = img:amend { lazy_refcounts = true }
    assert.is_nil(ok)
    assert.are.equal("readonly", code)
    ok, _, code = img:make_empty()
    assert.is_nil(ok)
    assert.are.equal("readonly", code)
    img:close()
  end)
end)

describe("Image:make_empty", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.cleanup() end)

  local function empty(path)
    local img = assert(qcow2.open(path, { mode = "rw" }))
    assert(img:make_empty())
    img:close()
  end

  it("empties a version 3 image and truncates the file", function()
    local path = dir .. "/e.qcow2"
    h.create(path, "16M")
    h.qemu_io(path, { "write -P 0x42 0 8M", "write -z 9M 1M" })
    empty(path)
    assert.are.equal(0, qemu_check(path))
    h.qemu_io(path, { "read -P 0 0 16M" })
    assert.are.equal(4 * 65536, #h.read_file(path))
    assert.are.same({}, (function()
      local out = {}
      for _, e in ipairs(h.map_json(path)) do
        if e.data then out[#out + 1] = e end
      end
      return out
    end)())
  end)

  it("discards everything of a version 2 image, showing the backing file", function()
    local base, path = dir .. "/b.qcow2", dir .. "/t.qcow2"
    h.create(base, "4M")
    h.qemu_io(base, { "write -P 0x31 0 4M" })
    h.create(path, "4M", "compat=0.10", base)
    h.qemu_io(path, { "write -P 0x32 0 1M" })
    empty(path)
    assert.are.equal(0, qemu_check(path))
    h.qemu_io(path, { "read -P 0x31 0 4M" })
  end)

  it("keeps snapshots when emptying the active disk", function()
    local path = dir .. "/s.qcow2"
    h.create(path, "4M")
    h.qemu_io(path, { "write -P 0x21 0 2M" })
    h.qemu_img("snapshot -c s1 " .. h.q(path))
    h.qemu_io(path, { "write -P 0x22 1M 2M" })
    empty(path)
    assert.are.equal(0, qemu_check(path))
    h.qemu_io(path, { "read -P 0 0 4M" })
    h.qemu_img("snapshot -a s1 " .. h.q(path))
    h.qemu_io(path, { "read -P 0x21 0 2M", "read -P 0 2M 2M" })
  end)
end)
