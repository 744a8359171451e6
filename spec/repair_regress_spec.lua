-- Fixed regressions for check{repair = ...}: the triggers named in issue 8
-- and every case spec/repair_fuzz_spec.lua found, each judged against
-- qemu-img check -r on a copy (spec/repair_oracle.lua): no raise, no crash,
-- never worse than before, and clean in one pass wherever qemu-img's one
-- pass is clean. `clean = true` cases also insist qemu-img does get them
-- clean, so the comparison cannot pass vacuously.
local h = require("helpers")
local hostile = require("hostile")
local oracle = require("repair_oracle")

local q = h.q
local COPIED = 1 << 63

local function snapshot(p, name) h.qemu_img("snapshot -c " .. name .. " " .. q(p)) end

-- Bases: an internal snapshot sharing data clusters with the active disk.
local function base(p, opts, empty_snapshot)
  h.create(p, "1M", opts)
  if empty_snapshot then snapshot(p, "s1") end
  h.qemu_io(p, { "write -P 0x11 0 64k", "write -P 0x22 64k 64k" })
  if not empty_snapshot then snapshot(p, "s1") end
  h.qemu_io(p, { "write -P 0x33 0 64k" })
end

-- spec/repair_fuzz_spec.lua's v3_512_r64 base: two snapshots, the table
-- last in the file and its last entry unpadded (the file length is not a
-- multiple of 512)
local function two_snapshots_512(p)
  h.create(p, "256K", "cluster_size=512,refcount_bits=64")
  h.qemu_io(p, { "write -P 0x11 0 2k", "write -P 0x22 100k 1k" })
  snapshot(p, "a")
  h.qemu_io(p, { "write -P 0x33 512 512" })
  snapshot(p, "b")
end

-- spec/repair_fuzz_spec.lua's v2_64k base
local function v2_64k(p)
  h.create(p, "1M", "compat=0.10")
  h.qemu_io(p, { "write -P 0x11 0 64k", "write -P 0x22 64k 64k" })
  snapshot(p, "s1")
  h.qemu_io(p, { "write -P 0x33 64k 64k" })
end

local function entry_of_snapshot(p) return hostile.snapshots(p)[1].offset end

-- qcow2.edit on p, run through fn, closed
local function edit(p, fn)
  local ed = assert(require("qcow2").edit(p))
  fn(ed)
  ed:close()
end

-- spec/repair_fuzz_spec.lua's v3_4k_r8 base
local function v3_4k_r8(p)
  h.create(p, "2M", "cluster_size=4096,refcount_bits=8")
  h.qemu_io(p, { "write -P 0x11 0 8k", "write -c -P 0x22 16k 4k", "write -P 0x33 1M 4k" })
  snapshot(p, "s1")
  h.qemu_io(p, { "write -P 0x44 4k 4k", "write -P 0x55 1536k 4k" })
end

-- examples/fuzz.lua's seed images, built with qemu-img
local function v3_8k_rc4(p)
  h.create(p, "2M", "cluster_size=8192,refcount_bits=4")
  h.qemu_io(p, { "write -P 0x11 0 24k", "write -c -P 0x22 64k 8k" })
  snapshot(p, "s1")
  h.qemu_io(p, { "write -P 0x33 8k 8k" })
end
local function c4k_rc1(p)
  h.create(p, "2M", "cluster_size=4096,refcount_bits=1")
  h.qemu_io(p, { "write -P 0x11 0 16k", "write -c -P 0x22 64k 4k", "write -P 0x33 1M 4k" })
end
local function v3_64k(p)
  h.create(p, "4M", "")
  h.qemu_io(p, { "write -P 0x11 0 128k", "write -c -P 0x22 1M 64k", "write -z 2M 64k" })
  snapshot(p, "s1")
  h.qemu_io(p, { "write -P 0x33 64k 64k" })
end

