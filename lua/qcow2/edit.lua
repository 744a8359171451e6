--- qcow2.edit(path [, opts]): a structure-aware editor for deliberate
-- corruption (API.md, "Test tooling").
--
-- Pure Lua on purpose: it must not share the engine's validation, so it
-- works on images `qcow2.open` refuses. It validates nothing and caches
-- nothing: every accessor reads the file when called, every setter writes
-- at once (unbuffered). What it cannot reach (a table past the end of the
-- file, an index past a count, an unallocated L2 table) comes back as
-- nil, message, code. Misuse (wrong types, unknown field names, values
-- that do not fit their field) raises.
--
-- Every write is journaled with its old and new bytes; `ed:undo(n)` puts
-- back the bytes of the last n calls. Writes never extend the file, so an
-- undo is always byte for byte.
--
-- Locks: the editor takes no locks (it is used on images nobody holds),
-- but before each write it probes them through the engine (a read-only
-- `qcow2.open`, which takes and tests QEMU's lock bytes before it parses
-- anything) and refuses with "busy" when QEMU or another handle holds the
-- image for writing. `opts.locks = false` skips the probe.
local entry_codec = require "qcow2.entry"
local E = {}

local OFFSET_MASK = 0x00fffffffffffe00   -- L1/L2 entry host offset, bits 9..55
local REFT_MASK = ~0x1ff                  -- refcount table entry offset

-- Header fields: name, offset, size (bytes); v3 fields start at 72.
local HEADER = {
  { "magic", 0, 4 }, { "version", 4, 4 },
  { "backing_file_offset", 8, 8 }, { "backing_file_size", 16, 4 },
  { "cluster_bits", 20, 4 }, { "size", 24, 8 }, { "crypt_method", 32, 4 },
  { "l1_size", 36, 4 }, { "l1_table_offset", 40, 8 },
  { "refcount_table_offset", 48, 8 }, { "refcount_table_clusters", 56, 4 },
  { "nb_snapshots", 60, 4 }, { "snapshots_offset", 64, 8 },
  { "incompatible_features", 72, 8 }, { "compatible_features", 80, 8 },
  { "autoclear_features", 88, 8 }, { "refcount_order", 96, 4 },
  { "header_length", 100, 4 }, { "compression_type", 104, 1 },
}
local HEADER_BY_NAME = {}
for _, f in ipairs(HEADER) do HEADER_BY_NAME[f[1]] = f end
E.HEADER_FIELDS = HEADER

local FEATURE_OFFSET = { incompatible = 72, compatible = 80, autoclear = 88 }

-- Snapshot table entry: fixed part, then the known extra data.
local SNAPSHOT = {
  { "l1_table_offset", 0, 8 }, { "l1_size", 8, 4 }, { "id_str_size", 12, 2 },
  { "name_size", 14, 2 }, { "date_sec", 16, 4 }, { "date_nsec", 20, 4 },
  { "vm_clock_nsec", 24, 8 }, { "vm_state_size", 32, 4 },
  { "extra_data_size", 36, 4 },
  -- extra data: present when extra_data_size covers them
  { "vm_state_size_large", 40, 8, extra = true }, { "disk_size", 48, 8, extra = true },
  { "icount", 56, 8, extra = true },
}
local SNAPSHOT_BY_NAME = {}
for _, f in ipairs(SNAPSHOT) do SNAPSHOT_BY_NAME[f[1]] = f end
E.SNAPSHOT_FIELDS = SNAPSHOT

-- Bitmap directory entry.
local BITMAP = {
  { "bitmap_table_offset", 0, 8 }, { "bitmap_table_size", 8, 4 }, { "flags", 12, 4 },
  { "type", 16, 1 }, { "granularity_bits", 17, 1 }, { "name_size", 18, 2 },
  { "extra_data_size", 20, 4 },
}
local BITMAP_BY_NAME = {}
for _, f in ipairs(BITMAP) do BITMAP_BY_NAME[f[1]] = f end
E.BITMAP_FIELDS = BITMAP

E.MAGIC = {
  end_ = 0, backing_format = 0xe2792aca, feature_names = 0x6803f857,
  bitmaps = 0x23852875, crypto = 0x0537be77, data_file = 0x44415441,
}

-- Helpers ------------------------------------------------------------------

local function argerr(n, fname, msg)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), 3)
end

local function check_int(v, n, fname, what)
  if math.type(v) ~= "integer" then
    argerr(n, fname, (what or "integer") .. " expected, got " .. (math.type(v) or type(v)))
  end
end

local function check_index(v, n, fname)
  check_int(v, n, fname, "non-negative integer")
  if v < 0 then argerr(n, fname, "non-negative integer expected, got " .. v) end
end

local function fmt(size) return ">I" .. size end

