-- img:digest through the bulk reader (csrc/engine/bulk_read.c, issue 14):
-- compressed clusters are inflated on worker threads and hashed in guest
-- order. Held against sha256 of `qemu-img convert -O raw` (zlib and zstd,
-- several cluster sizes, disks whose last cluster is cut short, ranges at
-- odd offsets, compressed clusters mixed with data, zeroes and a backing
-- file), and, on damaged images, against the pristine export with the
-- damage zeroed (on_error = "zero"): ranges reported in guest order, the
-- first damage in guest order failing a plain digest. The engine is also
-- driven from C (csrc/test/bulk_read_test.c) with no worker thread, 1, 2
-- and 3: every count gives the same bytes and the same damage. `make tsan`
-- runs this spec with that program built with -fsanitize=thread.
local h = require("helpers")
local qcow2 = require("qcow2")

local KiB, MiB = 1024, 1024 * 1024
local BUILD = os.getenv("BUILD") or "build"
local PROG = os.getenv("BULK_READ_TEST") or (BUILD .. "/test/bulk_read_test")
local THREADS = { -1, 1, 2, 3 }

local function sha_of_file(path, offset, length)
  if not offset then return h.sha256_file(path) end
  return (h.must(("tail -c +%d %s | head -c %d | sha256sum"):format(offset + 1, h.q(path), length))
    :match("^(%x+)"))
end

-- qemu-img's export of the guest disk.
local function export(path)
  local raw = path .. ".export"
  h.qemu_img("convert -f qcow2 -O raw " .. h.q(path) .. " " .. h.q(raw))
  return raw
end

-- The C program's output for each thread count: all equal, returned once.
-- Without zero mode, qcow2_bulk_read's steps (convert's reads) give the
-- same output too (damage pieces follow the steps, so not in zero mode).
local function via_c(path, extra)
  local first
  local ways = { "" }
  if not (extra or ""):match("zero") then ways[2] = "direct " end
  for _, way in ipairs(ways) do
    for _, t in ipairs(THREADS) do
      local ok, out = h.sh(("%s %s %d %s%s"):format(PROG, h.q(path), t, way, extra or ""), true)
      assert(out:match("^sha256 ") or out:match("^error ") or out:match("^damage "), out)
      if first then
        assert.are.equal(first, out, ("%s%d threads"):format(way, t))
      else
        first = out
      end
      assert.is_true(ok == (out:match("^error ") == nil))
    end
  end
  return first
end

local compressed_image = h.compressed_image

