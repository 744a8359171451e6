-- Image:check{repair = "all"} against qemu-img check -r all: images
-- corrupted by pokes (shapes of QEMU's iotests 060, 108 and 138) come out
-- clean for qemu-img check, readable data stays as it was, and a second
-- repair finds nothing to do. The dirty image of a crashed lazy-refcount
-- writer is repaired by a read-write open.
local h = require("helpers")
local qcow2 = require("qcow2")

local KiB = 1024
local CS = 64 * KiB
-- The layout of a fresh 1 MiB image after 128 KiB of writes at 0:
-- header, refcount table, refcount block, L1, L2, two data clusters.
local REFTABLE, REFBLOCK, L2 = 1 * CS, 2 * CS, 4 * CS

-- qemu-img check's exit code (0 clean, 2 corruptions, 3 leaks).
local function qemu_check(path, repair)
  local _, _, code = h.sh("qemu-img check " .. (repair and "-r all " or "")
                          .. h.q(path))
  return code
end

local function fresh(dir, name)
  local path = dir .. "/" .. name .. ".qcow2"
  h.create(path, "1M")
  h.qemu_io(path, { "write -P 0x11 0 64k", "write -P 0x22 64k 64k" })
  local orig = dir .. "/" .. name .. ".orig.qcow2"
  h.copy(path, orig)
  return path, orig
end

local function repair(path, open_opts)
  local img = assert(qcow2.open(path, open_opts or { mode = "rw", repair = true }))
  local r = assert(img:check { repair = "all" })
  local again = assert(img:check { repair = "all" })
  img:close()
  return r, again
end

-- Each case: a poke that breaks the image, and whether the data of both
-- clusters is still readable afterwards (same as the original).
local cases = {
  { name = "a data cluster's refcount zeroed (060)", keep = true,
    poke = function(p) h.poke(p, REFBLOCK + 5 * 2, h.be16(0)) end },
  { name = "an L2 table's refcount zeroed (060)", keep = true,
    poke = function(p) h.poke(p, REFBLOCK + 4 * 2, h.be16(0)) end },
  { name = "a data cluster's refcount too low but not zero", keep = true,
    setup = function(p) h.qemu_img("snapshot -c s1 " .. h.q(p)) end,
    poke = function(p) h.poke(p, REFBLOCK + 5 * 2, h.be16(1)) end },
  { name = "COPIED missing on an L2 entry", keep = true,
    poke = function(p) h.poke(p, L2, h.be64(5 * CS)) end },
  { name = "COPIED wrong on an L1 entry", keep = true,
    poke = function(p) h.poke(p, 3 * CS, h.be64(4 * CS)) end },
  { name = "a refcount table entry zeroed (108)", keep = true,
    poke = function(p) h.poke(p, REFTABLE, h.be64(0)) end },
  { name = "a refcount table entry unaligned (060)", keep = true,
    poke = function(p) h.poke(p, REFTABLE, h.be64(REFBLOCK + 1)) end },
  { name = "the refcount block zeroed (108)", keep = true,
    poke = function(p) h.poke(p, REFBLOCK, string.rep("\0", CS)) end },
  { name = "a refcount block past the end of the file (060)", keep = true,
    poke = function(p) h.poke(p, REFTABLE, h.be64(256 * 1024 * KiB)) end },
  { name = "an L2 entry with reserved bits set (060)", keep = false,
    poke = function(p) h.poke(p, L2 + 8, h.be64(0x8100000000060000)) end },
  { name = "an L2 entry pointing past the end of the file", keep = false,
    poke = function(p) h.poke(p, L2 + 8, h.be64(0x8000000010000000)) end },
  { name = "an L1 entry with an unaligned L2 offset", keep = false,
    lost_table = true,
    poke = function(p) h.poke(p, 3 * CS, h.be64(0x8000000000040200)) end },
  { name = "the corrupt bit set on a sound image", keep = true,
    sound = true,
    poke = function(p) h.poke(p, 72, h.be64(2)) end },
}

describe("Image:check{repair = \"all\"}", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.cleanup() end)

  for i, case in ipairs(cases) do
    it("repairs " .. case.name, function()
      local path, orig = fresh(dir, "c" .. i)
      if case.setup then case.setup(path); h.copy(path, orig) end
      case.poke(path)
      local theirs = dir .. "/theirs.qcow2"
      h.copy(path, theirs)
      if not case.sound then assert.are_not.equal(0, qemu_check(path)) end
      local qemu_verdict = qemu_check(theirs, true)

      local r, again = repair(path)
      assert.is_true(r.ok)
      assert.is_true(r.corruptions_fixed > 0 or case.sound)
      assert.are.equal(0, qemu_check(path))
      -- whatever qemu-img can repair, this repairs too
      if qemu_verdict == 0 then assert.are.equal(0, qemu_check(path)) end
      -- idempotent: nothing left to fix, nothing written
      assert.are.equal(0, again.corruptions_fixed)
      assert.are.equal(0, again.leaks_fixed)
      assert.is_true(again.ok)
      local sum = h.sha256_file(path)
      repair(path)
      assert.are.equal(sum, h.sha256_file(path))
      -- the header says clean
      local info = h.info_json(path)
      assert.is_not_true(info["dirty-flag"])
      assert.is_not_true(info["format-specific"].data.corrupt)

      if case.keep then
        h.must("qemu-img compare " .. h.q(orig) .. " " .. h.q(path))
      elseif case.lost_table then
        -- the L2 table cannot be found: its whole range reads as zeroes
        h.qemu_io(path, { "read -P 0 0 128k" })
      else
        -- cluster 0 was never touched; the broken entry reads as zeroes
        h.qemu_io(path, { "read -P 0x11 0 64k" })
      end
    end)
  end

  it("counts fixed corruptions as qemu-img check -r all does", function()
    -- qemu-img checks COPIED after fixing refcounts, so a COPIED flag that
    -- only disagreed with a broken refcount is not a corruption it fixed
    local compared = 0
    for i, case in ipairs(cases) do
      if not case.sound then
        local path = fresh(dir, "f" .. i)
        if case.setup then case.setup(path) end
        case.poke(path)
        local theirs = dir .. "/theirs" .. i .. ".qcow2"
        h.copy(path, theirs)
        local _, out, code = h.sh("qemu-img check -r all --output=json " .. h.q(theirs))
        local ok, q = pcall(h.json.decode, out)
        if ok and code == 0 then
          local r = repair(path)
          assert.are.equal(math.tointeger(q["corruptions-fixed"] or 0), r.corruptions_fixed, case.name)
          compared = compared + 1
        end
      end
    end
    assert.is_true(compared >= 3, "qemu-img repaired too few cases to compare")
  end)

  it("cuts snapshot extra data past 1024 bytes as qemu-img check -r all does", function()
    local path = fresh(dir, "extra")
    h.qemu_img("snapshot -c s1 " .. h.q(path))
    local entry = h.get_be64(path, 64)
    h.poke(path, entry + 36, h.be32(2000))
    local theirs = dir .. "/theirs-extra.qcow2"
    h.copy(path, theirs)
    -- like qemu-img, a plain open refuses it, naming the field
    local img, msg, code = qcow2.open(path)
    assert.is_nil(img)
    assert.are.equal("corrupt", code)
    assert.matches("extra", msg)
    -- opened for repair: one corruption, fixed as qemu-img fixes it
    img = assert(qcow2.open(path, { mode = "rw", repair = true }))
    assert.are.equal(1, assert(img:check()).corruptions)
    local r = assert(img:check({ repair = "all" }))
    local _, out = h.sh("qemu-img check -r all --output=json " .. h.q(theirs))
    assert.are.equal(math.tointeger(h.json.decode(out)["corruptions-fixed"]), r.corruptions_fixed)
    assert.is_true(r.ok)
    img:close()
    assert.are.equal(0, qemu_check(path))
    local again = assert(qcow2.open(path))
    assert.are.equal(1, #again:snapshots())
    again:close()
    -- the rewritten entry keeps exactly QEMU's 1024 bytes of extra data
    assert.are.equal(1024, h.get_be32(path, h.get_be64(path, 64) + 36))
  end)

  it("reports as qemu-img does: the second check's counts", function()
    local path = fresh(dir, "counts")
    h.poke(path, REFBLOCK + 5 * 2, h.be16(0))
    local theirs = dir .. "/theirs.qcow2"
    h.copy(path, theirs)
    local r = repair(path)
    local _, out = h.sh("qemu-img check -r all --output=json " .. h.q(theirs))
    local q = h.json.decode(out)
    assert.are.equal(q["image-end-offset"], r.image_end_offset)
    assert.are.equal(0, r.corruptions)
    assert.are.equal(0, r.leaks)
    assert.is_truthy(tostring(r):match("No errors were found on the image"))
    local repaired = 0
    for f in r:findings() do
      if f.kind == "repaired" then repaired = repaired + 1 end
    end
    assert.is_true(repaired > 0)
  end)

  it("repairs leaks only with repair = \"leaks\" semantics", function()
    local path = fresh(dir, "leak")
    h.truncate(path, 10 * CS)
    h.poke(path, REFBLOCK + 9 * 2, h.be16(1))
    local r = repair(path)
    assert.is_true(r.ok)
    assert.are.equal(1, r.leaks_fixed)
    assert.are.equal(0, r.corruptions_fixed)
    assert.are.equal(0, qemu_check(path))
  end)

  it("leaves a clean image alone", function()
    local path = fresh(dir, "clean")
    local sum = h.sha256_file(path)
    local r = repair(path)
    assert.is_true(r.ok)
    assert.are.equal(0, r.corruptions_fixed + r.leaks_fixed)
    assert.are.equal(sum, h.sha256_file(path))
  end)

  it("refuses on a read-only handle", function()
    local path = fresh(dir, "ro")
    local img = assert(qcow2.open(path))
    local r, msg, code = img:check { repair = "all" }
    img:close()
    assert.is_nil(r)
    assert.are.equal("readonly", code)
    assert.is_string(msg)
  end)
end)

describe("a read-write open of a dirty image", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.cleanup() end)

  it("repairs what a crashed lazy-refcount writer left", function()
    local path = dir .. "/dirty.qcow2"
    h.create(path, "1M", "lazy_refcounts=on")
    h.sh("qemu-io -c 'write -P 0x33 0 128k' -c abort " .. h.q(path))
    assert.is_true(h.info_json(path)["dirty-flag"])
    assert.are.equal(2, qemu_check(path))
    local img = assert(qcow2.open(path, { mode = "rw" }))
    img:close()
    assert.are.equal(0, qemu_check(path))
    assert.is_not_true(h.info_json(path)["dirty-flag"])
    h.qemu_io(path, { "read -P 0x33 0 128k" })
  end)
end)
