--- lua-qcow2: read (and later write) QEMU qcow2 disk images.
--
-- Everything of the C module `qcow2.core` (open, probe, version), plus
-- what is better written in Lua: JSON output of maps and info tables
-- (with a kept JSON library, never a home-made encoder) and pretty
-- printing helpers. The C method tables are extended here, so
-- `img:map():to_json()` works on every map.
local core = require "qcow2.core"

local M = {}
for k, v in pairs(core) do M[k] = v end

-- JSON -----------------------------------------------------------------

-- lua-cjson is fast, but the Debian 2.1.0 build prints every number with
-- "%.14g", so offsets and sizes of 1e14 bytes and more come out as
-- 1.2345678901235e+17. dkjson prints Lua integers exactly. cjson is used
-- whenever it keeps the numbers in hand exact; dkjson otherwise.
-- dkjson (pure Lua) costs more to load than the C module itself: it is
-- loaded the first time it is needed (qcow2.measure in a fresh process,
-- say, never needs it).
local cjson_ok, cjson = pcall(require, "cjson")
local dkjson_state -- nil: not tried yet; false: not installed
local function dkjson()
  if dkjson_state == nil then
    local ok, mod = pcall(require, "dkjson")
    dkjson_state = ok and mod or false
  end
  return dkjson_state or nil
end

-- Largest integer cjson prints exactly (%.14g keeps 14 digits).
local CJSON_EXACT_MAX = 99999999999999

local cjson_exact = cjson_ok and
  cjson.encode({ (1 << 53) }) == "[9007199254740992]"

