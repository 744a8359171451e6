--- Shared pieces of the `qcow2` tool's subcommands: failures with exit
-- statuses, getopt-like option parsing, image opening, qemu-img's size
-- syntax, printf-style hex, and a progress line for long work.
local qcow2 = require "qcow2"

local M = {}

-- A failure carried up to main: the message is one line.
local Failure = {}
M.Failure = Failure

--- Stop the subcommand with a one-line message and an exit status
-- (1 by default: the outside world; 2: usage).
function M.fail(msg, status)
  error(setmetatable({ msg = msg, status = status or 1 }, Failure), 0)
end

function M.usage(msg) M.fail(msg .. " (try 'qcow2 --help')", 2) end

--- nil, msg, code from the library -> a failure; otherwise the values.
function M.check(value, msg, ...)
  if value == nil then M.fail(tostring(msg)) end
  return value, msg, ...
end

--- Open an image for a subcommand; opts as qcow2.open's (mode "r" by
-- default: nothing is written unless the subcommand writes).
function M.open(path, opts)
  opts = opts or {}
  if opts.allow_raw == nil then opts.allow_raw = true end
  local img, msg, code = qcow2.open(path, opts)
  -- An encrypted image and no --key-file: ask on the terminal, echo off
  -- (never from the command line, where ps and the history would show it).
  if img == nil and code == "key" and opts.key == nil then
    local key = M.ask_passphrase(path)
    if key then
      opts.key = key
      img, msg, code = qcow2.open(path, opts)
    end
  end
  return M.check(img, msg, code)
end

--- The passphrase typed on the controlling terminal with echo off, or nil
-- when standard input is not a terminal (scripts use --key-file).
function M.ask_passphrase(path)
  if os.execute("test -t 0") ~= true then return nil end
  local tty = io.open("/dev/tty", "r+")
  if not tty then return nil end
  tty:write(("Passphrase for %s: "):format(path))
  tty:flush()
  os.execute("stty -echo < /dev/tty 2>/dev/null")
  local ok, line = pcall(tty.read, tty, "l")
  os.execute("stty echo < /dev/tty 2>/dev/null")
  tty:write("\n")
  tty:close()
  return ok and line or nil
end

--- The passphrase in a key file: its bytes, one trailing newline (as
-- `echo pass > f` leaves) dropped.
function M.read_key_file(path)
  local f, msg = io.open(path, "rb")
  if not f then M.fail(("cannot read the key file: %s"):format(msg)) end
  local key = f:read("a")
  f:close()
  return (key:gsub("\r?\n$", ""))
end

--- A snapshot's read-only view of img (by id or name), or a failure.
function M.snapshot_view(img, name)
  local s = M.check(img:snapshot(name) or nil,
                    ("%s: snapshot '%s' not found"):format(img.path, name))
  return M.check(s:open())
end

