--- qcow2 dump: the image's metadata as stored: header fields,
-- extensions, L1 and L2 tables, refcount table and blocks, snapshot table.
local qcow2 = require "qcow2"
local util = require "qcow2.cli.util"

-- Header fields in file order: name, byte offset, width (qcow2-format.md).
local HEADER = {
  { "magic", 0, 4 }, { "version", 4, 4 }, { "backing_file_offset", 8, 8 },
  { "backing_file_size", 16, 4 }, { "cluster_bits", 20, 4 }, { "size", 24, 8 },
  { "crypt_method", 32, 4 }, { "l1_size", 36, 4 }, { "l1_table_offset", 40, 8 },
  { "refcount_table_offset", 48, 8 }, { "refcount_table_clusters", 56, 4 },
  { "nb_snapshots", 60, 4 }, { "snapshots_offset", 64, 8 },
  -- version 3 (implied values on version 2)
  { "incompatible_features", 72, 8 }, { "compatible_features", 80, 8 },
  { "autoclear_features", 88, 8 }, { "refcount_order", 96, 4 },
  { "header_length", 100, 4 }, { "compression_type", 104, 1 },
}

local EXTENSIONS = {
  [0xe2792aca] = "backing_format", [0x6803f857] = "feature_names",
  [0x23852875] = "bitmaps", [0x0537be77] = "full_disk_encryption",
  [0x44415441] = "external_data_file",
}

local L1_OFFSET_MASK = 0x00fffffffffffe00
local COPIED, COMPRESSED = 1 << 63, 1 << 62

local function hex64(v) return ("0x%016x"):format(v) end
local function hexbytes(s) return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end)) end
local function array(t) if #t == 0 then return qcow2.empty_array() end return t end

-- Unsigned 64-bit compare on Lua's signed integers.
local function nonzero(v) return v ~= 0 end

local function ctx_of(img)
  local h = util.check(img:header())
  return { img = img, h = h, cluster_size = 1 << h.cluster_bits,
           extended = (h.incompatible_features & (1 << 4)) ~= 0 }
end

-- Sections: each returns a JSON-ready table and the lines of its text.

