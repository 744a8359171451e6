--- qcow2.mutate(path, {seed =, count =, targets =}): seeded, structure-aware
-- mutations of an image file through qcow2.edit (API.md, "Test tooling").
--
-- Each mutation looks at the image as it is now (so the same seed on the
-- same bytes replays exactly), picks a target, a place inside it and a
-- value chosen to sit on the edge of a check: off-by-one cluster
-- alignment, past the end of the file, pointing at other metadata,
-- reserved bits, huge counts, refcounts 0/1/max, backing names with
-- protocols. The random stream is this module's own xorshift64*, never
-- math.random.
local edit = require "qcow2.edit"

local M = {}

M.TARGETS = { "header", "extensions", "l1", "l2", "refcount", "snapshot", "compressed" }
local KNOWN = {}
for _, t in ipairs(M.TARGETS) do KNOWN[t] = true end

local OFFSET_MASK = 0x00fffffffffffe00
local COPIED, COMPRESSED = 1 << 63, 1 << 62
local SURVEY_CAP = 4096       -- entries collected per list: bounded work

-- PRNG ------------------------------------------------------------------------

local Rng = {}
Rng.__index = Rng

--- xorshift64* seeded through splitmix64 (so seed 0 works).
function M.rng(seed)
  local z = seed + 0x9E3779B97F4A7C15
  z = (z ~ (z >> 30)) * 0xBF58476D1CE4E5B9
  z = (z ~ (z >> 27)) * 0x94D049BB133111EB
  z = z ~ (z >> 31)
  if z == 0 then z = 0x2545F4914F6CDD1D end
  return setmetatable({ s = z }, Rng)
end

function Rng:next()
  local x = self.s
  x = x ~ (x >> 12)
  x = x ~ (x << 25)
  x = x ~ (x >> 27)
  self.s = x
  return x * 0x2545F4914F6CDD1D
end

--- Integer in [lo, hi].
function Rng:int(lo, hi)
  if hi <= lo then return lo end
  return lo + ((self:next() >> 1) % (hi - lo + 1))
end

