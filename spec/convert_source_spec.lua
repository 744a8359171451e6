-- img:convert reads its source through the bulk reader (bulk_read.c's
-- qcow2_bulk_read, issue 14): compressed clusters are inflated by worker
-- threads and by the calling thread, a cluster-aligned piece at a time.
-- Held against the source file qemu-img compressed and qemu-img's own
-- export: zlib and zstd, small and 2 MiB clusters, disks whose last
-- cluster is cut short, compressed clusters mixed with data, zeroes and a
-- backing file, with 1 (no worker), 2 and 3 threads. A damaged stream
-- fails the convert with the message img:read gives for that cluster.
local h = require("helpers")
local qcow2 = require("qcow2")

local KiB, MiB = 1024, 1024 * 1024
local THREADS = { 1, 2, 3 }

local function qemu_compare(a, b)
  local ok = h.sh("qemu-img compare -q " .. h.q(a) .. " " .. h.q(b))
  return ok
end

-- qemu-img's export of the guest disk, hashed.
local function export_sha(path)
  local raw = path .. ".export"
  h.qemu_img("convert -f qcow2 -O raw " .. h.q(path) .. " " .. h.q(raw))
  local sum = h.sha256_file(raw)
  os.remove(raw)
  return sum
end

-- The source converted to raw and to qcow2 with each thread count: the
-- raw output hashes to want, the qcow2 output reads as the source and
-- checks clean.
local function converts_as(path, want, dir)
  local img = assert(qcow2.open(path))
  for _, threads in ipairs(THREADS) do
    local raw = ("%s/out-%d.raw"):format(dir, threads)
    local out = ("%s/out-%d.qcow2"):format(dir, threads)
    assert.is_true(img:convert(raw, { format = "raw", threads = threads }))
    assert.are.equal(want, h.sha256_file(raw), threads .. " thread(s), raw")
    assert.is_true(img:convert(out, { threads = threads }))
    assert.is_true(qemu_compare(path, out), threads .. " thread(s), qcow2")
    h.assert_clean(out)
    os.remove(raw)
    os.remove(out)
  end
  img:close()
end

describe("convert of compressed sources (parallel inflate)", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  -- (a raw source's size is rounded up to 512 bytes by qemu-img)
  local SHAPES = {
    { 64 * KiB, 3 * MiB + 3 * 512, "zlib" },
    { 64 * KiB, 2 * MiB + 512, "zstd" },
    { 4 * KiB, 2 * MiB + 1024, "zstd" },
    { 2 * MiB, 5 * MiB + 1536, "zlib" },
  }
  for _, shape in ipairs(SHAPES) do
    local cs, size, ctype = shape[1], shape[2], shape[3]
    it(("converts a %s image (%d-byte clusters, %d bytes) as qemu-img compressed it"):format(ctype, cs, size), function()
      local name = ("%s-%d-%d"):format(ctype, cs, size)
      local p, src = h.compressed_image(dir, name, size, cs, ctype)
      local want = h.sha256_file(src)
      assert.are.equal(want, export_sha(p))
      local img = assert(qcow2.open(p))
      assert.is_true(img:map():stats().compressed > size // 2)
      img:close()
      converts_as(p, want, dir)
    end)
  end

  it("converts compressed clusters mixed with data, zeroes, discards and a backing file", function()
    local top = h.mixed_compressed_chain(dir)
    converts_as(top, export_sha(top), dir)
  end)

  it("fails on a damaged stream with img:read's message, whatever the thread count", function()
    local p = h.compressed_image(dir, "damaged", 4 * MiB, 64 * KiB, "zlib")
    local img = assert(qcow2.open(p))
    -- the third compressed extent: past the first piece's start
    local victim, seen = nil, 0
    for e in img:map():extents() do
      if e.type == "compressed" then
        seen = seen + 1
        if seen == 3 then victim = e break end
      end
    end
    img:close()
    assert.is_truthy(victim)
    h.poke(p, victim.offset, ("\xff"):rep(32))
    img = assert(qcow2.open(p))
    local _, want = img:read(victim.start, 4096)
    assert.matches(("guest 0x%x%%) does not decompress"):format(victim.start), want)
    for _, threads in ipairs(THREADS) do
      local out = ("%s/damaged-%d.raw"):format(dir, threads)
      local ok, msg, code = img:convert(out, { format = "raw", threads = threads })
      assert.is_nil(ok)
      assert.are.equal(want, msg, threads .. " thread(s)")
      assert.are.equal("corrupt", code)
    end
    img:close()
  end)
end)