local function header(d)
  local h, lines, t = d.h, { "header:" }, {}
  for _, f in ipairs(HEADER) do
    local name = f[1]
    if h.version >= 3 or f[2] < 72 then
      t[name] = h[name]
      local v = h[name]
      local shown = (name:match("offset$") or name:match("features$") or name == "magic")
                    and ("0x%x"):format(v) or tostring(v)
      lines[#lines + 1] = ("  %-26s %s   (byte %d, %d bytes)"):format(name, shown, f[2], f[3])
    end
  end
  t.features = {}
  for _, kind in ipairs({ "incompatible", "compatible", "autoclear" }) do
    local names = h.features[kind] or {}
    t.features[kind] = array({ table.unpack(names) })
    lines[#lines + 1] = ("  %-26s %s"):format(kind .. " features",
      #names > 0 and table.concat(names, ", ") or "-")
  end
  return t, lines
end

local function extensions(d)
  local lines, list = { "header extensions:" }, {}
  for i, e in ipairs(d.h.extensions or {}) do
    local name = EXTENSIONS[e.magic] or "unknown"
    list[i] = { magic = e.magic, name = name, offset = e.offset, length = e.length,
                data = hexbytes(e.data) }
    local shown = (name == "backing_format" or name == "external_data_file")
                  and ("'%s'"):format(e.data)
                  or (#e.data > 32 and hexbytes(e.data:sub(1, 32)) .. "..." or hexbytes(e.data))
    lines[#lines + 1] = ("  0x%08x %-20s at %d, %d bytes: %s"):format(e.magic, name, e.offset,
                                                                    e.length, shown)
  end
  if #list == 0 then lines[#lines + 1] = "  (none)" end
  return array(list), lines
end

local function l1(d)
  local entries = util.check(d.img:l1())
  local lines = { ("L1 table at 0x%x, %d entries (non-zero shown):"):format(
    d.h.l1_table_offset, d.h.l1_size) }
  local list = {}
  for i, v in ipairs(entries) do
    if nonzero(v) then
      local e = { index = i - 1, raw = hex64(v), l2_offset = v & L1_OFFSET_MASK,
                  copied = (v & COPIED) ~= 0 }
      list[#list + 1] = e
      lines[#lines + 1] = ("  [%d] %s  L2 at 0x%x%s"):format(e.index, e.raw, e.l2_offset,
                                                           e.copied and "  copied" or "")
    end
  end
  return { offset = d.h.l1_table_offset, size = d.h.l1_size, entries = array(list) }, lines
end

-- One L2 entry decoded (qcow2-format.md, "Cluster mapping").
local function decode_l2(d, v)
  local cb = d.h.cluster_bits
  if (v & COMPRESSED) ~= 0 then
    local x = 62 - (cb - 8)
    local offset = v & ((1 << x) - 1)
    local sectors = ((v >> x) & ((1 << (cb - 8)) - 1)) + 1
    return { type = "compressed", offset = offset,
             compressed_size = sectors * 512 - (offset & 511) }
  end
  local e = { offset = v & L1_OFFSET_MASK, copied = (v & COPIED) ~= 0 }
  if (v & 1) ~= 0 then e.type = "zero"
  elseif e.offset ~= 0 then e.type = "data"
  else e.type = "unallocated" end
  if e.offset == 0 then e.offset = nil end
  return e
end

local function l2(d, index)
  local words = util.check(d.img:l2(index))
  local per = d.extended and 2 or 1
  local first_guest = index * (d.cluster_size // 8 // per) * d.cluster_size
  local lines = { ("L2 table %d (L1 index %d, guest 0x%x; non-zero entries shown):"):format(
    index, index, first_guest) }
  local list = {}
  for k = 0, #words // per - 1 do
    local v = words[k * per + 1]
    local bitmap = d.extended and words[k * per + 2] or 0
    if nonzero(v) or nonzero(bitmap) then
      local e = decode_l2(d, v)
      e.index, e.raw = k, hex64(v)
      e.guest_offset = first_guest + k * d.cluster_size
      if d.extended then e.bitmap = hex64(bitmap) end
      list[#list + 1] = e
      lines[#lines + 1] = ("  [%d] %s  guest 0x%x  %s%s%s%s"):format(k, e.raw, e.guest_offset,
        e.type, e.offset and (" at 0x%x"):format(e.offset) or "",
        e.compressed_size and (", %d bytes"):format(e.compressed_size) or "",
        (e.copied and "  copied" or "") .. (d.extended and "  bitmap " .. e.bitmap or ""))
    end
  end
  return { l1_index = index, entries = array(list) }, lines
end

-- The refcount table's raw entries, read from the file.
local function reftable_words(d)
  local n = d.h.refcount_table_clusters * d.cluster_size // 8
  local words, off = {}, d.h.refcount_table_offset
  local step = 1 << 20
  for at = 0, n * 8 - 1, step do
    local data = util.check(d.img:raw_read(off + at, math.min(step, n * 8 - at)))
    for i = 1, #data - 7, 8 do words[#words + 1] = string.unpack(">I8", data, i) end
    if #data < math.min(step, n * 8 - at) then break end
  end
  return words
end

local function refcount_table(d)
  local words = reftable_words(d)
  local lines = { ("refcount table at 0x%x, %d clusters (non-zero entries shown):"):format(
    d.h.refcount_table_offset, d.h.refcount_table_clusters) }
  local list = {}
  for i, v in ipairs(words) do
    if nonzero(v) then
      list[#list + 1] = { index = i - 1, raw = hex64(v), offset = v & L1_OFFSET_MASK }
      lines[#lines + 1] = ("  [%d] %s  block at 0x%x"):format(i - 1, hex64(v), v & L1_OFFSET_MASK)
    end
  end
  return { offset = d.h.refcount_table_offset, clusters = d.h.refcount_table_clusters,
           entries = array(list) }, lines
end

-- Refcount entry i (0-based) of a block's bytes, refcount_order bits wide
-- (sub-byte widths packed from the low bits, as QEMU packs them).
local function refcount_entry(block, order, i)
  local bits = 1 << order
  if bits < 8 then
    local byte = block:byte(i * bits // 8 + 1)
    return (byte >> ((i * bits) % 8)) & ((1 << bits) - 1)
  end
  local bytes = bits // 8
  local v = 0
  for k = 1, bytes do v = (v << 8) | block:byte(i * bytes + k) end
  return v
end

local function refcount_block(d, index, words)
  words = words or reftable_words(d)
  local entry = words[index + 1]
  if not entry then
    util.fail(("%s: refcount table index %d is outside the table (%d entries)")
              :format(d.img.path, index, #words))
  end
  local offset = entry & L1_OFFSET_MASK
  local lines = {}
  if offset == 0 then
    lines[1] = ("refcount block %d: not allocated"):format(index)
    return { index = index, offset = 0, refcounts = array({}) }, lines
  end
  local block = util.check(d.img:raw_read(offset, d.cluster_size))
  if #block < d.cluster_size then
    util.fail(("%s: refcount block %d at 0x%x is past the end of the file")
              :format(d.img.path, index, offset))
  end
  local order = d.h.refcount_order
  local per = d.cluster_size * 8 >> order
  lines[1] = ("refcount block %d at 0x%x, clusters %d..%d (non-zero shown):"):format(
    index, offset, index * per, (index + 1) * per - 1)
  local list = {}
  for i = 0, per - 1 do
    local v = refcount_entry(block, order, i)
    if v ~= 0 then
      list[#list + 1] = { cluster = index * per + i, refcount = v }
      lines[#lines + 1] = ("  cluster %d (0x%x): %d"):format(index * per + i,
        (index * per + i) * d.cluster_size, v)
    end
  end
  return { index = index, offset = offset, refcounts = array(list) }, lines
end

local SNAPSHOT_FIELDS = { "id", "name", "date", "date_nsec", "vm_clock", "vm_state_size",
                          "disk_size", "icount", "l1_table_offset", "l1_size" }

local function snapshots(d)
  local list = {}
  local lines = { ("snapshot table at 0x%x, %d entries:"):format(d.h.snapshots_offset,
                                                                d.h.nb_snapshots) }
  for i, s in ipairs(util.check(d.img:snapshots())) do
    local t = {}
    for _, f in ipairs(SNAPSHOT_FIELDS) do t[f] = s[f] end
    list[i] = t
    lines[#lines + 1] = ("  [%d] id %s name '%s' date %d.%09d vm_clock %d vm_state %d disk %d"
      .. " icount %s L1 at 0x%x (%d entries)"):format(i - 1, s.id, s.name, s.date,
      s.date_nsec or 0, s.vm_clock or 0, s.vm_state_size or 0, s.disk_size or 0,
      tostring(s.icount), s.l1_table_offset, s.l1_size)
  end
  return array(list), lines
end

local SECTIONS = { "--header", "--extensions", "--l1", "--l2", "--refcount-table",
                   "--refcount-block", "--snapshots" }

return {
  summary = "print header, extensions, L1/L2, refcount and snapshot tables",
  usage = [[
usage: qcow2 dump [--header] [--extensions] [--l1] [--l2 N] [--refcount-table]
                  [--refcount-block N] [--snapshots] [--all] [--json] IMG

Prints the image's metadata as stored in the file: header fields (with
their byte offsets), header extensions, the L1 table, L2 table N (by L1
index, from 0), the refcount table, refcount block N (by refcount table
index, from 0) and the snapshot table. Tables show their non-zero
entries, raw and decoded. Without a section option: --header. --all
gives every section, every allocated L2 table and refcount block.
--json prints one JSON object keyed by section. Read-only.]],
  options = {
    ["--header"] = {}, ["--extensions"] = {}, ["--l1"] = {},
    ["--l2"] = { arg = true, multi = true }, ["--refcount-table"] = {},
    ["--refcount-block"] = { arg = true, multi = true }, ["--snapshots"] = {},
    ["--all"] = {}, ["--json"] = {},
    ["-U"] = {}, ["--force-share"] = { alias = "-U" },
  },
  run = function(opts, args, ctx)
    if #args ~= 1 then util.usage("dump takes one image") end
    local function indexes(list, what)
      local out = {}
      for i, t in ipairs(list or {}) do
        local n = t:match("^%d+$") and math.tointeger(tonumber(t))
        if not n then util.usage(("invalid %s index '%s'"):format(what, t)) end
        out[i] = n
      end
      return out
    end
    local l2s = indexes(opts["--l2"], "L2")
    local blocks = indexes(opts["--refcount-block"], "refcount block")
    local any = false
    for _, s in ipairs(SECTIONS) do any = any or opts[s] ~= nil end
    local all = opts["--all"]
    if not any and not all then opts["--header"] = true end
    local img <close> = util.open(args[1], { key = opts.key, backing = false, allow_raw = false,
                                             force_share = opts["-U"] or nil })
    local d = ctx_of(img)
    local doc, text = {}, {}
    local function add(key, t, lines)
      doc[key] = t
      text[#text + 1] = table.concat(lines, "\n")
    end
    if all or opts["--header"] then add("header", header(d)) end
    if all or opts["--extensions"] then add("extensions", extensions(d)) end
    if all or opts["--l1"] then add("l1", l1(d)) end
    if all then
      l2s = {}
      for i, v in ipairs(util.check(img:l1())) do
        if (v & L1_OFFSET_MASK) ~= 0 then l2s[#l2s + 1] = i - 1 end
      end
    end
    if #l2s > 0 then
      local list, lines = {}, {}
      for _, n in ipairs(l2s) do
        local t, l = l2(d, n)
        list[#list + 1] = t
        lines[#lines + 1] = table.concat(l, "\n")
      end
      add("l2", list, lines)
    end
    local words
    if all or opts["--refcount-table"] then
      local t, lines = refcount_table(d)
      add("refcount_table", t, lines)
    end
    if all then
      words = reftable_words(d)
      blocks = {}
      for i, v in ipairs(words) do
        if (v & L1_OFFSET_MASK) ~= 0 then blocks[#blocks + 1] = i - 1 end
      end
    end
    if #blocks > 0 then
      words = words or reftable_words(d)
      local list, lines = {}, {}
      for _, n in ipairs(blocks) do
        local t, l = refcount_block(d, n, words)
        list[#list + 1] = t
        lines[#lines + 1] = table.concat(l, "\n")
      end
      add("refcount_blocks", list, lines)
    end
    if all or opts["--snapshots"] then add("snapshots", snapshots(d)) end
    if opts["--json"] then
      ctx.out:write(qcow2.json.encode(doc), "\n")
    else
      ctx.out:write(table.concat(text, "\n\n"), "\n")
    end
    return 0
  end,
}