--- The JSON library in use for output that must be exact: dkjson unless
-- this lua-cjson prints large integers exactly.
-- (M.json, resolved on first use: see the module's __index below.)
local function json_library()
  if cjson_exact then return cjson end
  return dkjson() or (cjson_ok and cjson or nil)
end

-- Largest absolute integer in a value (tables walked), for choosing the
-- fast encoder when it is exact for the value at hand.
local function max_integer(value, seen)
  local t = type(value)
  if t == "number" then
    return math.type(value) == "integer" and math.abs(value) or math.huge
  elseif t ~= "table" then
    return 0
  end
  seen = seen or {}
  if seen[value] then return 0 end
  seen[value] = true
  local m = 0
  for k, v in pairs(value) do
    local a, b = max_integer(k, seen), max_integer(v, seen)
    if a > m then m = a end
    if b > m then m = b end
  end
  return m
end

-- An empty Lua table is ambiguous; the caller says which it is.
local function empty_array()
  if M.json == cjson and cjson.empty_array then return cjson.empty_array end
  return setmetatable({}, { __jsontype = "array" })
end

--- Encode a Lua value as JSON. `hint_max`, when known, is the largest
-- integer in the value (saves a walk over big maps).
function M.json_encode(value, hint_max)
  -- Reading images needs no JSON library; only JSON output does.
  if not cjson_ok and not dkjson() then error("qcow2: JSON output needs lua-cjson or dkjson", 2) end
  if not cjson_ok then return dkjson().encode(value) end
  if cjson_exact then return cjson.encode(value) end
  local biggest = hint_max or max_integer(value)
  if biggest <= CJSON_EXACT_MAX or not dkjson() then return cjson.encode(value) end
  return dkjson().encode(value)
end

-- ClusterMap in Lua ---------------------------------------------------------

local MapMethods = core.methods.ClusterMap

--- The records of `qemu-img map --output=json`, as Lua tables: present,
-- zero, data flags per extent type, offset where qemu-img prints one, then
-- adjacent records merged the way qemu-img merges them (same flags and
-- depth, host offsets contiguous or both absent).
--
-- qemu-img has no corrupt type. A corrupt extent (metadata that cannot be
-- followed) becomes a record of its own, never merged, that keeps the
-- array contiguous: present, zero and data false, plus `corrupt = true`
-- and the `reason`. An image without damage gives exactly qemu-img's
-- records. The record qemu-img prints for a 0-byte disk (length 0, every
-- flag false) comes from the one empty extent such a map holds.
function MapMethods:records()
  local out, last = {}, nil
  for e in self:extents() do
    local r = { start = e.start, length = e.length, depth = e.depth }
    local ty = e.type
    if ty == "data" then
      -- a hole of a file QEMU guesses metadata-preallocated: data and zero
      r.present, r.zero, r.data, r.offset = true, e.reads_zero == true, true, e.offset
    elseif ty == "compressed" then
      -- qemu-img 7.2 never prints a host offset for compressed clusters
      r.present, r.zero, r.data = true, false, true
    elseif ty == "zero" then
      r.present, r.zero, r.data, r.offset = true, true, false, e.offset
    elseif ty == "corrupt" then
      r.present, r.zero, r.data, r.corrupt, r.reason = false, false, false, true, e.reason
    else -- unallocated; the empty record of a 0-byte disk has no flag set
      r.present, r.zero, r.data, r.offset = false, e.length > 0, false, e.offset
    end
    if last and not last.corrupt and not r.corrupt
        and last.depth == r.depth and last.present == r.present
        and last.zero == r.zero and last.data == r.data
        and last.start + last.length == r.start
        and ((last.offset == nil and r.offset == nil)
             or (last.offset and r.offset
                 and last.offset + last.length == r.offset)) then
      last.length = last.length + r.length
    else
      out[#out + 1] = r
      last = r
    end
  end
  return out
end

-- MapMethods:to_json([file]) is C (csrc/lua/map_json.c): the same records
-- in qemu-img's layout, with no Lua table per extent.

-- Image in Lua ----------------------------------------------------------------

local ImageMethods = core.methods.Image

--- img:info() as the JSON text of `qemu-img info --output=json`.
function ImageMethods:info_json()
  local info, msg, code = self:info()
  if not info then return nil, msg, code end
  -- A bitmap without flags prints "flags": []; Debian's cjson 2.1.0 can
  -- only say {} for an empty table, dkjson honours __jsontype.
  local data = info["format-specific"] and info["format-specific"].data
  for _, b in ipairs(data and data.bitmaps or {}) do
    if next(b.flags) == nil and dkjson() then
      b.flags = setmetatable({}, { __jsontype = "array" })
      return dkjson().encode(info)
    end
  end
  return M.json_encode(info)
end

-- Pretty printing ---------------------------------------------------------------

local UNITS = { "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei" }

--- Bytes as qemu-img prints them: "0 B", "64 MiB", "1.5 GiB" (QEMU's
-- size_to_str: three significant digits, next unit from 1000 up).
function M.human_size(bytes)
  -- misuse raises, as in the C functions (README, "Errors")
  if math.type(bytes) ~= "integer" or bytes < 0 then
    error(("bad argument #1 to 'human_size' (non-negative integer expected, got %s)")
          :format(math.type(bytes) or type(bytes)), 2)
  end
  local unit = 0
  while unit < 6 and bytes >= 1000 * (1 << (10 * unit)) do unit = unit + 1 end
  local text = ("%0.3g"):format(bytes / (1 << (10 * unit)))
  return text .. " " .. UNITS[unit + 1] .. "B"
end

--- The header line of `qemu-img snapshot -l` (tostring(snapshot) is a row).
M.SNAPSHOT_LIST_HEADER = ("%-10s%-17s%8s%20s%13s%11s"):format(
  "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")

--- A table of snapshots as `qemu-img snapshot -l` prints it.
function M.snapshot_list(snapshots)
  local lines = { "Snapshot list:", M.SNAPSHOT_LIST_HEADER }
  for _, s in ipairs(snapshots) do lines[#lines + 1] = tostring(s) end
  return table.concat(lines, "\n")
end

M.empty_array = empty_array

-- Fields loaded on first use: the JSON library, and the test tooling
-- (API.md, "Test tooling": pure Lua, no engine validation), which is
-- most of what loading the module would otherwise cost.
local lazy = {
  json = json_library,
  edit = function() return require "qcow2.edit" end,
  mutate = function() return require("qcow2.mutate").mutate end,
}
setmetatable(M, { __index = function(t, k)
  local load = lazy[k]
  if not load then return nil end
  local v = load()
  rawset(t, k, v)
  return v
end })

-- CheckResult in Lua (check work) ---------------------------------------------

local CheckMethods = core.methods.CheckResult

-- qemu-img 7.2 prints the keys in the order of its QDict's hash buckets;
-- keys whose value is 0 are left out except check-errors, filename and
-- format.
local CHECK_JSON_KEYS = {
  { "image-end-offset", "image_end_offset" },
  { "compressed-clusters", "compressed_clusters" },
  { "total-clusters", "total_clusters" },
  { "corruptions", "corruptions" },
  { "corruptions-fixed", "corruptions_fixed" },
  { "check-errors", "check_errors", always = true },
  { "leaks", "leaks" },
  { "leaks-fixed", "leaks_fixed" },
  { "allocated-clusters", "allocated_clusters" },
  { "filename", "filename", always = true },
  { "format", "format", always = true },
  { "fragmented-clusters", "fragmented_clusters" },
}

--- The fields of `qemu-img check --output=json` as a Lua table.
function CheckMethods:records()
  local out = {}
  for _, k in ipairs(CHECK_JSON_KEYS) do
    local v = self[k[2]]
    if k.always or v ~= 0 then out[k[1]] = v end
  end
  return out
end

--- The text `qemu-img check --output=json` prints (without the final
-- newline): its key order and layout, values encoded by M.json_encode.
function CheckMethods:to_json()
  local lines = {}
  for _, k in ipairs(CHECK_JSON_KEYS) do
    local v = self[k[2]]
    if k.always or v ~= 0 then
      -- some encoders escape "/", qemu-img does not (same JSON value)
      local text = M.json_encode(v):gsub("\\/", "/")
      lines[#lines + 1] = "    " .. M.json_encode(k[1]) .. ": " .. text
    end
  end
  return "{\n" .. table.concat(lines, ",\n") .. "\n}"
end

return M