describe("digest of compressed images (worker threads)", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  -- sizes: one chunk with a short last cluster, several 4 MiB chunks with
  -- a tail, small and big clusters
  local SHAPES = {
    -- (a raw source's size is rounded up to 512 bytes by qemu-img)
    { 64 * KiB, 1 * MiB + 3 * 512 },
    { 64 * KiB, 9 * MiB + 79 * 512 },
    { 4 * KiB, 5 * MiB + 1024 },
    { 2 * MiB, 7 * MiB + 1536 },
  }
  for _, ctype in ipairs({ "zlib", "zstd" }) do
    for _, shape in ipairs(SHAPES) do
      local cs, size = shape[1], shape[2]
      it(("hashes a %s image (%d-byte clusters, %d bytes) as qemu-img's export"):format(ctype, cs, size), function()
        local name = ("%s-%d-%d"):format(ctype, cs, size)
        local p, src = compressed_image(dir, name, size, cs, ctype)
        local raw = export(p)
        local want = sha_of_file(raw)
        assert.are.equal(sha_of_file(src), want)     -- the oracle is the source
        local img = assert(qcow2.open(p))
        assert.is_true(img:map():stats().compressed > size // 2)
        assert.are.equal(want, img:digest("sha256"))
        -- ranges at odd offsets, across chunk and cluster boundaries
        for _, r in ipairs({ { 1, size - 2 }, { cs - 7, 3 * cs + 11 }, { 4 * MiB - 5, 10 },
                             { size - 100, 100 } }) do
          if r[1] + r[2] <= size then
            assert.are.equal(sha_of_file(raw, r[1], r[2]), img:digest("sha256", r[1], r[2]),
              ("range %d+%d"):format(r[1], r[2]))
          end
        end
        img:close()
        assert.are.equal("sha256 " .. want .. "\n", via_c(p))
        local a, n = cs - 7, math.min(3 * cs + 11, size - cs)
        assert.are.equal("sha256 " .. sha_of_file(raw, a, n) .. "\n", via_c(p, ("%d %d"):format(a, n)))
      end)
    end
  end

  it("hashes compressed clusters mixed with data, zeroes, discards and a backing file", function()
    local top, base = h.mixed_compressed_chain(dir)
    local want = sha_of_file(export(top))
    local img = assert(qcow2.open(top))
    assert.are.equal(want, img:digest())
    img:close()
    assert.are.equal("sha256 " .. want .. "\n", via_c(top))
    assert.are.equal("sha256 " .. sha_of_file(export(base)) .. "\n", via_c(base))
  end)
end)

describe("digest of damaged compressed images", function()
  local dir, pristine, raw
  local CS = 64 * KiB
  local MASK54 = (1 << 54) - 1    -- 64 KiB clusters: 62 - (16 - 8) offset bits

  setup(function()
    dir = h.tmpdir()
    pristine = compressed_image(dir, "pristine", 10 * MiB, CS, "zlib")
    raw = export(pristine)
  end)
  teardown(function() h.cleanup() end)

  local function l2_entry_at(path, guest)
    local l1 = h.get_be64(path, h.get_be64(path, 40))
    return (l1 & 0x00fffffffffffe00) + 8 * (guest // CS)
  end

  -- a compressed cluster whose stream is garbage: "does not decompress"
  local function break_stream(path, guest)
    local e = h.get_be64(path, l2_entry_at(path, guest))
    assert(e & (1 << 62) ~= 0, "guest " .. guest .. " is not compressed")
    h.poke(path, e & MASK54, ("\xff"):rep(32))
  end
  -- a compressed L2 entry pointing past the file's end (a plain piece's
  -- damage: the lookup refuses it)
  local function break_entry(path, guest)
    local at = l2_entry_at(path, guest)
    h.poke(path, at, h.be64((h.get_be64(path, at) & ~MASK54) | 0x10000000))
  end

  local function damaged(name, pokes)
    local p = dir .. "/" .. name .. ".qcow2"
    h.copy(pristine, p)
    for _, poke in ipairs(pokes) do poke[1](p, poke[2]) end
    return p
  end

  local function zeroed_sha(ranges)
    local copy = dir .. "/zeroed.raw"
    h.copy(raw, copy)
    for _, r in ipairs(ranges) do h.poke(copy, r[1], ("\0"):rep(r[2])) end
    return h.sha256_file(copy)
  end

  -- guest order: an entry before a stream, a stream in a later chunk
  local A = { { break_entry, 3 * CS }, { break_stream, 5 * CS }, { break_stream, 70 * CS } }
  -- a stream first, then an entry
  local B = { { break_stream, 3 * CS }, { break_entry, 5 * CS } }

  it("zeroes and reports every damaged cluster in guest order (on_error = \"zero\")", function()
    for name, set in pairs({ A = A, B = B }) do
      local p = damaged(name, set)
      local img = assert(qcow2.open(p))
      local sum, ranges = img:digest("sha256", { on_error = "zero" })
      local want = {}
      for i, poke in ipairs(set) do
        want[i] = { poke[2], CS }
        assert.are.same(want[i], { ranges[i].start, ranges[i].length }, name .. " range " .. i)
        local why = poke[1] == break_stream and "does not decompress" or "past the end of the file"
        assert.matches(why, ranges[i].reason)
        assert.matches(("guest 0x%x"):format(poke[2]), (ranges[i].reason:gsub("offset ", "")))
      end
      assert.are.equal(#set, #ranges)
      assert.are.equal(zeroed_sha(want), sum)
      img:close()
      local lines = {}
      for i, r in ipairs(want) do lines[i] = ("damage %d %d %d"):format(r[1], r[2], r[1]) end
      lines[#lines + 1] = "sha256 " .. zeroed_sha(want)
      assert.are.equal(table.concat(lines, "\n") .. "\n", via_c(p, "zero"))
    end
  end)

  it("fails a plain digest with the first damage in guest order", function()
    local p = damaged("A", A)
    local img = assert(qcow2.open(p))
    local sum, msg, code = img:digest()
    assert.is_nil(sum)
    assert.are.equal("corrupt", code)
    assert.matches("past the end of the file", msg)
    -- past the first damage, the stream's own message
    sum, msg, code = img:digest("sha256", 4 * CS, 4 * MiB)
    assert.is_nil(sum)
    assert.are.equal("corrupt", code)
    assert.matches(("compressed cluster at host 0x%%x+ %%(guest 0x%x%%) does not decompress"):format(5 * CS), msg)
    -- a range that misses the damage digests normally
    assert.are.equal(sha_of_file(raw, 6 * CS, 60 * CS), img:digest("sha256", 6 * CS, 60 * CS))
    img:close()
    p = damaged("B", B)
    img = assert(qcow2.open(p))
    sum, msg, code = img:digest()
    assert.is_nil(sum)
    assert.are.equal("corrupt", code)
    assert.matches(("guest 0x%x%%) does not decompress"):format(3 * CS), msg)
    img:close()
    assert.matches("^error %-6 .*does not decompress", via_c(p))
  end)
end)