local cases = {
  -- issue 8: heap overflow in add_finding <- check_note <- repair_copied
  { name = "refcount_order 0 on an image with an internal snapshot", opts = "",
    poke = function(p) hostile.set(p, "refcount_order", 0) end },
  { name = "refcount_order 0, 4 KiB clusters", opts = "cluster_size=4096",
    poke = function(p) hostile.set(p, "refcount_order", 0) end },
  { name = "refcount_order 0 on a snapshot of the empty disk", opts = "", empty_snapshot = true,
    clean = true, poke = function(p) hostile.set(p, "refcount_order", 0) end },
  { name = "L1[0] at the refcount table cluster, COPIED kept", opts = "cluster_size=4096",
    clean = true, poke = function(p)
      local hd = hostile.header(p)
      hostile.put64(p, hd.l1_table_offset, COPIED | hd.refcount_table_offset)
    end },
  { name = "L1[0] at the refcount table cluster, 512-byte clusters", opts = "cluster_size=512",
    clean = true, poke = function(p)
      local hd = hostile.header(p)
      hostile.put64(p, hd.l1_table_offset, COPIED | hd.refcount_table_offset)
    end },
  -- issue 8: leaks repair left OFLAG_COPIED corruptions
  { name = "nb_snapshots 0 on an image with a snapshot", opts = "", clean = true,
    poke = function(p) hostile.set(p, "nb_snapshots", 0) end },
  { name = "nb_snapshots 0, 4 KiB clusters", opts = "cluster_size=4096", clean = true,
    poke = function(p) hostile.set(p, "nb_snapshots", 0) end },
  { name = "nb_snapshots 0, version 2", opts = "compat=0.10", clean = true,
    poke = function(p) hostile.set(p, "nb_snapshots", 0) end },
  -- issue 8: never repaired
  { name = "a v3 snapshot entry with extra_data_size 0", opts = "", clean = true,
    poke = function(p) h.poke(p, entry_of_snapshot(p) + 36, h.be32(0)) end },
  { name = "a v3 snapshot entry with extra_data_size 8", opts = "cluster_size=4096", clean = true,
    poke = function(p) h.poke(p, entry_of_snapshot(p) + 36, h.be32(8)) end },
  -- issue 8: refused at open where qemu-img repairs
  { name = "the refcount table at offset 0", opts = "", clean = true,
    poke = function(p) hostile.set(p, "refcount_table_offset", 0) end },
  { name = "the refcount table at offset 0, version 2", opts = "compat=0.10", clean = true,
    poke = function(p) hostile.set(p, "refcount_table_offset", 0) end },
  { name = "the snapshot table past the end of the file", opts = "", clean = true,
    poke = function(p) hostile.set(p, "snapshots_offset", hostile.past_eof(p, 4)) end },
  -- found by spec/repair_fuzz_spec.lua (seed 20261126)
  { name = "refcount_table_clusters 0 (v2_64k:5)", opts = "compat=0.10", clean = true,
    poke = function(p) hostile.set(p, "refcount_table_clusters", 0) end },
  -- the header cluster is read as an L2 table whose entries are header
  -- fields: any repair that moves a structure changes those "entries",
  -- so qemu-img and ours end on different (both smaller) counts
  { name = "refcount table at 0 and an L1 entry at the header (v3_512_r64:5)",
    opts = "cluster_size=512,refcount_bits=64", self_referential = true,
    poke = function(p)
      local hd = hostile.header(p)
      hostile.set(p, "refcount_table_offset", 0)
      hostile.put64(p, hd.l1_table_offset, 0x80)
    end },
  { name = "a snapshot L1 running over other metadata (v3_4k_r8:9)",
    opts = "cluster_size=4096,refcount_bits=8",
    poke = function(p)
      local s = hostile.snapshots(p)[1]
      h.poke(p, s.offset + 8, h.be32(0x401))
    end },
  -- found by spec/repair_fuzz_spec.lua (seed 7)
  { name = "a 64-bit refcount of 2^64-1 (v3_512_r64:7)", opts = "cluster_size=512,refcount_bits=64",
    clean = true, poke = function(p)
      local block = hostile.get64(p, hostile.header(p).refcount_table_offset)
      hostile.put64(p, block + 8, -1)
    end },
  -- the zeroes past EOF read as 14 more entries: the table ends 566 bytes
  -- past the end of the file but 192 past its length in 512-byte sectors,
  -- which is what qemu-img measures, so it is counted (a leak repair that
  -- did not count it freed the table's cluster); the new table lands on the
  -- old one's tail past EOF
  { name = "nb_snapshots 16 over a table of two (v3_512_r64:50)", base = two_snapshots_512,
    poke = function(p) hostile.set(p, "nb_snapshots", 16) end },
  -- found with seed 42: the rebuilt refcount structure would land on the
  -- uncounted tail of a snapshot table running past EOF (refused); it goes
  -- past that tail, and the leaks the old table held back once the table
  -- is rewritten are freed then
  { name = "no refcount block and a snapshot table running past EOF (v3_512_r64:151)",
    base = two_snapshots_512, clean = true, poke = function(p)
      hostile.put64(p, hostile.header(p).refcount_table_offset, 0)
      h.poke(p, entry_of_snapshot(p) + 36, h.be32(16))
    end },
  -- found with seed 1234: a garbage snapshot L1 spans the whole file, so
  -- every refcount write is refused; clearing the L1 entry with reserved
  -- bits first left its L2 and data as leaks nothing could free
  { name = "an L1 entry with reserved bits and a snapshot L1 over everything (v2_64k:119)",
    base = v2_64k, poke = function(p)
      hostile.put64(p, hostile.header(p).l1_table_offset, COPIED | 0x90100)
      h.poke(p, entry_of_snapshot(p) + 36, h.be32(8))
      hostile.set(p, "nb_snapshots", 2)
    end },
  { name = "an unknown autoclear bit: qemu-img's clean result drops the snapshots (v3_64k:24)",
    opts = "", poke = function(p)
      hostile.set(p, "autoclear_features", 0x20)
      local s = hostile.snapshots(p)[1]
      h.poke(p, s.offset + 36, h.be32(0))
    end },
  -- found by examples/fuzz.lua --seed 11 --per-case 4: the active L2
  -- table is a data cluster of 0x11 bytes (every entry has reserved bits)
  -- and refcount block 0 lies at the end of the file, where the rebuilt
  -- structure goes: that block (outside the image, so replaced) was taken
  -- for metadata the refcount writes would overlap, and no entry cleared
  { name = "L1[0] at a data cluster, refcount block 0 at EOF and another past it (fuzz 11:152)",
    base = v3_8k_rc4, clean = true, poke = function(p)
      local data = hostile.data_offset(p, 0)
      local eof = hostile.past_eof(p, 0)
      edit(p, function(ed)
        assert(ed:reftable(0, eof))
        assert(ed:reftable(827, eof + 0x2fa000))
        assert(ed:l1(0, COPIED | data))
      end)
    end },
  -- the L2 table is the refcount table and one of its "entries" (refcount
  -- block 101, outside the image) points past EOF: clearing it was refused
  -- as a write over the refcount table, which the rebuild then moves, so
  -- it is cleared once the refcounts are rebuilt (qemu-img instead grows
  -- the file to cover refcount block 101, which makes the entry valid)
  { name = "L1[0] at the refcount table, one of its entries past EOF (fuzz 11:310)",
    base = c4k_rc1, clean = true, poke = function(p)
      local data = hostile.data_offset(p, 0)
      local rt = hostile.header(p).refcount_table_offset
      edit(p, function(ed)
        assert(ed:l1(0, 0))
        assert(ed:refcount(data // 4096, 0))
        assert(ed:reftable(101, 0x356000))
        assert(ed:l1(0, rt))
      end)
    end },
  -- qemu-img is plainly wrong here: a bitmaps extension without its
  -- autoclear bit makes QEMU 7.2 rewrite the header at open, before the
  -- snapshot table is read, with nb_snapshots 0: its "clean" result lost
  -- the snapshot (and the unaligned snapshot L1 with it, which neither
  -- repair can mend). The judge does not hold ours to that; ours keeps
  -- the snapshot and fixes everything else.
  { name = "an unaligned snapshot L1 and a stale bitmaps extension: qemu-img drops the snapshot (fuzz 11:539)",
    base = v3_64k, poke = function(p)
      edit(p, function(ed)
        local s = assert(ed:snapshot(0))
        assert(ed:snapshot(0, { l1_table_offset = s.l1_table_offset + 1 }))
        assert(ed:del_extension(0x6803f857))
        assert(ed:l2(0x100000, 0x20000))
        assert(ed:add_extension(0x23852875,
          string.pack(">I4I4I8I8", 0x10000, 1, 0x18, 0x80000000000000)))
      end)
    end,
    after = function(p, seen)
      assert.is_true(seen.qemu_lost_snapshots, "qemu-img's repair drops the snapshot")
      assert.are.equal(1, h.get_be32(p, 60), "ours keeps it")
      assert.are.equal(1, seen.o_after.corruptions, "only the unaligned snapshot L1 is left")
    end },
  -- found with seed 42: the snapshot table's 64 KiB of extra data runs
  -- far past EOF (never counted); the rebuilt refcounts grow the file past
  -- its end, and freeing the old table once rewritten then dropped the
  -- refcounts of everything its garbage tail now covered (the new table,
  -- the L2 table, data): what is freed is judged by the file's size when
  -- the refcounts were counted
  { name = "an unaligned refcount block and 64 KiB of snapshot extra data (v3_4k_r8:154)",
    base = v3_4k_r8, poke = function(p)
      edit(p, function(ed)
        assert(ed:reftable(2, 0x2001))
        assert(ed:snapshot(0, { extra_data_size = 0xffff }))
      end)
    end },
  -- found with seed 1234: an id of 64 KiB makes the snapshot table run far
  -- past EOF (not counted); the rebuilt structures go past its tail, so
  -- the grown file covers it and later checks count it: the rebuild
  -- counts it too, or it reads as referenced at refcount 0
  { name = "no refcount block and a snapshot id of 65535 bytes (v3_4k_r8:4)",
    base = v3_4k_r8, poke = function(p)
      local s = hostile.snapshots(p)[1]
      h.poke(p, s.offset + 12, h.be16(0xffff))
      hostile.put64(p, hostile.header(p).refcount_table_offset, 0)
    end },
  { name = "a snapshot L1 of 4096 entries past EOF where the rebuild would go (v3_4k_r8:25)",
    opts = "cluster_size=4096,refcount_bits=8", poke = function(p)
      local hd = hostile.header(p)
      hostile.put64(p, hd.refcount_table_offset + 8, 15 * 4096)
      h.poke(p, hostile.snapshots(p)[1].offset + 8, h.be32(0x1000))
    end },
}

describe("check{repair} regressions against qemu-img check -r", function()
  local qcow2
  setup(function() qcow2 = require("qcow2") end)
  after_each(function() h.cleanup() end)

  for _, c in ipairs(cases) do
    it(c.name, function()
      local dir = h.tmpdir()
      local p = dir .. "/image.qcow2"
      if c.base then c.base(p) else base(p, c.opts, c.empty_snapshot) end
      c.poke(p)
      assert.is_false(oracle.qemu_check(p).clean, "the poke must break the image")
      for _, mode in ipairs(c.modes or { "all", "leaks" }) do
        local broken, seen = oracle.judge(qcow2, p, dir, mode)
        assert(#broken == 0, mode .. ": " .. table.concat(broken, "; "))
        assert.are_not.equal("raised", seen.outcome)
        if c.after and mode == "all" then c.after(dir .. "/mine-all.qcow2", seen) end
        if c.clean and mode == "all" then
          -- qemu-img repairs it in one pass, and so does ours
          assert.is_true(seen.q_theirs.clean, "qemu-img -r all should clean this copy")
          assert.is_true(seen.q_after.clean, "qemu-img check after our repair")
          assert.is_true(seen.o_after.clean, "our check after our repair")
        end
        if seen.q_theirs.known and seen.q_after.known and not seen.q_theirs.clean
           and not c.self_referential then
          -- where qemu-img cannot make it clean, ours ends no worse than it
          assert.is_true(seen.q_after.corruptions + seen.q_after.leaks
                         <= seen.q_theirs.corruptions + seen.q_theirs.leaks,
                         ("%s: ours leaves %d+%d, qemu-img %d+%d"):format(mode,
                           seen.q_after.corruptions, seen.q_after.leaks,
                           seen.q_theirs.corruptions, seen.q_theirs.leaks))
        end
      end
    end)
  end

  it("a repair of leaks sets the COPIED flags in the same pass, as qemu-img -r leaks does", function()
    local dir = h.tmpdir()
    local p = dir .. "/image.qcow2"
    base(p, "")
    hostile.set(p, "nb_snapshots", 0)
    local img = assert(qcow2.open(p, { mode = "rw", repair = true }))
    local r = assert(img:check { repair = "leaks" })
    img:close()
    assert.is_true(r.leaks_fixed > 0)
    assert.is_true(r.corruptions_fixed > 0)
    assert.are.equal(0, r.corruptions)
    assert.are.equal(0, r.leaks)
    assert.is_true(oracle.qemu_check(p).clean)
  end)

  it("an incomplete snapshot entry comes back complete, listed as qemu-img lists it", function()
    local dir = h.tmpdir()
    local p, theirs = dir .. "/image.qcow2", dir .. "/theirs.qcow2"
    base(p, "")
    h.poke(p, entry_of_snapshot(p) + 36, h.be32(0))
    h.copy(p, theirs)
    oracle.qemu_check(theirs, "all")
    local img = assert(qcow2.open(p, { mode = "rw", repair = true }))
    assert(img:check { repair = "all" })
    img:close()
    -- QEMU writes every entry with its 24 bytes of known extra data
    assert.are.equal(24, h.get_be32(p, entry_of_snapshot(p) + 36))
    assert.are.equal(h.must("qemu-img snapshot -l " .. q(theirs)),
                     h.must("qemu-img snapshot -l " .. q(p)))
  end)

  it("a table past the end of the file is judged by the file's length in sectors, as qemu-img does", function()
    local dir = h.tmpdir()
    local p = dir .. "/image.qcow2"
    h.create(p, "1M", "cluster_size=4096")
    h.qemu_io(p, { "write -P 0x11 0 8k" })
    snapshot(p, "s1")
    h.qemu_io(p, { "write -P 0x22 0 4k" })
    -- the one entry (67 bytes) copied to the end of the file: the file
    -- ends 67 bytes into a cluster, 445 short of a sector boundary
    local entry = h.peek(p, entry_of_snapshot(p), 67)
    local eof = hostile.file_size(p)
    assert.are.equal(0, eof % 4096)
    h.poke(p, eof, entry)
    hostile.set(p, "snapshots_offset", eof)
    local pristine = h.read_file(p)
    -- the zeroes past EOF read as 40-byte entries: with 105 the table ends
    -- 4165 bytes past the file's end, 3720 past its last sector (counted);
    -- with 115, 4125 past its last sector (not counted) but still inside
    -- its last cluster
    for _, n in ipairs({ 105, 115 }) do
      h.write_file(p, pristine)
      hostile.set(p, "nb_snapshots", n)
      local theirs, ours = oracle.qemu_check(p), oracle.our_check(qcow2, p)
      assert.is_true(theirs.known and ours.known)
      assert.are.same({ theirs.corruptions, theirs.leaks, theirs.check_errors },
                      { ours.corruptions, ours.leaks, ours.check_errors }, n .. " entries")
    end
  end)

  it("a plain open still refuses what only an open for repair takes", function()
    local dir = h.tmpdir()
    local p = dir .. "/image.qcow2"
    base(p, "")
    hostile.set(p, "refcount_table_offset", 0)
    -- a read-only open takes it, as qemu-img does (damaged_spec); a writer
    -- that is not repairing refuses it
    local img, msg, code = qcow2.open(p, { mode = "rw" })
    assert.is_nil(img)
    assert.are.equal("corrupt", code)
    assert.matches("refcount table", msg)
    -- QEMU's own open-time checks keep refusing an open for repair too
    hostile.set(p, "refcount_table_offset", 4096 + 512)
    img, msg, code = qcow2.open(p, { mode = "rw", repair = true })
    assert.is_nil(img)
    assert.are.equal("corrupt", code)
    assert.matches("aligned", msg)
  end)
end)
