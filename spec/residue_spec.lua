-- img:residue(): planted bytes that no view reads are found at their
-- exact offsets, with the right kind and entropy.
local h = require("helpers")
local qcow2 = h.qcow2()

local KiB = 1024

local function file_size(path)
  return tonumber((h.stat(path):match("^(%d+)")))
end

-- Shannon entropy of a string, bits per byte (the oracle, in Lua).
local function entropy(s)
  local counts, e = {}, 0
  for i = 1, #s do local b = s:byte(i); counts[b] = (counts[b] or 0) + 1 end
  for _, c in pairs(counts) do local p = c / #s; e = e - p * math.log(p, 2) end
  return e
end

-- The residue ranges of `kind`.
local function of_kind(list, kind)
  local out = {}
  for _, r in ipairs(list) do if r.kind == kind then out[#out + 1] = r end end
  return out
end

local function residue(path)
  local img = assert(qcow2.open(path))
  local r = assert(img:residue())
  img:close()
  return r
end

-- The host offset qemu-img map gives for guest offset `start`.
local function host_of(path, start)
  for _, e in ipairs(h.map_json(path)) do
    if e.start <= start and start < e.start + e.length and e.offset then
      return math.tointeger(e.offset + (start - e.start))
    end
  end
end

describe("img:residue()", function()
  local dir
  before_each(function() dir = h.tmpdir() end)
  after_each(function() h.cleanup() end)

  it("finds nothing in a clean image", function()
    local path = dir .. "/clean.qcow2"
    h.create(path, 4 * 1024 * KiB)
    h.qemu_io(path, { "write -P 0x11 0 256k", "write -c -P 0x12 1M 64k" })
    assert.are.same({}, residue(path))
  end)

  it("finds a leaked secret", function()
    local path = dir .. "/leak.qcow2"
    local secret = "TOP-SECRET: the launch code is 0000"
    h.create(path, 4 * 1024 * KiB)
    local img = assert(qcow2.open(path, { mode = "rw" }))
    assert(img:write(64 * KiB + 100, secret))
    img:close()
    local host = host_of(path, 64 * KiB)
    img = assert(qcow2.open(path))
    local l2 = img:l1()[1] & 0x00fffffffffffe00
    img:close()
    h.poke(path, l2 + 8, h.be64(0))             -- drop the reference only
    local leaked = of_kind(residue(path), "leaked")
    assert.are.equal(1, #leaked)
    assert.are.equal(host + 100, leaked[1].offset)
    assert.are.equal(#secret, leaked[1].length)
    assert.is_true(math.abs(entropy(secret) - leaked[1].entropy) < 1e-9)
  end)

  it("finds a cluster freed by a snapshot delete", function()
    local path = dir .. "/snap.qcow2"
    h.create(path, 4 * 1024 * KiB)
    h.qemu_io(path, { "write -P 0x5a 0 64k" })
    local host = host_of(path, 0)
    h.qemu_img("snapshot -c s1 " .. h.q(path))
    h.qemu_io(path, { "write -P 0x11 0 64k" })
    assert.are_not.equal(host, host_of(path, 0))
    h.qemu_img("snapshot --image-opts -d s1 "
      .. h.q("driver=qcow2,file.filename=" .. path .. ",pass-discard-snapshot=off"))
    local free = of_kind(residue(path), "free")
    local found
    for _, r in ipairs(free) do
      if r.offset == host then found = r end
    end
    assert(found, ("no free residue at %#x"):format(host))
    assert(found.length >= 64 * KiB)
    local img = assert(qcow2.open(path))
    assert.are.equal(("\x5a"):rep(64 * KiB), img:raw_read(host, 64 * KiB))
    local own
    for _, o in ipairs(assert(img:owners())) do
      if o.offset <= host and host < o.offset + o.length then own = o end
    end
    assert.are.equal("free", own.owner)
    img:close()
  end)

  it("finds data behind a zero-flagged entry, entropy 0 for one repeated byte", function()
    local path = dir .. "/zero.qcow2"
    h.create(path, 4 * 1024 * KiB)
    h.qemu_io(path, { "write -P 0x5a 64k 64k" })
    local host = host_of(path, 64 * KiB)
    h.qemu_io(path, { "write -z 64k 64k" })   -- QEMU 7.2 keeps the host cluster
    assert.are.equal(host, host_of(path, 64 * KiB))
    local img = assert(qcow2.open(path))
    assert.are.equal(("\0"):rep(64 * KiB), img:read(64 * KiB, 64 * KiB))
    img:close()
    assert.are.same({ { offset = host, length = 64 * KiB, kind = "zero_shadow", entropy = 0.0 } },
      residue(path))
  end)

  it("finds header slack in cluster 0", function()
    local path = dir .. "/hdr.qcow2"
    local marker = "hidden in cluster zero"
    h.create(path, 4 * 1024 * KiB, nil, nil)
    local img = assert(qcow2.open(path, { mode = "rw" }))
    assert(img:raw_write(0x800, marker))
    img:close()
    assert.are.equal("", h.must("qemu-img check -q " .. h.q(path)))
    local r = residue(path)
    assert.are.same({ { offset = 0x800, length = #marker, kind = "header_slack",
      entropy = r[1] and r[1].entropy } }, r)
    assert.is_true(math.abs(entropy(marker) - r[1].entropy) < 1e-9)
  end)

  it("finds bytes after a compressed stream inside its last sector", function()
    local path = dir .. "/comp.qcow2"
    h.create(path, 4 * 1024 * KiB)
    h.qemu_io(path, { "write -c -P 0x41 0 64k" })
    local img = assert(qcow2.open(path))
    local l2 = img:l1()[1] & 0x00fffffffffffe00
    img:close()
    local entry = h.get_be64(path, l2)
    local shift = 62 - (16 - 8)
    local coffset = entry & ((1 << shift) - 1)
    local sectors = ((entry >> shift) & 0xff) + 1
    local sector_end = (coffset & ~511) + sectors * 512
    h.poke(path, sector_end - 4, "ZZZZ")
    img = assert(qcow2.open(path))
    assert.are.equal(("A"):rep(64 * KiB), img:read(0, 64 * KiB))   -- no view sees it
    img:close()
    local r = residue(path)
    assert.are.same({ { offset = sector_end - 4, length = 4, kind = "compressed_slack", entropy = 0.0 } }, r)
  end)

  it("finds bytes appended past the last cluster, random ones near 8 bits per byte", function()
    local path = dir .. "/tail.qcow2"
    h.create(path, 4 * 1024 * KiB)
    h.qemu_io(path, { "write -P 0x11 0 64k" })
    local size = file_size(path)
    local junk = h.random_bytes(8192, 7)
    local f = assert(io.open(path, "ab"))
    f:write(junk)
    f:close()
    local r = residue(path)
    assert.are.equal(1, #r)
    assert.are.equal("tail", r[1].kind)
    -- random bytes may start or end with a zero byte: trimmed
    local first = junk:find("[^%z]")
    local last = #junk - junk:reverse():find("[^%z]") + 1
    assert.are.equal(size + first - 1, r[1].offset)
    assert.are.equal(last - first + 1, r[1].length)
    assert.is_true(r[1].entropy > 7.9, tostring(r[1].entropy))
    assert.is_true(math.abs(entropy(junk:sub(first, last)) - r[1].entropy) < 1e-9)
  end)

  it("splits on runs of zeroes and trims them", function()
    local path = dir .. "/split.qcow2"
    h.create(path, 4 * 1024 * KiB)
    local size = file_size(path)
    local f = assert(io.open(path, "ab"))
    f:write(("\0"):rep(100) .. "AB" .. ("\0"):rep(511) .. "C" .. ("\0"):rep(512) .. "D" .. ("\0"):rep(10))
    f:close()
    local r = residue(path)
    assert.are.same({ size + 100, 514, size + 100 + 514 + 512, 1 },
      { r[1].offset, r[1].length, r[2].offset, r[2].length })
    assert.are.equal(2, #r)
  end)
end)
