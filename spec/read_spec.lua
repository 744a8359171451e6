-- Image:read and Image:digest against qemu-img's export of the same image.
local h = require("helpers")
local corpus = require("corpus")
local qcow2 = require("qcow2")

local KiB, MiB, GiB, TiB = corpus.KiB, corpus.MiB, corpus.GiB, corpus.TiB
local ZERO = "\0"

describe("Image:read", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  for _, kind in ipairs(corpus.small_kinds) do
    describe("on " .. kind.name, function()
      local path, raw, cs, size
      setup(function()
        path = kind.build(dir)
        raw = h.raw_bytes(path)
        cs, size = corpus.geometry(path)
      end)

      it("reads the whole disk byte-identical to qemu-img convert -O raw", function()
        local img = assert(qcow2.open(path))
        assert.are.equal(size, #raw)
        corpus.assert_bytes(img:read(0, size), raw, path)
        img:close()
      end)

      it("reads odd offsets and lengths spanning clusters and L2 tables like qemu-img", function()
        local img = assert(qcow2.open(path))
        local ranges = corpus.odd_ranges(cs, size)
        assert.is_true(#ranges >= 10)
        for _, r in ipairs(ranges) do
          local off, len = r[1], r[2]
          corpus.assert_bytes(img:read(off, len), raw:sub(off + 1, off + len),
            ("%s [%d, +%d)"):format(path, off, len), off)
        end
        img:close()
      end)

      it("reads the disk in 4097-byte pieces that join into qemu-img's export", function()
        local img = assert(qcow2.open(path))
        local parts, off = {}, 0
        while off < size do
          local len = math.min(4097, size - off)
          parts[#parts + 1] = assert(img:read(off, len))
          off = off + len
        end
        corpus.assert_bytes(table.concat(parts), raw, path .. " (pieces)")
        img:close()
      end)

      it("digests the disk like sha256sum of qemu-img's export", function()
        local img = assert(qcow2.open(path))
        local want = corpus.sha256(raw)
        assert.are.equal(want, img:digest())
        assert.are.equal(want, img:digest("sha256"))
        assert.are.equal(want, img:digest("sha256", 0, size))
        local off, len = cs - 7, math.min(size - cs, 3 * cs + 11)
        assert.are.equal(corpus.sha256(raw:sub(off + 1, off + len)), img:digest("sha256", off, len))
        img:close()
      end)
    end)
  end

  describe("on the guest workload of a v3 image with 64K clusters", function()
    local path, raw, cs, size, img
    setup(function()
      path = corpus.v3(dir, 64 * KiB)
      raw = h.raw_bytes(path)
      cs, size = corpus.geometry(path)
      img = assert(qcow2.open(path))
    end)
    teardown(function() img:close() end)

    local function both(off, len)
      local got = img:read(off, len)
      corpus.assert_bytes(got, raw:sub(off + 1, off + len), "oracle", off)
      return got
    end

    it("reads zero clusters as zeroes (kept host cluster, unmapped, never written)", function()
      assert.are.equal(ZERO:rep(3 * cs), both(4 * cs, 3 * cs))
    end)

    it("reads discarded clusters as zeroes", function()
      assert.are.equal(ZERO:rep(cs), both(7 * cs, cs))
    end)

    it("reads never-written ranges as zeroes when there is no backing file", function()
      assert.are.equal(ZERO:rep(cs * 10), both(8 * cs, cs * 10))
    end)

    it("reads an unaligned write exactly where it landed", function()
      local got = both(999, 3002)
      assert.are.equal("\x11" .. ("\x5a"):rep(3000) .. "\x11", got)
    end)

    it("reads a write straddling two clusters", function()
      assert.are.equal("\0" .. ("\x22"):rep(1500) .. "\0", both(3 * cs - 701, 1502))
    end)

    it("reads a partial zero write inside data", function()
      assert.are.equal("\x11" .. ZERO:rep(300) .. "\x11", both(cs + 99, 302))
    end)

    it("reads the last bytes of the disk", function()
      assert.are.equal(("\x66"):rep(5000), both(size - 5000, 5000))
      assert.are.equal("\x66", both(size - 1, 1))
    end)

    it("stops a read that crosses the end of the disk at the end, as io's read does", function()
      assert.are.equal(raw:sub(size - 9), img:read(size - 10, 20))
      assert.are.equal(raw:sub(size - 9), img:read(size - 10, 10))
    end)

    it("refuses reads that start past the end of the disk with code invalid", function()
      local data, msg, code = img:read(size + 1, 1)
      assert.is_nil(data)
      assert.are.equal("string", type(msg))
      assert.are.equal("invalid", code)
      data, msg, code = img:read(size + 65536, 65536)
      assert.is_nil(data); assert.are.equal("string", type(msg))
      assert.are.equal("invalid", code)
    end)
  end)

  describe("on packed compressed clusters", function()
    it("decompresses zlib and zstd clusters to qemu-img's bytes", function()
      for _, ctype in ipairs({ "zlib", "zstd" }) do
        local path = corpus.compressed(dir, ctype)
        local raw = h.raw_bytes(path)
        local img = assert(qcow2.open(path))
        assert.are.equal(("\x11"):rep(64 * KiB), img:read(0, 64 * KiB))
        assert.are.equal(raw:sub(64 * KiB + 1, 5 * 64 * KiB), img:read(64 * KiB, 4 * 64 * KiB))
        -- a read that starts in one compressed stream and ends in the next
        corpus.assert_bytes(img:read(64 * KiB - 5, 10), raw:sub(64 * KiB - 4, 64 * KiB + 5), ctype)
        img:close()
      end
    end)
  end)

  describe("on a 1 TiB image written near its end", function()
    local path, regions, img
    setup(function()
      path, regions = corpus.huge(dir)
      img = assert(qcow2.open(path))
    end)
    teardown(function() img:close() end)

    it("has the virtual size qemu-img reports", function()
      local _, size = corpus.geometry(path)
      assert.are.equal(TiB, size)
      assert.are.equal(size, img.size)
    end)

    it("reads the written regions (and their surroundings) like qemu-img", function()
      for _, r in ipairs(regions) do
        local off = math.max(0, r[1] - 3000)
        local len = math.min(TiB, r[1] + r[2] + 3000) - off
        local want = corpus.region_bytes(path, off, len)
        assert.are.equal(len, #want)
        assert.is_truthy(want:find("[^%z]")) -- the oracle did see the written data
        corpus.assert_bytes(img:read(off, len), want, ("%s [%d, +%d)"):format(path, off, len), off)
      end
    end)

    it("reads a sampled set of offsets across the disk like qemu-img", function()
      local x = 4242
      local samples = { { 0, 4096 }, { TiB - 1, 1 }, { TiB - 64 * KiB - 1, 2 }, { 512 * MiB - 1, 2 } }
      for _ = 1, 24 do
        x = (x * 1103515245 + 12345) % 2147483648
        local off = (x * 512 + x % 509) % (TiB - 5000)
        samples[#samples + 1] = { off, 1 + x % 4000 }
      end
      for _, s in ipairs(samples) do
        local want = corpus.region_bytes(path, s[1], s[2])
        corpus.assert_bytes(img:read(s[1], s[2]), want, ("%s [%d, +%d)"):format(path, s[1], s[2]), s[1])
      end
    end)

    it("digests regions like sha256 of qemu-img's export", function()
      local spans = {
        { TiB - 16 * MiB, 16 * MiB },
        { TiB // 2, 1 * MiB },
        { 512 * MiB - 2 * MiB, 4 * MiB },
        { 7 * GiB, 64 * KiB },
      }
      for _, s in ipairs(spans) do
        local want = corpus.sha256(corpus.region_bytes(path, s[1], s[2]))
        assert.are.equal(want, img:digest("sha256", s[1], s[2]))
      end
    end)
  end)
end)
