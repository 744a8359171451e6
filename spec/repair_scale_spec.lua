-- check{repair = "all"} on a hostile table of thousands of bad entries:
-- the work must grow with the table's size, not with its square (issue 8:
-- bounded work on any input). Counted in writes (the io trace), never in
-- time: clearing the bad L1 entries of a table costs one write per
-- cluster of the table, not one per entry. The result is judged by our
-- check and by qemu-img check.
local h = require("helpers")
local oracle = require("repair_oracle")
local crash = require("crash")
local qcow2 = require("qcow2")

-- A 512-byte-cluster image whose L1 has `entries` entries (64 L2 entries
-- of 512 bytes each: 32 KiB of guest disk per L1 entry), data at the
-- first and the last L1 entry, every other entry made unusable: reserved
-- bits on even indexes, an unaligned offset on odd ones. Their offsets lie
-- far past the end of the file, so no entry claims a cluster the repair
-- must write (that is another test: spec/repair_regress_spec.lua).
local FAR = 1 << 30
local function hostile_l1(dir, entries)
  local p = dir .. "/big_l1.qcow2"
  h.create(p, tostring(entries * 32) .. "K", "cluster_size=512")
  local last = (entries - 1) * 32768
  h.qemu_io(p, { "write -P 0x11 0 512", "write -P 0x22 " .. last .. " 512" })
  local l1_offset = h.get_be64(p, 40)
  local l1_size = h.get_be32(p, 36)
  assert.are.equal(entries, l1_size)
  local bytes = { h.peek(p, l1_offset, 8) }
  for i = 1, l1_size - 2 do
    bytes[#bytes + 1] = i % 2 == 0 and h.be64((1 << 56) | (FAR + i * 512))
                                    or h.be64(FAR + 8 * i + 1)
  end
  bytes[#bytes + 1] = h.peek(p, l1_offset + (l1_size - 1) * 8, 8)
  h.poke(p, l1_offset, table.concat(bytes))
  return p, l1_offset, l1_size
end

describe("check{repair = \"all\"} at scale", function()
  after_each(h.cleanup)

  it("clears thousands of bad L1 entries with one write per L1 cluster", function()
    local dir = h.tmpdir()
    local entries = 8192
    local p, l1_offset, l1_size = hostile_l1(dir, entries)
    local l1_clusters = l1_size * 8 // 512
    local before = oracle.qemu_check(p)
    assert.is_true(before.corruptions >= entries - 2)

    local img = assert(qcow2.open(p, { mode = "rw", repair = true,
                                       io = { trace = true } }))
    local r = assert(img:check { repair = "all" })
    local log = img:io_log()
    assert.are.equal(0, r.corruptions)
    assert.is_true(r.corruptions_fixed >= entries - 2)
    -- the guest bytes the two good entries hold survive
    assert.are.equal(("\x11"):rep(512), assert(img:read(0, 512)))
    assert.are.equal(("\x22"):rep(512),
                     assert(img:read((entries - 1) * 32768, 512)))
    img:close()

    local l1_writes = 0
    for _, w in ipairs(log) do
      if w.what == "l1" then l1_writes = l1_writes + 1 end
    end
    -- one write per entry would be thousands
    assert.is_true(l1_writes <= l1_clusters,
                   l1_writes .. " L1 writes for " .. l1_clusters .. " L1 clusters")
    assert.is_true(crash.writes(log) <= l1_clusters + 64,
                   crash.writes(log) .. " writes in all")

    -- every bad entry is gone from the file, the good ones kept
    local raw = h.peek(p, l1_offset, l1_size * 8)
    for i = 1, l1_size - 2 do
      local e = string.unpack(">I8", raw, i * 8 + 1)
      assert.are.equal(0, e, "L1 entry " .. i)
    end
    assert.are_not.equal(0, string.unpack(">I8", raw, 1))
    assert.are_not.equal(0, string.unpack(">I8", raw, (l1_size - 1) * 8 + 1))

    local ours = oracle.our_check(qcow2, p)
    assert.are.equal(0, ours.corruptions)
    assert.are.equal(0, ours.leaks)
    local theirs = oracle.qemu_check(p)
    assert.are.equal(0, theirs.corruptions)
    assert.are.equal(0, theirs.leaks)
    assert.are.equal(0, theirs.check_errors)
  end)

  -- The indexes the repair's overlap checks search must refuse what the
  -- scan refuses: a bad entry whose offset claims the L1 table's own
  -- cluster makes every write to that cluster overlap an "L2 table", so
  -- that cluster's bad entries stay (reported), all others are cleared.
  it("leaves the bad entries of an L1 cluster another entry claims", function()
    local dir = h.tmpdir()
    local p, l1_offset, l1_size = hostile_l1(dir, 1024)
    local per = 512 // 8
    local claimed = 3       -- the L1 cluster a bad entry claims
    local claim = l1_offset + claimed * 512
    h.poke(p, l1_offset + (claimed * per + 5) * 8, h.be64((1 << 56) | claim))

    local img = assert(qcow2.open(p, { mode = "rw", repair = true }))
    local r = assert(img:check { repair = "all" })
    local refused, seen = 0, {}      -- distinct entries (two passes report)
    for f in r:findings() do
      if f.message:match("^Not repairing the L1 entry") and not seen[f.offset] then
        seen[f.offset] = true
        refused = refused + 1
      end
    end
    img:close()
    assert.are.equal(per, refused)
    local raw = h.peek(p, l1_offset, l1_size * 8)
    for i = 1, l1_size - 2 do
      local e = string.unpack(">I8", raw, i * 8 + 1)
      if i // per == claimed then
        assert.are_not.equal(0, e, "L1 entry " .. i .. " was cleared")
      else
        assert.are.equal(0, e, "L1 entry " .. i)
      end
    end
  end)

  -- ... and follow the entries as the repair clears them: a claim from a
  -- cluster cleared earlier no longer stands in the way of a later one.
  it("clears an L1 cluster once the entry claiming it is gone", function()
    local dir = h.tmpdir()
    local p, l1_offset, l1_size = hostile_l1(dir, 1024)
    local per = 512 // 8
    h.poke(p, l1_offset + (2 * per + 5) * 8,
           h.be64((1 << 56) | (l1_offset + 3 * 512)))

    local img = assert(qcow2.open(p, { mode = "rw", repair = true }))
    local r = assert(img:check { repair = "all" })
    img:close()
    assert.are.equal(0, r.corruptions)
    local raw = h.peek(p, l1_offset, l1_size * 8)
    for i = 1, l1_size - 2 do
      assert.are.equal(0, string.unpack(">I8", raw, i * 8 + 1), "L1 entry " .. i)
    end
    assert.is_true(oracle.qemu_check(p).clean)
  end)
end)
