-- The bounded refcount-block cache (csrc/engine/refcount_cache.c): with a
-- tiny cache (refcount_cache_size = 2 clusters) and 512-byte clusters, a
-- workload that touches many refcount blocks (evicting all the time, and
-- growing the refcount table with 64-bit refcounts) passes qemu-img check,
-- compares equal to its model and reads it back; every refcount the
-- cached handle reports matches the bytes in the file; and a raw_write of
-- a refcount entry is seen by img:refcount() at once.
local h = require("helpers")
local model = require("model")
local qcow2 = require("qcow2")

local KiB, MiB = 1 << 10, 1 << 20
local CS = 512
local TINY = { mode = "rw", refcount_cache_size = 2 * CS }

-- The refcount of host cluster c decoded from the image file's own bytes
-- (raw_read: no engine cache involved), as docs 4.2 packs it.
local function file_refcounts(img, rb, clusters)
  local hdr = assert(img:header())
  local per_block = CS * 8 // rb
  local reftable = assert(img:raw_read(hdr.refcount_table_offset,
                                       hdr.refcount_table_clusters * CS))
  local blocks, out = {}, {}
  for c = 0, clusters - 1 do
    local index = c // per_block
    local value = 0
    if index * 8 < #reftable then
      local entry = string.unpack(">I8", reftable, index * 8 + 1)
      local offset = entry & ~0x1ff
      if offset ~= 0 then
        blocks[offset] = blocks[offset] or assert(img:raw_read(offset, CS))
        local block, e = blocks[offset], c % per_block
        if rb < 8 then
          local byte = block:byte(e // (8 // rb) + 1)
          value = (byte >> ((e % (8 // rb)) * rb)) & ((1 << rb) - 1)
        else
          value = string.unpack(">I" .. (rb // 8), block, e * (rb // 8) + 1)
        end
      end
    end
    out[c] = value
  end
  return out
end

-- Writes spread over the disk (host clusters are allocated in order, so
-- the file grows through many refcount blocks), frees in early blocks,
-- rewrites that reuse them, zeroes, reopens, then random operations.
local function workload(disk, total, seed)
  local ops, n = {}, 0
  local chunk = 64 * KiB
  local stride = disk // (total // chunk)
  for off = 0, disk - chunk, stride do
    n = n + 1
    ops[#ops + 1] = { kind = "write", offset = off + (n % 7) * 3, length = chunk - 5, n = n }
  end
  for i = 1, #ops, 3 do
    local w = ops[i]
    ops[#ops + 1] = { kind = "discard", offset = w.offset - w.offset % CS, length = 16 * KiB }
  end
  ops[#ops + 1] = { kind = "reopen" }
  for i = 2, #ops // 2, 4 do
    local w = ops[i]
    if w.kind == "write" then
      n = n + 1
      ops[#ops + 1] = { kind = "write", offset = w.offset + 100, length = 20 * KiB, n = n }
      ops[#ops + 1] = { kind = "zero", offset = w.offset + 30 * KiB, length = 4 * KiB,
                        unmap = i % 8 == 2 }
    end
  end
  for _, op in ipairs(model.random_ops(seed, disk, CS,
                                            { count = 60, max_length = 96 * KiB, avoid = ops })) do
    ops[#ops + 1] = op
  end
  return ops
end

local function run(rb, disk, total, seed)
  local dir = h.tmpdir()
  local path = dir .. "/disk.qcow2"
  local created = assert(qcow2.create(path, { size = disk, cluster_size = CS,
                                              refcount_bits = rb }))
  local table_before = created:header().refcount_table_offset
  created:close()
  local img = assert(qcow2.open(path, TINY))
  local m = model.new(dir .. "/model.raw", disk, { cluster_size = CS })
  local function reopen() return assert(qcow2.open(path, TINY)) end
  for i, op in ipairs(workload(disk, total, seed)) do
    local ok, msg, code
    img, ok, msg, code = model.apply_library(img, op, reopen)
    if op.kind ~= "reopen" then model.assert_op(i, op, ok, msg, code, 3, false) end
    m:apply(op)
  end

  -- Every refcount a cached handle answers is the one in the file (a
  -- fresh handle: img:refcount checks blocks against the file size seen
  -- at open, which a handle that grew the file has outgrown).
  img:close()
  img = reopen()
  local hdr = assert(img:header())
  local clusters = #h.read_file(path) // CS
  local expected = file_refcounts(img, rb, clusters + 8)
  for c = 0, clusters + 7 do
    local got = assert(img:refcount(c))
    if got ~= expected[c] then
      error(("cluster %d: img:refcount says %d, the file says %d"):format(c, got, expected[c]))
    end
  end
  img:close()

  local clean, _, code, out = model.check(path)
  assert.is_true(clean, "qemu-img check (exit " .. tostring(code) .. "):\n" .. out)
  local same, cmp = m:compare(path)
  assert.is_true(same, "qemu-img compare with the model:\n" .. cmp)
  local ro <close> = assert(qcow2.open(path, { refcount_cache_size = 2 * CS }))
  assert(m:verify(ro))
  m:close()
  return hdr, table_before, clusters
end

describe("the refcount-block cache", function()
  teardown(h.cleanup)

  it("with 2 blocks, 512-byte clusters and 1-bit refcounts, evicts and stays right", function()
    -- 4096 clusters (2 MiB of file) per block: ~9 MiB of file, 5+ blocks
    local _, _, clusters = run(1, 24 * MiB, 8 * MiB, 11)
    assert.is_true(clusters > 4 * 4096, "the workload should span 5+ refcount blocks")
  end)

  it("with 2 blocks, 512-byte clusters and 64-bit refcounts, grows the table and stays right", function()
    -- 64 clusters (32 KiB) per block, 64 blocks per table cluster: 2 MiB
    -- of file outgrows the first refcount table
    local hdr, table_before = run(64, 8 * MiB, 3 * MiB, 12)
    assert.are_not.equal(table_before, hdr.refcount_table_offset)
    assert.is_true(hdr.refcount_table_clusters > 1)
  end)

  for _, rb in ipairs({ 1, 64 }) do
    it(("sees a raw_write of a %d-bit refcount entry at once"):format(rb), function()
      local dir = h.tmpdir()
      local path = dir .. "/poke.qcow2"
      assert(qcow2.create(path, { size = 4 * MiB, cluster_size = CS, refcount_bits = rb })):close()
      local img = assert(qcow2.open(path, TINY))
      assert(img:write(0, ("p"):rep(8 * CS)))
      local map = assert(img:map())
      local host = assert(map[1].offset, "the first extent is mapped")
      local c = host // CS
      assert.are.equal(1, assert(img:refcount(c)))     -- the block is cached now

      local hdr = assert(img:header())
      local per_block = CS * 8 // rb
      local entry = string.unpack(">I8", assert(img:raw_read(
        hdr.refcount_table_offset + (c // per_block) * 8, 8)))
      local block = entry & ~0x1ff
      local e = c % per_block
      local at, old, new
      if rb == 1 then
        at = block + e // 8
        old = assert(img:raw_read(at, 1))
        new = string.char(old:byte() & ~(1 << (e % 8)))
      else
        at = block + e * 8
        old = assert(img:raw_read(at, 8))
        new = string.pack(">I8", 5)
      end
      assert.is_true(img:raw_write(at, new))
      assert.are.equal(rb == 1 and 0 or 5, assert(img:refcount(c)))
      assert.is_true(img:raw_write(at, old))
      assert.are.equal(1, assert(img:refcount(c)))
      img:close()
      assert.is_true((model.check(path)))
    end)
  end

  it("reads refcounts of blocks the handle added to the file, without a reopen", function()
    local path = h.tmpdir() .. "/grow.qcow2"
    local img = assert(qcow2.create(path, { size = 64 * MiB, cluster_size = CS }))
    for k = 0, 3000 do assert(img:write(k * 8 * KiB, "x")) end
    -- every data cluster the map names has refcount 1 on this same handle
    local seen = 0
    for e in img:map():extents() do
      if e.type == "data" then
        for off = e.offset, e.offset + e.length - 1, CS do
          assert.are.equal(1, assert(img:refcount(off // CS)))
          seen = seen + 1
        end
      end
    end
    assert.is_true(seen > 3000)
    img:close()
    assert.are.equal(0, (select(2, h.check_json(path))))
  end)
end)