-- A value fits a field of `size` bytes: every 64-bit pattern for 8.
local function check_fits(v, size, n, fname, field)
  check_int(v, n, fname)
  if size < 8 and (v < 0 or v >= (1 << (8 * size))) then
    argerr(n, fname, ("%s: %d does not fit %d bytes"):format(field, v, size))
  end
end

local function pack(v, size)
  if size == 8 then return string.pack(">i8", v) end
  return string.pack(fmt(size), v)
end

local function unpack(s, pos, size)
  if size == 8 then return (string.unpack(">i8", s, pos)) end
  return (string.unpack(fmt(size), s, pos))
end

local function align_up(v, a) return (v + a - 1) // a * a end

-- Editor -----------------------------------------------------------------------

local Editor = {}
Editor.__index = Editor

local function closed_check(self, fname)
  if not self.f then error(("'%s' on a closed editor"):format(fname), 3) end
end

function Editor:_size()
  return self.f:seek("end")
end

-- Bytes at [off, off+len); nil, msg, "corrupt" when the file ends first.
function Editor:_read(off, len, what)
  if off < 0 or len < 0 or off > math.maxinteger - len then
    return nil, ("%s: %s at 0x%x+%d is outside any file"):format(self.name, what, off, len), "corrupt"
  end
  local size = self:_size()
  if off + len > size then
    return nil, ("%s: %s at 0x%x+%d is past the end of the file (%d bytes)")
      :format(self.name, what, off, len, size), "corrupt"
  end
  if len == 0 then return "" end
  self.f:seek("set", off)
  local data = self.f:read(len)
  if not data or #data ~= len then
    return nil, ("%s: short read of %s at 0x%x"):format(self.name, what, off), "io"
  end
  return data
end

function Editor:_writable()
  if self.read_only then
    return nil, self.name .. ": the editor is read-only (file not writable)", "readonly"
  end
  if self.locks then
    local core = require "qcow2.core"
    local img, msg, code = core.open(self.path, { backing = false })
    if img then
      img:close()
    elseif code == "busy" then
      return nil, ("%s: held for writing by another process (%s)"):format(self.name, msg), "busy"
    end
  end
  return true
end