--- A to-be-closed list of handles: open(h) keeps h and returns it; they
-- are closed in reverse order (views before the images they borrow from)
-- when the variable goes out of scope.
function M.handles()
  local list = {}
  return setmetatable(list, {
    __call = function(_, h) list[#list + 1] = h return h end,
    __close = function()
      for i = #list, 1, -1 do list[i]:close() end
    end,
  })
end

-- Options ---------------------------------------------------------------

--- Parse args against spec, getopt_long style: options anywhere, "--"
-- ends them, "--name=value" and "--name value", "-xVALUE" and "-x VALUE".
-- spec[name] = { arg = true, choices = {...}, multi = true, alias = name }.
-- Returns the options (by name, without aliases) and the positionals.
function M.parse(args, spec)
  local opts, rest = {}, {}
  local i = 1
  local function set(name, value)
    local s = spec[name]
    local key = s.alias or name
    if s.choices then
      local ok = false
      for _, c in ipairs(s.choices) do ok = ok or c == value end
      if not ok then
        M.usage(("invalid value '%s' for %s (one of: %s)")
                :format(value, name, table.concat(s.choices, ", ")))
      end
    end
    if s.multi then
      opts[key] = opts[key] or {}
      table.insert(opts[key], value)
    else
      opts[key] = value
    end
  end
  -- the next argument, the value of option `name` given apart from it
  local function next_value(name)
    i = i + 1
    if not args[i] then M.usage(("option '%s' needs a value"):format(name)) end
    return args[i]
  end
  while i <= #args do
    local a = args[i]
    if a == "--" then
      for j = i + 1, #args do rest[#rest + 1] = args[j] end
      break
    elseif a:sub(1, 2) == "--" then
      local name, value = a:match("^(%-%-[^=]+)=(.*)$")
      name = name or a
      local s = spec[name]
      if not s then M.usage(("unknown option '%s'"):format(name)) end
      if s.arg then
        set(name, value or next_value(name))
      else
        if value then M.usage(("option '%s' takes no value"):format(name)) end
        set(name, true)
      end
    elseif a:sub(1, 1) == "-" and #a > 1 then
      -- a cluster of short flags ("-lq"), the last one may take a value
      local j = 2
      while j <= #a do
        local name = "-" .. a:sub(j, j)
        local s = spec[name]
        if not s then M.usage(("unknown option '%s'"):format(name)) end
        if s.arg then
          local value = a:sub(j + 1)
          set(name, value ~= "" and value or next_value(name))
          break
        end
        set(name, true)
        j = j + 1
      end
    else
      rest[#rest + 1] = a
    end
    i = i + 1
  end
  return opts, rest
end

--- "json" or "human" from --output=FMT or --json.
function M.output_format(opts)
  if opts["--json"] then return "json" end
  return opts["--output"] or "human"
end

-- qemu-img's JSON and QDict order ------------------------------------------

-- QEMU's QDict hash (qobject/qdict.c tdb_hash), 32-bit unsigned. qemu-img
-- walks a QDict bucket by bucket (512 buckets) when it prints one, as
-- JSON or as info's format-specific lines, so this hash fixes the order.
local function tdb_hash(name)
  local value = (0x238F13AF * #name) & 0xffffffff
  for i = 1, #name do
    value = (value + (name:byte(i) << (((i - 1) * 5) % 24))) & 0xffffffff
  end
  return (1103515243 * value + 12345) & 0xffffffff
end

-- Insertion order of QEMU's QAPI visitors (qapi/block-core.json); it only
-- matters for keys sharing a bucket, where the last inserted comes first.
local QAPI_ORDER = {}
for i, k in ipairs({
  -- ImageInfo
  "filename", "format", "dirty-flag", "actual-size", "virtual-size",
  "cluster-size", "encrypted", "compressed", "backing-filename",
  "full-backing-filename", "backing-filename-format", "snapshots",
  "backing-image", "format-specific", "type", "data",
  -- SnapshotInfo
  "id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec",
  "vm-clock-nsec", "icount",
  -- ImageInfoSpecificQCow2, its encrypt and bitmaps
  "compat", "data-file", "data-file-raw", "extended-l2", "lazy-refcounts",
  "corrupt", "refcount-bits", "encrypt", "bitmaps", "compression-type",
  "cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg",
  "payload-offset", "master-key-iters", "uuid", "slots", "granularity",
  "flags",
}) do QAPI_ORDER[k] = QAPI_ORDER[k] or i end

--- The keys of t in the order QEMU prints a QDict holding them.
function M.qdict_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    local ha, hb = tdb_hash(a) % 512, tdb_hash(b) % 512
    if ha ~= hb then return ha < hb end
    local oa, ob = QAPI_ORDER[a] or math.huge, QAPI_ORDER[b] or math.huge
    if oa ~= ob then return oa > ob end
    return a > b
  end)
  return keys
end

--- A table printed as a JSON array (empty tables are arrays: the only
-- empty ones qemu-img prints are lists).
function M.is_list(v)
  return type(v) == "table" and (#v > 0 or next(v) == nil)
end

local ESCAPE = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b",
                 ["\f"] = "\\f", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }

-- qobject/qjson.c's string quoting: control bytes as \u00XX, non-ASCII
-- UTF-8 sequences as \uXXXX (surrogate pairs above U+FFFF).
local function quote(s)
  local body = s:gsub('[%c"\\]', function(c)
    return ESCAPE[c] or ("\\u%04X"):format(c:byte())
  end)
  body = body:gsub("[\xc0-\xf7][\x80-\xbf]*", function(seq)
    local ok, cp = pcall(utf8.codepoint, seq)
    if not ok then return seq end
    if cp < 0x10000 then return ("\\u%04X"):format(cp) end
    cp = cp - 0x10000
    return ("\\u%04X\\u%04X"):format(0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3ff))
  end)
  return '"' .. body .. '"'
end

local function to_json(v, indent, acc)
  local t = type(v)
  if t == "table" then
    local nl = "\n" .. ("    "):rep(indent + 1)
    if M.is_list(v) then
      acc[#acc + 1] = "["
      for i, item in ipairs(v) do
        acc[#acc + 1] = (i > 1 and "," or "") .. nl
        to_json(item, indent + 1, acc)
      end
      acc[#acc + 1] = "\n" .. ("    "):rep(indent) .. "]"
    else
      acc[#acc + 1] = "{"
      for i, k in ipairs(M.qdict_keys(v)) do
        acc[#acc + 1] = (i > 1 and "," or "") .. nl .. quote(k) .. ": "
        to_json(v[k], indent + 1, acc)
      end
      acc[#acc + 1] = "\n" .. ("    "):rep(indent) .. "}"
    end
  elseif t == "string" then
    acc[#acc + 1] = quote(v)
  elseif t == "number" and math.type(v) == "integer" then
    acc[#acc + 1] = ("%d"):format(v)
  else
    acc[#acc + 1] = tostring(v)
  end
end

--- v as QEMU's pretty JSON (qobject_to_json_pretty): 4-space indents,
-- objects in QDict order. Used for info; map and check have their own
-- layouts in the library (m:to_json(), r:to_json()).
function M.qemu_json(v)
  local acc = {}
  to_json(v, 0, acc)
  return table.concat(acc)
end

-- dkjson marks empty arrays (lua-cjson 2.1.0 cannot).
local dkjson_ok, dkjson = pcall(require, "dkjson")
local EMPTY_ARRAY = setmetatable({}, { __jsontype = "array" })

--- v as compact JSON, integers exact. Every empty table is printed as
-- an array (the reports' empty values are lists): dkjson marks them so;
-- without it, the library's encoder (lua-cjson prints them as {}).
function M.json(v)
  if not dkjson_ok then return qcow2.json_encode(v) end
  local function copy(x)
    if type(x) ~= "table" then return x end
    if next(x) == nil then return EMPTY_ARRAY end
    local t = {}
    for k, item in pairs(x) do t[k] = copy(item) end
    return t
  end
  return dkjson.encode(copy(v))
end

-- Sizes -------------------------------------------------------------------

local SUFFIX = { [""] = 1, b = 1, k = 1 << 10, m = 1 << 20, g = 1 << 30,
                 t = 1 << 40, p = 1 << 50, e = 1 << 60 }

--- A byte count in qemu-img's syntax (qemu_strtosz): decimal with an
-- optional fraction and a suffix among b k M G T P E (powers of 1024),
-- or 0x hex. nil when the text is not one.
function M.size(text)
  if text:match("^0[xX]%x+$") then
    return math.tointeger(tonumber(text:sub(3), 16))
  end
  local int, frac, suffix = text:match("^(%d+)(%.?%d*)([bBkKmMgGtTpPeE]?)$")
  if not int then return nil end
  local mul = SUFFIX[suffix:lower()]
  local n = math.tointeger(tonumber(int))
  if not n or n > math.maxinteger // mul then return nil end
  n = n * mul
  if frac ~= "" and frac ~= "." then
    if mul == 1 then return nil end      -- qemu: fractions need a unit
    local extra = math.floor(tonumber("0" .. frac) * mul)
    if n > math.maxinteger - extra then return nil end
    n = n + extra
  end
  return n
end

--- M.size or a usage failure naming what the number is.
function M.parse_size(text, what)
  local n = M.size(text)
  if not n then M.usage(("invalid %s '%s'"):format(what, text)) end
  return n
end

--- printf's "%#x": 0 has no 0x prefix.
function M.hex(n) return n == 0 and "0" or ("0x%x"):format(n) end

-- Progress ----------------------------------------------------------------

--- A progress reporter for long work: after QCOW2_PROGRESS_DELAY seconds
-- (default 1) it keeps one line on stderr up to date, but only when
-- stderr is a terminal (checked once, by the shell's `test -t 2`) and
-- ctx.err is the process's stderr. Returns update(done) and finish().
local function noop() end

-- Whether progress may be drawn: ctx.err is the process's stderr and a
-- terminal (asked once per run, by the shell: no new dependency).
local function on_tty(ctx)
  if ctx.err ~= io.stderr then return false end
  if ctx.tty == nil then ctx.tty = os.execute("test -t 2") == true end
  return ctx.tty
end

function M.progress(ctx, label, total)
  if total <= 0 or not on_tty(ctx) then return noop, noop end
  local delay = tonumber(os.getenv("QCOW2_PROGRESS_DELAY") or "") or 1
  -- wall time in whole seconds, CPU time finer: either passing the delay
  local t0, c0, last, shown = os.time(), os.clock(), -1, false
  local function update(done)
    local c = os.clock()
    if not shown and os.time() - t0 <= delay and c - c0 < delay then return end
    if shown and c - last < 0.2 and done < total then return end
    last, shown = c, true
    ctx.err:write(("\r%s: %5.1f%% (%s of %s)\27[K"):format(label,
      100 * done / total, qcow2.human_size(done), qcow2.human_size(total)))
    ctx.err:flush()
  end
  local function finish()
    if shown then ctx.err:write("\r\27[K") ctx.err:flush() end
  end
  return update, finish
end

--- The forensic listings (owners, residue): the image at path opened
-- read-only (-U honoured), img[method](img) run under a status line;
-- returns the open image (the caller closes it) and the list.
function M.open_listing(ctx, opts, path, doing, method)
  local img = M.open(path, { force_share = opts["-U"] or nil, allow_raw = false })
  local finish = M.status(ctx, path .. ": " .. doing .. " ...")
  local list, msg = img[method](img)
  finish()
  if list == nil then
    img:close()
    M.fail(tostring(msg))
  end
  return img, list
end

--- A status line on a terminal's stderr for work that reports no
-- progress (one library call): shown at once, cleared by the returned
-- function.
function M.status(ctx, text)
  if not on_tty(ctx) then return noop end
  ctx.err:write("\r", text, "\27[K")
  ctx.err:flush()
  return function() ctx.err:write("\r\27[K") ctx.err:flush() end
end

return M
