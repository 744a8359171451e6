--- qcow2.entry: L1/L2 entries and compressed cluster descriptors, decoded
-- to tables and encoded back (qcow2.edit.flags and qcow2.edit.compressed).
-- Pure functions on 64-bit values: no file, no validation of the image.
local M = {}

local OFFSET_MASK = 0x00fffffffffffe00   -- L1/L2 entry host offset, bits 9..55
local COPIED, COMPRESSED, ZERO = 1 << 63, 1 << 62, 1

local function argerr(n, fname, msg)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), 3)
end

local function check_int(v, n, fname)
  if math.type(v) ~= "integer" then
    argerr(n, fname, "integer expected, got " .. (math.type(v) or type(v)))
  end
end

--- Decode an L1/L2 entry into {offset=, copied=, compressed=, zero=,
-- reserved=} or, given such a table, encode it (offset masked to 9..55).
function M.flags(entry)
  if type(entry) == "table" then
    local v = (entry.offset or 0) & OFFSET_MASK
    if entry.copied then v = v | COPIED end
    if entry.compressed then v = v | COMPRESSED end
    if entry.zero then v = v | ZERO end
    return v | (entry.reserved or 0)
  end
  check_int(entry, 1, "flags")
  return {
    offset = entry & OFFSET_MASK,
    copied = entry & COPIED ~= 0,
    compressed = entry & COMPRESSED ~= 0,
    zero = entry & ZERO ~= 0,
    reserved = entry & ~(OFFSET_MASK | COPIED | COMPRESSED | ZERO),
  }
end

--- A compressed cluster descriptor: decode an entry into {offset=,
-- sectors= (512-byte sectors, counting the first), size= (the bytes QEMU
-- reads: sectors * 512 - offset % 512), copied=}, or encode
-- {offset=, sectors=} (bit 62 set) for `cluster_bits`.
function M.compressed(entry, cluster_bits)
  check_int(cluster_bits, 2, "compressed")
  if cluster_bits < 9 or cluster_bits > 21 then
    argerr(2, "compressed", "cluster_bits 9..21 expected, got " .. cluster_bits)
  end
  local x = 70 - cluster_bits
  local nmask = (1 << (cluster_bits - 8)) - 1
  if type(entry) == "table" then
    local sectors = entry.sectors or 1
    check_int(entry.offset, 1, "compressed")
    if sectors < 1 or sectors - 1 > nmask then
      argerr(1, "compressed", ("sectors 1..%d expected, got %d"):format(nmask + 1, sectors))
    end
    return COMPRESSED | ((sectors - 1) << x) | (entry.offset & ((1 << x) - 1))
  end
  check_int(entry, 1, "compressed")
  local off = entry & ((1 << x) - 1)
  local sectors = ((entry >> x) & nmask) + 1
  return { offset = off, sectors = sectors, size = sectors * 512 - (off & 511),
           copied = entry & COPIED ~= 0, compressed = entry & COMPRESSED ~= 0 }
end

return M