function Rng:pick(list) return list[self:int(1, #list)] end
function Rng:chance(n) return self:int(1, n) == 1 end

-- Survey: what the image holds now -----------------------------------------

local function survey(ed)
  local s = { size = ed:_size() }
  local h = ed:header()
  s.header = h
  if not h then return s end
  local g = ed:geometry()
  s.g = g
  if not g then return s end
  local cs = g.cluster_size
  s.cs = cs
  s.meta = { 0, h.l1_table_offset, h.refcount_table_offset }
  if h.snapshots_offset ~= 0 then s.meta[#s.meta + 1] = h.snapshots_offset end
  local rb = ed:reftable(0)
  if rb and rb ~= 0 then s.meta[#s.meta + 1] = rb & ~0x1ff end
  -- allocated L2 tables and their entries (bounded)
  s.l2_tables, s.entries, s.compressed = {}, {}, {}
  local l1_n = math.min(h.l1_size, SURVEY_CAP)
  local l1raw = l1_n > 0 and ed:_read(h.l1_table_offset, 8 * l1_n, "l1") or nil
  local per = 1 << g.l2_bits
  for i = 0, (l1raw and l1_n or 0) - 1 do
    local e = string.unpack(">i8", l1raw, 8 * i + 1) & OFFSET_MASK
    if e ~= 0 and #s.l2_tables < 64 then
      local t = ed:_read(e, cs, "l2")
      if t then
        s.l2_tables[#s.l2_tables + 1] = e
        for j = 0, per - 1 do
          if #s.entries >= SURVEY_CAP then break end
          local v = string.unpack(">i8", t, j * g.l2_entry_size + 1)
          if v ~= 0 then
            local guest = (i << (g.cluster_bits + g.l2_bits)) | (j << g.cluster_bits)
            s.entries[#s.entries + 1] = { guest = guest, value = v }
            if v & COMPRESSED ~= 0 then s.compressed[#s.compressed + 1] = s.entries[#s.entries] end
            local off = v & OFFSET_MASK
            if v & COMPRESSED == 0 and off ~= 0 and #s.meta < 16 then s.data = s.data or off end
          end
        end
      end
    end
  end
  for _, t in ipairs(s.l2_tables) do
    if #s.meta < 24 then s.meta[#s.meta + 1] = t end
  end
  s.exts = ed:extensions() or {}
  return s
end

-- Value pools ---------------------------------------------------------------

local function cluster_of(s) return s.cs or 65536 end

-- Offsets on the edges: misaligned by one, past EOF, into other metadata.
local function offset_value(r, s, cur)
  local cs = cluster_of(s)
  local eof = (s.size + cs - 1) // cs * cs
  local choices = {
    function() return cur + 1 end,
    function() return cur - 1 end,
    function() return cur + 512 end,
    function() return cur + cs // 2 end,
    function() return eof end,
    function() return eof + cs * r:int(1, 1000) end,
    function() return 1 << 55 end,
    function() return (1 << 56) - cs end,
    function() return 1 << 62 end,
    function() return 0 end,
    function() return s.meta and r:pick(s.meta) or 0 end,
    function() return s.meta and r:pick(s.meta) or cs end,
    function() return s.data or cs end,
  }
  return r:pick(choices)()
end

local function count_value(r, cur, max)
  local v = r:pick({ 0, 1, cur + 1, cur - 1, cur * 2, 0x7fffffff, 0xffffffff,
                     0x400001, 0x10001, 0x2000001, r:int(0, 0xffffffff) })
  v = v & 0xffffffff
  if max then v = v % (max + 1) end
  return v
end

-- A table entry value: an offset edge with a mix of flags and reserved bits.
local function entry_value(r, s, cur)
  local roll = r:int(1, 8)
  if roll == 1 then return 0 end
  if roll == 2 then return cur ~ COPIED end
  if roll == 3 then return cur | (1 << r:int(1, 8)) end          -- reserved low bits
  if roll == 4 then return cur | (1 << r:int(56, 61)) end        -- reserved high bits
  if roll == 5 then return cur | 1 end                            -- zero flag / bit 0
  local off = offset_value(r, s, cur & OFFSET_MASK)
  local v = off & ~(1 << 63)
  if r:chance(2) then v = v | COPIED end
  return v
end

-- Targets ---------------------------------------------------------------------

-- Names with protocols (never to be followed), then other odd names.
local PROTOCOL_NAMES = {
  "nbd://127.0.0.1:1/x", "json:{\"file.driver\":\"nbd\",\"file.host\":\"127.0.0.1\"}",
  "json:{\"driver\":\"raw\"}", "http://127.0.0.1:1/x",
}
local BACKING_NAMES = {
  "/etc/passwd", "../../../../etc/shadow", "", "base.qcow2",
  ("A"):rep(1023), "self.qcow2\0tail",
}

local V2_FIELDS = {
  "magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
  "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
  "refcount_table_clusters", "nb_snapshots", "snapshots_offset",
}
local V3_FIELDS = { "refcount_order", "header_length", "compression_type" }
local OFFSET_FIELDS = {
  backing_file_offset = true, l1_table_offset = true, refcount_table_offset = true,
  snapshots_offset = true,
}

local function field_size(list, name)
  for _, f in ipairs(list) do if f[1] == name then return f[3] end end
  return 8
end

local function header_value(r, s, name, cur)
  if OFFSET_FIELDS[name] then return offset_value(r, s, cur) end
  local cs = cluster_of(s)
  local pools = {
    magic = { cur ~ (1 << r:int(0, 31)), 0, 0x514649fc },
    version = { 0, 1, 2, 3, 4, 0xffffffff },
    backing_file_size = { 0, 1023, 1024, 0xffffffff, cur + 1, cs },
    cluster_bits = { 0, 8, 9, 12, 16, 21, 22, 31, 63, cur + 1, cur - 1 },
    size = { 0, 1, cur + 1, cur - 512, math.maxinteger, 1 << 62, -1, 1 << 55, cur * 1024 },
    crypt_method = { 1, 2, 3, 0xffffffff },
    refcount_order = { 0, 3, 5, 6, 7, 31, cur + 1 },
    header_length = { 0, 8, 71, 72, 103, 104, 105, 112, 113, cs, 0xffffffff, cur + 8 },
    compression_type = { 1, 2, 255 },
  }
  local p = pools[name]
  local v
  if p then v = r:pick(p) else v = count_value(r, cur) end
  local size = field_size(edit.HEADER_FIELDS, name)
  if size < 8 then v = v & ((1 << (8 * size)) - 1) end
  return v
end

local T = {}

function T.header(ed, r, s)
  local h = s.header
  if not h then return nil end
  local roll = r:int(1, 10)
  if roll == 1 then
    local name = r:chance(2) and r:pick(PROTOCOL_NAMES) or r:pick(BACKING_NAMES)
    local old = h.backing_file or ""
    if ed:set_backing_name(name) then
      return { where = "header.backing_file", old = old, new = name }
    end
    return nil
  elseif roll == 2 or roll == 3 then
    local kind = r:pick({ "incompatible", "compatible", "autoclear" })
    local bit = r:chance(2) and r:int(0, 4) or r:int(0, 63)
    local field = kind .. "_features"
    local old = h[field] or 0
    local on = old & (1 << bit) == 0
    if not ed:set_feature(kind, bit, on) then return nil end
    return { where = ("header.%s bit %d"):format(field, bit), old = old,
             new = on and (old | (1 << bit)) or (old & ~(1 << bit)) }
  end
  local fields = {}
  for _, f in ipairs(V2_FIELDS) do fields[#fields + 1] = f end
  if h.version >= 3 then
    for _, f in ipairs(V3_FIELDS) do if h[f] then fields[#fields + 1] = f end end
  end
  local name = r:pick(fields)
  local old = h[name]
  local new = header_value(r, s, name, old)
  if not ed:set_header({ [name] = new }) then return nil end
  return { where = "header." .. name, old = old, new = new }
end

local EXT_MAGICS = { 0xe2792aca, 0x6803f857, 0x23852875, 0x0537be77, 0x44415441, 0x12345678 }

local function ext_payload(r, s, magic)
  local cs = cluster_of(s)
  if magic == 0xe2792aca then return r:pick({ "raw", "nbd", "json", "qcow2", "vmdk", "" }) end
  if magic == 0x44415441 then return r:pick({ "nbd://127.0.0.1:1/x", "json:{}", "/etc/passwd", "data.raw" }) end
  if magic == 0x23852875 then
    return string.pack(">I4I4i8i8", r:pick({ 0, 1, 65536, 0xffffffff }), r:pick({ 0, 1 }),
      r:pick({ 0, 24, 1024 * 65535 + 1, -1 }), offset_value(r, s, cs))
  end
  if magic == 0x0537be77 then
    return string.pack(">i8i8", offset_value(r, s, cs), r:pick({ 0, 1, cs, -1 }))
  end
  if magic == 0x6803f857 then
    return string.pack(">BB", r:int(0, 3), r:int(0, 63)) .. ("x"):rep(46)
  end
  local n = r:int(0, 40)
  local t = {}
  for i = 1, n do t[i] = string.char(r:int(0, 255)) end
  return table.concat(t)
end

function T.extensions(ed, r, s)
  local exts = s.exts or {}
  local roll = r:int(1, 4)
  if #exts > 0 and roll == 1 then
    local e = r:pick(exts)
    local n = r:pick({ 0, e.length + 1, e.length - 1, e.length + 8, cluster_of(s), 0xffffffff, 7 })
    n = n & 0xffffffff
    if not ed:set_extension_length(e.magic, n) then return nil end
    return { where = ("extension 0x%08x length"):format(e.magic), old = e.length, new = n }
  elseif #exts > 0 and roll == 2 then
    local e = r:pick(exts)
    if not ed:del_extension(e.magic) then return nil end
    return { where = ("extension 0x%08x"):format(e.magic), old = e.data, new = "deleted" }
  elseif #exts > 0 and roll == 3 then
    local e = r:pick(exts)
    if #e.data == 0 then return nil end
    local data = ext_payload(r, s, e.magic)
    data = (data .. ("\0"):rep(#e.data)):sub(1, #e.data)
    if not ed:set_extension_data(e.magic, data) then return nil end
    return { where = ("extension 0x%08x data"):format(e.magic), old = e.data, new = data }
  end
  local magic = r:pick(EXT_MAGICS)
  if #exts > 0 and r:chance(4) then magic = r:pick(exts).magic end   -- a duplicate
  local data = ext_payload(r, s, magic)
  if not ed:add_extension(magic, data) then return nil end
  return { where = ("extension 0x%08x"):format(magic), old = "absent", new = data }
end

function T.l1(ed, r, s)
  local h = s.header
  if not (h and s.g and h.l1_size > 0) then return nil end
  local i = r:int(0, math.min(h.l1_size, SURVEY_CAP) - 1)
  local old = ed:l1(i)
  if not old then return nil end
  local new = entry_value(r, s, old)
  if not ed:l1(i, new) then return nil end
  return { where = ("l1[%d]"):format(i), old = old, new = new }
end

function T.l2(ed, r, s)
  if not (s.entries and #s.entries > 0) then return nil end
  local e = r:pick(s.entries)
  local old = ed:l2(e.guest)
  if not old then return nil end
  if s.g.extended_l2 and r:chance(3) then
    local ob = ed:l2_bitmap(e.guest)
    if not ob then return nil end
    local nb = r:pick({ -1, ob | (ob << 32), 1, ob ~ (1 << r:int(0, 63)),
                        0xffffffff00000000 })
    if not ed:l2_bitmap(e.guest, nb) then return nil end
    return { where = ("l2 bitmap[guest 0x%x]"):format(e.guest), old = ob, new = nb }
  end
  local new = entry_value(r, s, old)
  if not ed:l2(e.guest, new) then return nil end
  return { where = ("l2[guest 0x%x]"):format(e.guest), old = old, new = new }
end

function T.refcount(ed, r, s)
  if not s.g then return nil end
  local cs = s.cs
  local h = s.header
  if r:chance(4) then
    local n = math.min(h.refcount_table_clusters * cs // 8, SURVEY_CAP)
    if n <= 0 then return nil end
    local i = r:chance(2) and 0 or r:int(0, n - 1)
    local old = ed:reftable(i)
    if not old then return nil end
    local new = offset_value(r, s, old)
    if not ed:reftable(i, new) then return nil end
    return { where = ("reftable[%d]"):format(i), old = old, new = new }
  end
  local order = s.g.refcount_order
  if order > 6 then return nil end
  local bits = 1 << order
  local max = bits == 64 and -1 or (1 << bits) - 1
  local c = r:int(0, s.size // cs + 1)
  local old = ed:refcount(c)
  if not old then return nil end
  local new = r:pick({ 0, 1, max, old + 1, old - 1, 2 })
  if bits < 64 then new = new & max end
  if not ed:refcount(c, new) then return nil end
  return { where = ("refcount[%d]"):format(c), old = old, new = new }
end

local SNAP_FIELDS = {
  "l1_table_offset", "l1_size", "id_str_size", "name_size", "date_nsec", "vm_state_size",
  "extra_data_size", "disk_size", "vm_state_size_large", "l1",
}

function T.snapshot(ed, r, s)
  local h = s.header
  if not (h and s.g and h.nb_snapshots > 0) then return nil end
  local i = r:int(0, math.min(h.nb_snapshots, 64) - 1)
  local sn = ed:snapshot(i)
  if not sn then return nil end
  local field = r:pick(SNAP_FIELDS)
  if field == "l1" then
    if sn.l1_size == 0 then return nil end
    local j = r:int(0, math.min(sn.l1_size, SURVEY_CAP) - 1)
    local old = ed:snapshot_l1(i, j)
    if not old then return nil end
    local new = entry_value(r, s, old)
    if not ed:snapshot_l1(i, j, new) then return nil end
    return { where = ("snapshot[%d].l1[%d]"):format(i, j), old = old, new = new }
  end
  if sn[field] == nil then return nil end
  local old, new = sn[field]
  if field == "l1_table_offset" then
    new = offset_value(r, s, old)
  elseif field == "id_str_size" or field == "name_size" then
    new = r:pick({ 0, 0xffff, old + 1, old + 8 })
  elseif field == "extra_data_size" then
    new = r:pick({ 0, 8, 16, 23, 25, 0xffffffff, 1024 * 1025 })
  elseif field == "date_nsec" then
    new = r:pick({ 1000000000, 0xffffffff })
  elseif field == "disk_size" or field == "vm_state_size_large" then
    new = r:pick({ 0, -1, math.maxinteger, old + 1, 1 << 55 })
  else
    new = count_value(r, old)
  end
  local size = field_size(edit.SNAPSHOT_FIELDS, field)
  if size < 8 then new = new & ((1 << (8 * size)) - 1) end
  if not ed:snapshot(i, { [field] = new }) then return nil end
  return { where = ("snapshot[%d].%s"):format(i, field), old = old, new = new }
end

function T.compressed(ed, r, s)
  if not s.g then return nil end
  local cb = s.g.cluster_bits
  if cb > 21 then return nil end
  local e
  if s.compressed and #s.compressed > 0 then
    e = r:pick(s.compressed)
  elseif s.entries and #s.entries > 0 then
    e = r:pick(s.entries)     -- turn a data cluster into a compressed one
  else
    return nil
  end
  local old = ed:l2(e.guest)
  if not old then return nil end
  local d = edit.compressed(old, cb)
  local maxs = (1 << (cb - 8))
  local roll = r:int(1, 6)
  local new
  if roll == 1 then
    new = edit.compressed({ offset = d.offset, sectors = r:pick({ 1, maxs, math.min(d.sectors + 1, maxs) }) }, cb)
  elseif roll == 2 then
    local off = offset_value(r, s, d.offset) & ((1 << (70 - cb)) - 1)
    new = edit.compressed({ offset = off, sectors = d.sectors }, cb)
  elseif roll == 3 then
    new = old | COPIED
  elseif roll == 4 then
    new = old ~ COMPRESSED
  elseif roll == 5 and s.g.extended_l2 then
    local ob = ed:l2_bitmap(e.guest)
    if not ob then return nil end
    if not ed:l2_bitmap(e.guest, 1) then return nil end
    return { where = ("l2 bitmap[guest 0x%x] (compressed)"):format(e.guest), old = ob, new = 1 }
  else
    new = edit.compressed({ offset = (old & OFFSET_MASK) + r:int(0, 511), sectors = r:int(1, maxs) }, cb)
  end
  if not ed:l2(e.guest, new) then return nil end
  return { where = ("l2[guest 0x%x] compressed"):format(e.guest), old = old, new = new }
end

-- Driver ----------------------------------------------------------------------

--- Apply `opts.count` mutations to the file at `path`. Returns the array of
-- {target=, where=, old=, new=} applied (fewer than count only when no
-- target could be applied at all), or nil, msg, code when the file cannot
-- be edited.
function M.mutate(path, opts)
  if type(path) ~= "string" then error("bad argument #1 to 'mutate' (string expected)", 2) end
  if type(opts) ~= "table" then error("bad argument #2 to 'mutate' (table expected)", 2) end
  for k in pairs(opts) do
    if k ~= "seed" and k ~= "count" and k ~= "targets" then
      error("bad argument #2 to 'mutate' (unknown option '" .. tostring(k) .. "')", 2)
    end
  end
  local seed, count = opts.seed or 0, opts.count or 1
  if math.type(seed) ~= "integer" then error("bad argument #2 to 'mutate' (seed: integer expected)", 2) end
  if math.type(count) ~= "integer" or count < 0 then
    error("bad argument #2 to 'mutate' (count: non-negative integer expected)", 2)
  end
  local targets = opts.targets or M.TARGETS
  if type(targets) ~= "table" or #targets == 0 then
    error("bad argument #2 to 'mutate' (targets: non-empty array expected)", 2)
  end
  for _, t in ipairs(targets) do
    if not KNOWN[t] then error("bad argument #2 to 'mutate' (unknown target '" .. tostring(t) .. "')", 2) end
  end
  local ed, msg, code = edit(path)
  if not ed then return nil, msg, code end
  local ok, m2, c2 = ed:_writable()      -- one lock probe for the batch
  if not ok then ed:close(); return nil, m2, c2 end
  ed.locks = false
  local r = M.rng(seed)
  local out = {}
  for _ = 1, count do
    local s = survey(ed)
    for _ = 1, 16 do
      local target = r:pick(targets)
      local rec = T[target](ed, r, s)
      if rec and rec.old == rec.new then
        ed:undo(1)        -- a value that changed nothing is no mutation
        rec = nil
      end
      if rec then
        rec.target = target
        out[#out + 1] = rec
        break
      end
    end
  end
  ed:close()
  return out
end

return M