-- One journaled write inside the file; the call's writes share `seq`.
function Editor:_write(off, data, what, seq)
  local size = self:_size()
  if off < 0 or off + #data > size then
    return nil, ("%s: %s at 0x%x+%d would extend the file (%d bytes)")
      :format(self.name, what, off, #data, size), "invalid"
  end
  self.f:seek("set", off)
  local old = self.f:read(#data)
  self.f:seek("set", off)
  local ok, err = self.f:write(data)
  if ok then ok, err = self.f:flush() end
  if not ok then
    return nil, ("%s: write of %s at 0x%x failed: %s"):format(self.name, what, off, tostring(err)), "io"
  end
  local j = self.log
  j[#j + 1] = { seq = seq, op = what, offset = off, old = old, new = data }
  return true
end

-- Run `body(seq)` as one journaled call after the writability checks.
function Editor:_call(body)
  local ok, msg, code = self:_writable()
  if not ok then return nil, msg, code end
  self.seq = self.seq + 1
  return body(self.seq)
end

-- Header -----------------------------------------------------------------------

--- Every header field as parsed, valid or not. Version < 3 gives the 72-byte
-- v2 layout only; v3 adds the feature words, refcount_order and
-- header_length, and compression_type when header_length > 104. Fields the
-- file is too short for are absent; `backing_file` is the name when reachable.
function Editor:header()
  closed_check(self, "header")
  local raw, msg, code = self:_read(0, 72, "header")
  if not raw then return nil, msg, code end
  local size = self:_size()
  local more = self:_read(72, math.max(0, math.min(40, size - 72)), "header") or ""
  raw = raw .. more
  local h = {}
  local version = unpack(raw, 5, 4)
  for _, f in ipairs(HEADER) do
    local name, off, len = f[1], f[2], f[3]
    local wanted = off < 72 or (version >= 3 and (name ~= "compression_type" or
      (h.header_length or 0) > 104))
    if wanted and off + len <= #raw then h[name] = unpack(raw, off + 1, len) end
  end
  if h.backing_file_offset ~= 0 and h.backing_file_size > 0 and h.backing_file_size <= 1023 then
    h.backing_file = self:_read(h.backing_file_offset, h.backing_file_size, "backing file name")
  end
  return h
end

--- Write header fields by name, in table order of HEADER (one journal
-- entry per field, all in one call). Unknown names raise.
function Editor:set_header(fields)
  closed_check(self, "set_header")
  if type(fields) ~= "table" then argerr(1, "set_header", "table expected") end
  local todo = {}
  for name, v in pairs(fields) do
    local f = HEADER_BY_NAME[name]
    if not f then argerr(1, "set_header", "unknown header field '" .. tostring(name) .. "'") end
    check_fits(v, f[3], 1, "set_header", name)
    todo[#todo + 1] = f
  end
  table.sort(todo, function(a, b) return a[2] < b[2] end)
  return self:_call(function(seq)
    for _, f in ipairs(todo) do
      local ok, msg, code = self:_write(f[2], pack(fields[f[1]], f[3]), "header." .. f[1], seq)
      if not ok then return nil, msg, code end
    end
    return true
  end)
end

local FEATURE_KINDS = { incompatible = true, compatible = true, autoclear = true }

--- Set or clear one feature bit (v3 layout offsets, whatever the version).
function Editor:set_feature(kind, bit, on)
  closed_check(self, "set_feature")
  if not FEATURE_KINDS[kind] then
    argerr(1, "set_feature", "\"incompatible\", \"compatible\" or \"autoclear\" expected, got " .. tostring(kind))
  end
  check_index(bit, 2, "set_feature")
  if bit > 63 then argerr(2, "set_feature", "bit 0..63 expected, got " .. bit) end
  if type(on) ~= "boolean" then argerr(3, "set_feature", "boolean expected") end
  local off = FEATURE_OFFSET[kind]
  local raw, msg, code = self:_read(off, 8, kind .. " features")
  if not raw then return nil, msg, code end
  local v = unpack(raw, 1, 8)
  v = on and (v | (1 << bit)) or (v & ~(1 << bit))
  return self:_call(function(seq)
    return self:_write(off, pack(v, 8), ("header.%s_features bit %d"):format(kind, bit), seq)
  end)
end

--- Write a backing file name: at backing_file_offset, or after the header
-- extensions when there is none; sets backing_file_offset and _size.
function Editor:set_backing_name(name)
  closed_check(self, "set_backing_name")
  if type(name) ~= "string" then argerr(1, "set_backing_name", "string expected") end
  local h, msg, code = self:header()
  if not h then return nil, msg, code end
  local off = h.backing_file_offset
  if off == 0 then
    local _, _, end_off = self:extensions()
    off = (end_off or 72) + 8
  end
  return self:_call(function(seq)
    local ok, m, c = self:_write(off, name, "backing file name", seq)
    if not ok then return nil, m, c end
    return self:_write(8, pack(off, 8) .. pack(#name, 4), "header.backing_file_offset+size", seq)
  end)
end

-- Header extensions -----------------------------------------------------------

-- Where the extension area starts and where it may end (the first cluster,
-- or the file when shorter or cluster_bits is absurd).
function Editor:_ext_area()
  local h, msg, code = self:header()
  if not h then return nil, msg, code end
  local start = 72
  if h.version >= 3 and h.header_length then start = h.header_length end
  local limit = self:_size()
  if h.cluster_bits >= 9 and h.cluster_bits <= 30 then
    limit = math.min(limit, 1 << h.cluster_bits)
  end
  return start, limit, h
end

--- The header extensions: array of {magic=, length=, offset=, data=}
-- (offset of the 8-byte extension header). An extension cut off by the end
-- of the area has `truncated = true` and the bytes there are. Second value
-- is the offset of the end marker (or where the walk stopped).
function Editor:extensions()
  closed_check(self, "extensions")
  local start, limit, code = self:_ext_area()
  if not start then return nil, limit, code end
  local list, off = {}, start
  while off + 8 <= limit do
    local raw = self:_read(off, 8, "extension header")
    if not raw then break end
    local magic, len = string.unpack(">I4I4", raw)
    if magic == 0 then return list, off, off end
    local e = { magic = magic, length = len, offset = off }
    local avail = math.max(0, math.min(len, limit - off - 8))
    e.data = self:_read(off + 8, avail, "extension data") or ""
    list[#list + 1] = e
    if avail < len then e.truncated = true; return list, nil, off end
    off = off + 8 + align_up(len, 8)
  end
  return list, nil, off
end

local function find_ext(list, magic)
  for i, e in ipairs(list) do if e.magic == magic then return e, i end end
end

-- Rewrite the extension area from `list` (+ end marker), moving a backing
-- name that the new area would cover to just after it. One call.
function Editor:_rewrite_extensions(list, old_end, opname)
  local start, limit, h = self:_ext_area()
  if not start then return nil, limit, h end
  local parts = {}
  for _, e in ipairs(list) do
    parts[#parts + 1] = string.pack(">I4I4", e.magic, e.length) .. e.data
      .. string.rep("\0", align_up(#e.data, 8) - #e.data)
  end
  parts[#parts + 1] = string.rep("\0", 8)
  local area = table.concat(parts)
  local new_end = start + #area
  local bo, bs = h.backing_file_offset, h.backing_file_size
  local move_backing = bo ~= 0 and bo < new_end and bo + bs > start
  local name
  if move_backing then
    name = self:_read(bo, bs, "backing file name")
    if not name then move_backing = false end
  end
  if move_backing then
    area = area .. name
    new_end = new_end + #name
  end
  -- clear what the old area held past the new one (never the backing name)
  local old_stop = old_end and old_end + 8 or new_end
  if old_stop > new_end then
    local stop = old_stop
    if not move_backing and bo >= new_end and bo < stop then stop = bo end
    area = area .. string.rep("\0", math.max(0, stop - new_end))
  end
  if start + #area > limit then
    return nil, ("%s: the header extensions would not fit in the first cluster (%d > %d bytes)")
      :format(self.name, start + #area, limit), "invalid"
  end
  return self:_call(function(seq)
    local ok, msg, code = self:_write(start, area, opname, seq)
    if not ok then return nil, msg, code end
    if move_backing then
      return self:_write(8, pack(new_end - #name, 8), "header.backing_file_offset", seq)
    end
    return true
  end)
end

--- Add an extension before the end marker.
function Editor:add_extension(magic, data)
  closed_check(self, "add_extension")
  check_fits(magic, 4, 1, "add_extension", "magic")
  if type(data) ~= "string" then argerr(2, "add_extension", "string expected") end
  local list, end_off, code = self:extensions()
  if not list then return nil, end_off, code end
  if not end_off then
    return nil, self.name .. ": the header extensions have no end marker to append at", "corrupt"
  end
  local copy = {}
  for i, e in ipairs(list) do copy[i] = e end
  copy[#copy + 1] = { magic = magic, length = #data, data = data }
  return self:_rewrite_extensions(copy, end_off, ("extension 0x%08x added"):format(magic))
end

--- Delete the first extension with this magic.
function Editor:del_extension(magic)
  closed_check(self, "del_extension")
  check_fits(magic, 4, 1, "del_extension", "magic")
  local list, end_off, code = self:extensions()
  if not list then return nil, end_off, code end
  local e, i = find_ext(list, magic)
  if not e then
    return nil, ("%s: no header extension 0x%08x"):format(self.name, magic), "notfound"
  end
  if not end_off or e.truncated then
    return nil, self.name .. ": the header extensions cannot be walked to their end", "corrupt"
  end
  table.remove(list, i)
  return self:_rewrite_extensions(list, end_off, ("extension 0x%08x deleted"):format(magic))
end

--- Overwrite only the length field of an extension (the data stays): the
-- walk after it then goes wherever the new length says.
function Editor:set_extension_length(magic, n)
  closed_check(self, "set_extension_length")
  check_fits(magic, 4, 1, "set_extension_length", "magic")
  check_fits(n, 4, 2, "set_extension_length", "length")
  local list = self:extensions()
  if not list then return self:extensions() end
  local e = find_ext(list, magic)
  if not e then
    return nil, ("%s: no header extension 0x%08x"):format(self.name, magic), "notfound"
  end
  return self:_call(function(seq)
    return self:_write(e.offset + 4, pack(n, 4), ("extension 0x%08x length"):format(magic), seq)
  end)
end

--- Overwrite the data of an extension in place (same length; bytes past
-- the data raise as misuse).
function Editor:set_extension_data(magic, data)
  closed_check(self, "set_extension_data")
  check_fits(magic, 4, 1, "set_extension_data", "magic")
  if type(data) ~= "string" then argerr(2, "set_extension_data", "string expected") end
  local list = self:extensions()
  if not list then return self:extensions() end
  local e = find_ext(list, magic)
  if not e then
    return nil, ("%s: no header extension 0x%08x"):format(self.name, magic), "notfound"
  end
  if #data > align_up(e.length, 8) then
    argerr(2, "set_extension_data", ("%d bytes do not fit extension 0x%08x (%d)"):format(#data, magic, e.length))
  end
  return self:_call(function(seq)
    return self:_write(e.offset + 8, data, ("extension 0x%08x data"):format(magic), seq)
  end)
end

-- Tables -------------------------------------------------------------------------

-- Read or write one 8-byte entry at `off`; `value` nil reads.
function Editor:_entry(off, value, what, size)
  size = size or 8
  if value == nil then
    local raw, msg, code = self:_read(off, size, what)
    if not raw then return nil, msg, code end
    return unpack(raw, 1, size), off
  end
  local ok, msg, code = self:_read(off, size, what)
  if not ok then return nil, msg, code end
  return self:_call(function(seq) return self:_write(off, pack(value, size), what, seq) end)
end

local function value_arg(v, n, fname, size)
  if v ~= nil then check_fits(v, size or 8, n, fname, "value") end
end

--- Geometry the table accessors need, from the header as it is now.
function Editor:geometry()
  closed_check(self, "geometry")
  local h, msg, code = self:header()
  if not h then return nil, msg, code end
  local cb = h.cluster_bits
  if cb < 9 or cb > 30 then
    return nil, ("%s: cluster_bits %d leaves no table to follow"):format(self.name, cb), "corrupt"
  end
  local ext = (h.incompatible_features or 0) & 0x10 ~= 0
  local order = h.refcount_order or 4
  if h.version < 3 then order = 4 end
  return {
    header = h, cluster_bits = cb, cluster_size = 1 << cb, extended_l2 = ext,
    l2_entry_size = ext and 16 or 8, l2_bits = cb - (ext and 4 or 3),
    refcount_order = order,
  }
end

--- Entry `index` (from 0) of the active L1 table; with `value`, write it.
function Editor:l1(index, value)
  closed_check(self, "l1")
  check_index(index, 1, "l1")
  value_arg(value, 2, "l1")
  local h, msg, code = self:header()
  if not h then return nil, msg, code end
  if index >= h.l1_size then
    return nil, ("%s: L1 index %d is past l1_size %d"):format(self.name, index, h.l1_size), "invalid"
  end
  return self:_entry(h.l1_table_offset + 8 * index, value, ("l1[%d]"):format(index))
end

-- File offset of the L2 entry of a guest offset, through L1 table `l1_off`
-- of `l1_size` entries; second value the geometry.
function Editor:_l2_where(guest, l1_off, l1_size)
  local g, msg, code = self:geometry()
  if not g then return nil, msg, code end
  l1_off = l1_off or g.header.l1_table_offset
  l1_size = l1_size or g.header.l1_size
  local l1_index = guest >> (g.cluster_bits + g.l2_bits)
  local l2_index = (guest >> g.cluster_bits) & ((1 << g.l2_bits) - 1)
  if l1_index >= l1_size then
    return nil, ("%s: guest offset 0x%x needs L1 index %d, past l1_size %d")
      :format(self.name, guest, l1_index, l1_size), "invalid"
  end
  local raw, m, c = self:_read(l1_off + 8 * l1_index, 8, ("l1[%d]"):format(l1_index))
  if not raw then return nil, m, c end
  local l2 = unpack(raw, 1, 8) & OFFSET_MASK
  if l2 == 0 then
    return nil, ("%s: guest offset 0x%x has no L2 table (l1[%d] is unallocated)")
      :format(self.name, guest, l1_index), "notfound"
  end
  return l2 + l2_index * g.l2_entry_size, g
end

--- The L2 entry (the 64-bit descriptor; word 0 with extended L2) of the
-- cluster holding guest offset `guest`; with `value`, write it. Second
-- value of a read: the entry's file offset.
function Editor:l2(guest, value)
  closed_check(self, "l2")
  check_index(guest, 1, "l2")
  value_arg(value, 2, "l2")
  local where, msg, code = self:_l2_where(guest)
  if not where then return nil, msg, code end
  return self:_entry(where, value, ("l2[guest 0x%x]"):format(guest))
end

--- Extended L2 only: the subcluster bitmap (word 1) of the guest cluster.
function Editor:l2_bitmap(guest, value)
  closed_check(self, "l2_bitmap")
  check_index(guest, 1, "l2_bitmap")
  value_arg(value, 2, "l2_bitmap")
  local where, g, code = self:_l2_where(guest)
  if not where then return nil, g, code end
  if not g.extended_l2 then
    return nil, self.name .. ": the image has no extended L2 entries", "invalid"
  end
  return self:_entry(where + 8, value, ("l2 bitmap[guest 0x%x]"):format(guest))
end

--- Entry `index` of the refcount table; with `value`, write it.
function Editor:reftable(index, value)
  closed_check(self, "reftable")
  check_index(index, 1, "reftable")
  value_arg(value, 2, "reftable")
  local g, msg, code = self:geometry()
  if not g then return nil, msg, code end
  local h = g.header
  if index >= h.refcount_table_clusters * g.cluster_size // 8 then
    return nil, ("%s: refcount table index %d is past its %d clusters")
      :format(self.name, index, h.refcount_table_clusters), "invalid"
  end
  return self:_entry(h.refcount_table_offset + 8 * index, value, ("reftable[%d]"):format(index))
end

--- The refcount of host cluster `cluster` (any width 1..64 bits; a 64-bit
-- refcount is the raw pattern as a Lua integer); with `value`, write it.
function Editor:refcount(cluster, value)
  closed_check(self, "refcount")
  check_index(cluster, 1, "refcount")
  if value ~= nil then check_int(value, 2, "refcount") end
  local g, msg, code = self:geometry()
  if not g then return nil, msg, code end
  local order = g.refcount_order
  if order > 6 then
    return nil, ("%s: refcount_order %d has no entry width"):format(self.name, order), "corrupt"
  end
  local bits = 1 << order
  if value ~= nil and bits < 64 and (value < 0 or value >= (1 << bits)) then
    argerr(2, "refcount", ("%d does not fit a %d-bit refcount"):format(value, bits))
  end
  local per_block = g.cluster_size * 8 // bits
  local ti, bi = cluster // per_block, cluster % per_block
  local rb, m, c = self:reftable(ti)
  if not rb then return nil, m, c end
  rb = rb & REFT_MASK
  if rb == 0 then
    return nil, ("%s: host cluster %d has no refcount block (reftable[%d] is 0)")
      :format(self.name, cluster, ti), "notfound"
  end
  local what = ("refcount[%d]"):format(cluster)
  if bits >= 8 then
    return self:_entry(rb + bi * (bits // 8), value, what, bits // 8)
  end
  -- sub-byte widths: entry i at bit (i * bits) % 8 of byte i * bits // 8, LSB first
  local boff = rb + bi * bits // 8
  local shift, mask = (bi * bits) % 8, (1 << bits) - 1
  local raw, rm, rc = self:_read(boff, 1, what)
  if not raw then return nil, rm, rc end
  local byte = raw:byte()
  if value == nil then return (byte >> shift) & mask, boff end
  byte = (byte & ~(mask << shift)) | (value << shift)
  return self:_call(function(seq) return self:_write(boff, string.char(byte), what, seq) end)
end

-- Snapshots ----------------------------------------------------------------

-- Parse the snapshot entry at `off`: fields, id, name, length (padded).
function Editor:_snapshot_at(off)
  local raw, msg, code = self:_read(off, 40, "snapshot entry")
  if not raw then return nil, msg, code end
  local s = { offset = off }
  for _, f in ipairs(SNAPSHOT) do
    if not f.extra then s[f[1]] = unpack(raw, f[2] + 1, f[3]) end
  end
  local extra = s.extra_data_size
  local xs = math.min(extra, 24)
  local x = self:_read(off + 40, xs, "snapshot extra data")
  if not x then
    return nil, ("%s: snapshot entry at 0x%x: extra data (%d bytes) is past the end of the file")
      :format(self.name, off, extra), "corrupt"
  end
  for _, f in ipairs(SNAPSHOT) do
    if f.extra and f[2] - 40 + f[3] <= xs then s[f[1]] = unpack(x, f[2] - 40 + 1, f[3]) end
  end
  local strings = off + 40 + extra
  local ids = self:_read(strings, s.id_str_size + s.name_size, "snapshot id and name")
  if not ids then
    return nil, ("%s: snapshot entry at 0x%x: id and name are past the end of the file")
      :format(self.name, off), "corrupt"
  end
  s.id, s.name = ids:sub(1, s.id_str_size), ids:sub(s.id_str_size + 1)
  s.length = align_up(40 + extra + s.id_str_size + s.name_size, 8)
  return s
end

-- The entry of snapshot `index` (from 0), walking the table.
function Editor:_snapshot_entry(index)
  local h, msg, code = self:header()
  if not h then return nil, msg, code end
  if index >= h.nb_snapshots then
    return nil, ("%s: snapshot index %d is past nb_snapshots %d"):format(self.name, index, h.nb_snapshots), "invalid"
  end
  local off = h.snapshots_offset
  for _ = 0, index - 1 do
    local s, m, c = self:_snapshot_at(off)
    if not s then return nil, m, c end
    off = off + s.length
  end
  return self:_snapshot_at(off)
end

--- Fields of snapshot table entry `index` (from 0): the format's names
-- (SNAPSHOT_FIELDS), `id`, `name`, `offset` and `length` of the entry.
-- With `fields`, write those (numbers in place; `id`/`name` in place when
-- the length is unchanged, else the rest of the table is rewritten with
-- the new sizes, within the clusters it occupies).
function Editor:snapshot(index, fields)
  closed_check(self, "snapshot")
  check_index(index, 1, "snapshot")
  if fields ~= nil and type(fields) ~= "table" then argerr(2, "snapshot", "table expected") end
  local todo = {}
  for k, v in pairs(fields or {}) do
    if k == "id" or k == "name" then
      if type(v) ~= "string" or #v > 0xffff then argerr(2, "snapshot", k .. ": string expected") end
    else
      local f = SNAPSHOT_BY_NAME[k]
      if not f then argerr(2, "snapshot", "unknown snapshot field '" .. tostring(k) .. "'") end
      check_fits(v, f[3], 2, "snapshot", k)
      todo[#todo + 1] = f
    end
  end
  local s, msg, code = self:_snapshot_entry(index)
  if not s or fields == nil then return s, msg, code end
  table.sort(todo, function(a, b) return a[2] < b[2] end)
  local renamed = (fields.id and #fields.id ~= #s.id) or (fields.name and #fields.name ~= #s.name)
  return self:_call(function(seq)
    for _, f in ipairs(todo) do
      local ok, m, c = self:_write(s.offset + f[2], pack(fields[f[1]], f[3]),
                                   ("snapshot[%d].%s"):format(index, f[1]), seq)
      if not ok then return nil, m, c end
    end
    if not (fields.id or fields.name) then return true end
    if not renamed then
      local at = s.offset + 40 + s.extra_data_size
      return self:_write(at, (fields.id or s.id) .. (fields.name or s.name),
                         ("snapshot[%d].id+name"):format(index), seq)
    end
    return self:_resize_snapshot(index, s, fields.id or s.id, fields.name or s.name, seq)
  end)
end

-- Rewrite entry `index` with new strings and every later entry after it.
function Editor:_resize_snapshot(index, s, id, name, seq)
  local g, msg, code = self:geometry()
  if not g then return nil, msg, code end
  local h = g.header
  local entries, off = {}, s.offset + s.length
  for _ = index + 1, h.nb_snapshots - 1 do
    local e, m, c = self:_snapshot_at(off)
    if not e then return nil, m, c end
    -- the last entry's padding may be missing at the end of the file
    local len = math.min(e.length, self:_size() - off)
    entries[#entries + 1] = self:_read(off, len, "snapshot entry")
    off = off + len
  end
  local fixed = self:_read(s.offset, 40 + s.extra_data_size, "snapshot entry")
  fixed = fixed:sub(1, 12) .. string.pack(">I2I2", #id, #name) .. fixed:sub(17)
  local body = fixed .. id .. name
  body = body .. string.rep("\0", align_up(#body, 8) - #body)
  local data = body .. table.concat(entries)
  local old_len = off - s.offset
  local room = align_up(off - h.snapshots_offset, g.cluster_size) - (s.offset - h.snapshots_offset)
  if #data > room then
    return nil, ("%s: the snapshot table would outgrow its clusters"):format(self.name), "invalid"
  end
  if #data < old_len then data = data .. string.rep("\0", old_len - #data) end
  return self:_write(s.offset, data, ("snapshot[%d] resized"):format(index), seq)
end

--- Entry `i` of snapshot `index`'s L1 table; with `value`, write it.
function Editor:snapshot_l1(index, i, value)
  closed_check(self, "snapshot_l1")
  check_index(index, 1, "snapshot_l1")
  check_index(i, 2, "snapshot_l1")
  value_arg(value, 3, "snapshot_l1")
  local s, msg, code = self:_snapshot_entry(index)
  if not s then return nil, msg, code end
  if i >= s.l1_size then
    return nil, ("%s: snapshot %d L1 index %d is past its l1_size %d"):format(self.name, index, i, s.l1_size), "invalid"
  end
  return self:_entry(s.l1_table_offset + 8 * i, value, ("snapshot[%d].l1[%d]"):format(index, i))
end

--- The L2 entry of guest offset `guest` as snapshot `index` sees it.
function Editor:snapshot_l2(index, guest, value)
  closed_check(self, "snapshot_l2")
  check_index(index, 1, "snapshot_l2")
  check_index(guest, 2, "snapshot_l2")
  value_arg(value, 3, "snapshot_l2")
  local s, msg, code = self:_snapshot_entry(index)
  if not s then return nil, msg, code end
  local where, m, c = self:_l2_where(guest, s.l1_table_offset, s.l1_size)
  if not where then return nil, m, c end
  return self:_entry(where, value, ("snapshot[%d].l2[guest 0x%x]"):format(index, guest))
end

-- Bitmaps ----------------------------------------------------------------------

--- The bitmaps extension's fields {nb_bitmaps=, reserved=,
-- bitmap_directory_size=, bitmap_directory_offset=}.
function Editor:bitmaps_extension()
  closed_check(self, "bitmaps_extension")
  local list, msg, code = self:extensions()
  if not list then return nil, msg, code end
  local e = find_ext(list, E.MAGIC.bitmaps)
  if not e then return nil, self.name .. ": no bitmaps extension", "notfound" end
  if #e.data < 24 then
    return nil, ("%s: the bitmaps extension has %d bytes, not 24"):format(self.name, #e.data), "corrupt"
  end
  local n, r, size, off = string.unpack(">I4I4i8i8", e.data)
  return { nb_bitmaps = n, reserved = r, bitmap_directory_size = size,
           bitmap_directory_offset = off, offset = e.offset }
end

--- Bitmap directory entry `index` (from 0): BITMAP_FIELDS, `name`,
-- `offset`, `length`. With `fields`, write the numeric ones in place and a
-- same-length `name`.
function Editor:bitmap(index, fields)
  closed_check(self, "bitmap")
  check_index(index, 1, "bitmap")
  if fields ~= nil and type(fields) ~= "table" then argerr(2, "bitmap", "table expected") end
  local todo = {}
  for k, v in pairs(fields or {}) do
    if k == "name" then
      if type(v) ~= "string" then argerr(2, "bitmap", "name: string expected") end
    else
      local f = BITMAP_BY_NAME[k]
      if not f then argerr(2, "bitmap", "unknown bitmap field '" .. tostring(k) .. "'") end
      check_fits(v, f[3], 2, "bitmap", k)
      todo[#todo + 1] = f
    end
  end
  local bx, msg, code = self:bitmaps_extension()
  if not bx then return nil, msg, code end
  if index >= bx.nb_bitmaps then
    return nil, ("%s: bitmap index %d is past nb_bitmaps %d"):format(self.name, index, bx.nb_bitmaps), "invalid"
  end
  local off, b = bx.bitmap_directory_offset, nil
  for _ = 0, index do
    local raw, m, c = self:_read(off, 24, "bitmap directory entry")
    if not raw then return nil, m, c end
    b = { offset = off }
    for _, f in ipairs(BITMAP) do b[f[1]] = unpack(raw, f[2] + 1, f[3]) end
    local nm = self:_read(off + 24 + b.extra_data_size, b.name_size, "bitmap name")
    if not nm then
      return nil, ("%s: bitmap entry at 0x%x: name is past the end of the file"):format(self.name, off), "corrupt"
    end
    b.name = nm
    b.length = align_up(24 + b.extra_data_size + b.name_size, 8)
    off = off + b.length
  end
  if fields == nil then return b end
  if fields.name and #fields.name ~= #b.name then
    argerr(2, "bitmap", "name: same length expected (set name_size to change it)")
  end
  table.sort(todo, function(x, y) return x[2] < y[2] end)
  return self:_call(function(seq)
    for _, f in ipairs(todo) do
      local ok, m, c = self:_write(b.offset + f[2], pack(fields[f[1]], f[3]),
                                   ("bitmap[%d].%s"):format(index, f[1]), seq)
      if not ok then return nil, m, c end
    end
    if fields.name then
      return self:_write(b.offset + 24 + b.extra_data_size, fields.name, ("bitmap[%d].name"):format(index), seq)
    end
    return true
  end)
end

-- Raw bytes, journal, undo -------------------------------------------------

--- Raw bytes of the file (no structure).
function Editor:read(off, len)
  closed_check(self, "read")
  check_index(off, 1, "read")
  check_index(len, 2, "read")
  return self:_read(off, len, "bytes")
end

--- Overwrite raw bytes inside the file (journaled).
function Editor:write(off, data)
  closed_check(self, "write")
  check_index(off, 1, "write")
  if type(data) ~= "string" then argerr(2, "write", "string expected") end
  return self:_call(function(seq) return self:_write(off, data, "bytes", seq) end)
end

--- Every write made, oldest first: {seq=, op=, offset=, old=, new=}; the
-- writes of one editor call share `seq`.
function Editor:journal()
  closed_check(self, "journal")
  local out = {}
  for i, j in ipairs(self.log) do
    out[i] = { seq = j.seq, op = j.op, offset = j.offset, old = j.old, new = j.new }
  end
  return out
end

--- Put back the bytes of the last `n` calls (default 1), newest first, and
-- drop them from the journal. Returns the number of calls undone.
function Editor:undo(n)
  closed_check(self, "undo")
  if n == nil then n = 1 end
  check_index(n, 1, "undo")
  local ok, msg, code = self:_writable()
  if not ok then return nil, msg, code end
  local done = 0
  while done < n and #self.log > 0 do
    local seq = self.log[#self.log].seq
    while #self.log > 0 and self.log[#self.log].seq == seq do
      local j = table.remove(self.log)
      self.f:seek("set", j.offset)
      local wok, err = self.f:write(j.old)
      if wok then wok, err = self.f:flush() end
      if not wok then
        return nil, ("%s: undo at 0x%x failed: %s"):format(self.name, j.offset, tostring(err)), "io"
      end
    end
    done = done + 1
  end
  return done
end

function Editor:close()
  if self.f then self.f:close(); self.f = nil end
  return true
end
Editor.__close = Editor.close
Editor.__gc = Editor.close

E.flags = entry_codec.flags          -- entry codec: lua/qcow2/entry.lua
E.compressed = entry_codec.compressed

--- Open an editor. opts: `mode` "rw" (default; falls back to read-only
-- when the file is not writable) or "r"; `locks` (default true: probe
-- QEMU's locks before each write).
local function open(path, opts)
  if type(path) ~= "string" then argerr(1, "edit", "string expected") end
  if opts ~= nil and type(opts) ~= "table" then argerr(2, "edit", "table expected") end
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "mode" and k ~= "locks" then argerr(2, "edit", "unknown option '" .. tostring(k) .. "'") end
  end
  if opts.mode ~= nil and opts.mode ~= "r" and opts.mode ~= "rw" then
    argerr(2, "edit", "mode \"r\" or \"rw\" expected")
  end
  local f, read_only, msg, errno
  if opts.mode ~= "r" then f, msg, errno = io.open(path, "r+b") end
  if not f then
    f, msg, errno = io.open(path, "rb")
    read_only = true
  end
  if not f then
    return nil, msg, errno == 2 and "notfound" or "io"
  end
  f:setvbuf("no")     -- cache nothing: every read goes to the file
  return setmetatable({
    f = f, path = path, name = path, read_only = read_only,
    locks = opts.locks ~= false, log = {}, seq = 0,
  }, Editor)
end

E.Editor = Editor
return setmetatable(E, { __call = function(_, path, opts) return open(path, opts) end })
