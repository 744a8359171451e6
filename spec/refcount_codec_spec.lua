-- The refcount-entry codec (csrc/engine/refcount_codec.c) at every width
-- the format allows, 1 to 64 bits, with small and default clusters. Three
-- judges that do not share our C decoder: qemu-img check (the refcounts
-- on disk are the ones QEMU expects), a decoder written here in Lua from
-- docs 4.2 over img:raw_read of the refcount blocks, and qemu-img map
-- (which clusters hold data, and so which refcount each must have).
-- Images come from qemu-img/qemu-io (our reader) and from the library
-- (our writer); compressed streams packed into one host cluster give
-- refcounts up to the width's maximum.
local h = require("helpers")
local model = require("model")
local qcow2 = require("qcow2")

local KiB, MiB = 1 << 10, 1 << 20
local DISK = 4 * MiB
local WIDTHS = { 1, 2, 4, 8, 16, 32, 64 }
local CLUSTER_SIZES = { 512, 65536 }

local function max_of(rb) return rb == 64 and -1 or (1 << rb) - 1 end

-- Entry e of a refcount block held as a string (docs 4.2: below 8 bits
-- least-significant bits first, else a big-endian integer).
local function decode(block, e, rb)
  if rb < 8 then
    local per_byte = 8 // rb
    return (block:byte(e // per_byte + 1) >> ((e % per_byte) * rb)) & max_of(rb)
  end
  return (string.unpack(">I" .. (rb // 8), block, e * (rb // 8) + 1))
end

-- Where entry e of a block lives: the byte offset inside the block and
-- the bytes that hold it, with `value` stored there.
local function encode(old_bytes, e, rb, value)
  if rb < 8 then
    local shift = (e % (8 // rb)) * rb
    local mask = max_of(rb) << shift
    return string.char((old_bytes:byte(1) & ~mask) | ((value << shift) & mask))
  end
  return string.pack(">I" .. (rb // 8), value)
end
local function entry_bytes(e, rb)
  if rb < 8 then return e // (8 // rb), 1 end
  return e * (rb // 8), rb // 8
end

-- Every refcount of host clusters [0, clusters) decoded from the file's
-- bytes, and the host offset of the block holding each entry.
local function file_refcounts(img, rb, clusters)
  local hdr = assert(img:header())
  local cs = 1 << hdr.cluster_bits
  local per_block = cs * 8 // rb
  local reftable = assert(img:raw_read(hdr.refcount_table_offset,
                                       hdr.refcount_table_clusters * cs))
  local blocks, values, where = {}, {}, {}
  for c = 0, clusters - 1 do
    local index, value = c // per_block, 0
    if index * 8 < #reftable then
      local offset = string.unpack(">I8", reftable, index * 8 + 1) & ~0x1ff
      if offset ~= 0 then
        blocks[offset] = blocks[offset] or assert(img:raw_read(offset, cs))
        value = decode(blocks[offset], c % per_block, rb)
        where[c] = offset
      end
    end
    values[c] = value
  end
  return values, where
end

-- img:refcount(c) equals the Lua decoding for every cluster of the file
-- and a few past its end; returns the decoded values.
local function assert_refcounts_agree(path, rb, cs)
  local img <close> = assert(qcow2.open(path))
  local clusters = (#h.read_file(path) + cs - 1) // cs + 4
  local values, where = file_refcounts(img, rb, clusters)
  for c = 0, clusters - 1 do
    local got = assert(img:refcount(c))
    if got ~= values[c] then
      error(("cluster %d: img:refcount says %d, the file's bytes say %d"):format(
        c, got, values[c]), 2)
    end
  end
  return values, where
end

local function assert_clean(path)
  local clean, _, code, out = model.check(path)
  assert.is_true(clean, "qemu-img check (exit " .. tostring(code) .. "):\n" .. out)
end

-- Guest ranges written before the snapshot (refcount 2 where not written
-- again), after it (refcount 1), and compressed clusters written last (a
-- snapshot cannot share a host cluster whose count is at the maximum).
local BEFORE, AFTER, COMPRESSED = {}, {}, {}
for k = 0, 11 do BEFORE[#BEFORE + 1] = { k * 256 * KiB + 300, 20 * KiB } end
for k = 0, 5 do AFTER[#AFTER + 1] = { k * 512 * KiB + 128 * KiB, 12 * KiB } end
AFTER[#AFTER + 1] = { 256 * KiB + 4 * KiB, 8 * KiB }   -- COW inside a BEFORE range
for k = 0, 16 do COMPRESSED[#COMPRESSED + 1] = k end   -- clusters at the end
local function compressed_offset(k, cs) return DISK - (#COMPRESSED - k) * cs end

local function overlaps(ranges, offset, length)
  for _, r in ipairs(ranges) do
    if offset < r[1] + r[2] and r[1] < offset + length then return true end
  end
  return false
end

-- The refcount every uncompressed data cluster must have, from qemu-img
-- map alone: 1 when no snapshot shares it, else 2 unless written after.
local function assert_data_refcounts(path, values, cs, snapshot)
  local seen = 0
  for _, e in ipairs(h.map_json(path)) do
    if e.data and e.offset and not e.compressed then
      for at = 0, e.length - 1, cs do
        local guest, host = e.start + at, (e.offset + at) // cs
        -- extents may start inside a cluster (a hole in the file after
        -- the written part maps as data+zero): judge the whole cluster
        local cluster_start = guest - guest % cs
        local want = 1
        if snapshot and not overlaps(AFTER, cluster_start, cs) then want = 2 end
        assert.are.equal(want, values[host], ("host cluster %d (guest 0x%x)"):format(host, guest))
        seen = seen + 1
      end
    end
  end
  assert.is_true(seen > 12, "the map should list the written clusters")
end

local function cases()
  local out = {}
  for _, cs in ipairs(CLUSTER_SIZES) do
    for _, rb in ipairs(WIDTHS) do out[#out + 1] = { cs = cs, rb = rb } end
  end
  return out
end

describe("the refcount-entry codec", function()
  teardown(h.cleanup)

  for _, c in ipairs(cases()) do
    local cs, rb = c.cs, c.rb
    -- QEMU cannot snapshot with 1-bit refcounts (a shared cluster counts 2)
    local snapshot = rb > 1

    it(("reads %d-bit refcounts of a QEMU image with %d-byte clusters as QEMU wrote them"):format(
        rb, cs), function()
      local path = h.tmpdir() .. "/qemu.qcow2"
      h.create(path, DISK, ("cluster_size=%d,refcount_bits=%d"):format(cs, rb))
      local cmds = {}
      for _, r in ipairs(BEFORE) do cmds[#cmds + 1] = ("write -P 0x5a %d %d"):format(r[1], r[2]) end
      h.qemu_io(path, cmds)
      if snapshot then h.qemu_img("snapshot -c s1 " .. h.q(path)) end
      cmds = {}
      for _, r in ipairs(AFTER) do cmds[#cmds + 1] = ("write -P 0xa5 %d %d"):format(r[1], r[2]) end
      for i, cl in ipairs(COMPRESSED) do
        cmds[#cmds + 1] = ("write -c -P 0x%02x %d %d"):format(i, compressed_offset(cl, cs), cs)
      end
      h.qemu_io(path, cmds)
      assert_clean(path)

      local values, where = assert_refcounts_agree(path, rb, cs)
      assert_data_refcounts(path, values, cs, snapshot)

      -- The largest value of the width, and one with every byte
      -- different, poked next to each other: each decodes whole, and the
      -- entries around them keep theirs.
      local target = #h.read_file(path) // cs - 4
      target = target - target % 2    -- both entries in one block
      local block = assert(where[target] and where[target + 1])
      assert.are.equal(block, where[target + 1])
      local per_block = cs * 8 // rb
      local img = assert(qcow2.open(path, { mode = "rw" }))
      local pokes = { [target] = max_of(rb), [target + 1] = 0x8172635445362718 & max_of(rb) }
      for cl, value in pairs(pokes) do
        local at, len = entry_bytes(cl % per_block, rb)
        local old = assert(img:raw_read(block + at, len))
        assert.is_true(img:raw_write(block + at, encode(old, cl % per_block, rb, value)))
      end
      img:close()
      local poked = assert_refcounts_agree(path, rb, cs)
      for cl, v in pairs(poked) do
        assert.are.equal(pokes[cl] or values[cl], v, "cluster " .. cl)
      end
    end)

    it(("writes %d-bit refcounts with %d-byte clusters that qemu-img check accepts"):format(
        rb, cs), function()
      local path = h.tmpdir() .. "/ours.qcow2"
      local img = assert(qcow2.create(path, { size = DISK, cluster_size = cs, refcount_bits = rb }))
      for _, r in ipairs(BEFORE) do assert(img:write(r[1], ("\x5a"):rep(r[2]))) end
      if snapshot then assert(img:create_snapshot("s1")) end
      for _, r in ipairs(AFTER) do assert(img:write(r[1], ("\xa5"):rep(r[2]))) end
      for i, cl in ipairs(COMPRESSED) do
        assert(img:write_compressed(compressed_offset(cl, cs), string.char(i):rep(cs)))
      end
      img:close()
      assert_clean(path)

      local values = assert_refcounts_agree(path, rb, cs)
      assert_data_refcounts(path, values, cs, snapshot)
      -- 17 compressed streams share host clusters: 2- and 4-bit entries
      -- count up to their maximum (3, 15), wider ones to 17, and QEMU
      -- accepted it
      local highest = 0
      for _, v in pairs(values) do highest = math.max(highest, v) end
      local cap = rb == 64 and math.maxinteger or max_of(rb)
      assert.are.equal(math.min(cap, #COMPRESSED), highest)
    end)
  end
end)
