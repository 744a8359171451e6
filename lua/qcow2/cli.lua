--- The `qcow2` command-line tool: a small, read-only qemu-img look-alike.
--
--   qcow2 info [--json] IMG
--   qcow2 map [--json] IMG
--   qcow2 snapshot -l IMG
--   qcow2 read IMG OFFSET LENGTH
--   qcow2 digest IMG [ALGO]
--
-- main(args [, out, err]) returns the exit status (0 ok, 1 failure, 2
-- usage); the `qcow2` script passes it to os.exit.
local qcow2 = require "qcow2"

local M = {}

local USAGE = [[
usage: qcow2 COMMAND [ARGS]

  info [--json] IMG          image information, as qemu-img info
  map [--json] IMG           guest extents, as qemu-img map
  snapshot -l IMG            list internal snapshots
  read IMG OFFSET LENGTH     write guest bytes to stdout
  digest IMG [ALGO]          hex digest of the guest disk (default sha256)
  --help                     this text

OFFSET and LENGTH take a K, M, G or T suffix (powers of 1024) or 0x hex.
Images are opened read-only; files without the qcow2 magic open as raw.]]

-- A failure carried up to main: message already one line.
local Failure = {}

local function fail(msg, status)
  error(setmetatable({ msg = msg, status = status or 1 }, Failure), 0)
end

local function usage(msg) fail(msg .. " (try 'qcow2 --help')", 2) end

-- nil, msg, code from the library -> a failure; otherwise the values.
local function check(value, msg, ...)
  if value == nil then fail(msg) end
  return value, msg, ...
end

local function open(path)
  return check(qcow2.open(path, { allow_raw = true }))
end

local SUFFIX = { [""] = 1, k = 1 << 10, m = 1 << 20, g = 1 << 30, t = 1 << 40 }

local function parse_size(text, what)
  local n
  if text:match("^0[xX]%x+$") then
    n = math.tointeger(tonumber(text:sub(3), 16))
  else
    local digits, suffix = text:match("^(%d+)([kKmMgGtT]?)$")
    if digits then
      n = math.tointeger(tonumber(digits))
      local mul = SUFFIX[suffix:lower()]
      if n and n > math.maxinteger // mul then n = nil end
      n = n and n * mul
    end
  end
  if not n then usage(("invalid %s '%s'"):format(what, text)) end
  return n
end

-- Split "--json" (and other flags) from positional arguments.
local function parse(args, known)
  local flags, rest = {}, {}
  for _, a in ipairs(args) do
    if a:sub(1, 1) == "-" and #a > 1 then
      if not known[a] then usage(("unknown option '%s'"):format(a)) end
      flags[a] = true
    else
      rest[#rest + 1] = a
    end
  end
  return flags, rest
end

local function yes_no(b) return b and "true" or "false" end

-- qemu-img info's text output (QEMU 7.2).
local function info_text(img, info)
  local lines = {
    "image: " .. info.filename,
    "file format: " .. info.format,
    ("virtual size: %s (%d bytes)"):format(
      qcow2.human_size(info["virtual-size"]), info["virtual-size"]),
    "disk size: " .. (info["actual-size"]
                      and qcow2.human_size(info["actual-size"]) or "unavailable"),
  }
  if info["cluster-size"] then
    lines[#lines + 1] = "cluster_size: " .. info["cluster-size"]
  end
  if info["backing-filename"] then
    local b = info["backing-filename"]
    if info["full-backing-filename"] ~= b then
      b = ("%s (actual path: %s)"):format(b, info["full-backing-filename"])
    end
    lines[#lines + 1] = "backing file: " .. b
    if info["backing-filename-format"] then
      lines[#lines + 1] = "backing file format: " .. info["backing-filename-format"]
    end
  end
  if info.encrypted then lines[#lines + 1] = "encrypted: yes" end
  if info.snapshots then
    lines[#lines + 1] = qcow2.snapshot_list(check(img:snapshots()))
  end
  local fs = info["format-specific"]
  if fs then
    local d = fs.data
    lines[#lines + 1] = "Format specific information:"
    local function add(k, v) lines[#lines + 1] = "    " .. k .. ": " .. v end
    add("compat", d.compat)
    add("compression type", d["compression-type"])
    if d["lazy-refcounts"] ~= nil then add("lazy refcounts", yes_no(d["lazy-refcounts"])) end
    add("refcount bits", d["refcount-bits"])
    if d.encrypt then
      lines[#lines + 1] = "    encrypt:"
      lines[#lines + 1] = "        format: " .. d.encrypt.format
    end
    if d.corrupt ~= nil then add("corrupt", yes_no(d.corrupt)) end
    if d["data-file"] then add("data file", d["data-file"]) end
    if d["data-file-raw"] ~= nil then add("data file raw", yes_no(d["data-file-raw"])) end
    if d["extended-l2"] ~= nil then add("extended l2", yes_no(d["extended-l2"])) end
  end
  return table.concat(lines, "\n")
end

local commands = {}

function commands.info(args, out)
  local flags, rest = parse(args, { ["--json"] = true, ["--output=json"] = true })
  if #rest ~= 1 then usage("info takes one image") end
  local img <close> = open(rest[1])
  local info = check(img:info())
  if flags["--json"] or flags["--output=json"] then
    out:write(qcow2.json_encode(info), "\n")
  else
    out:write(info_text(img, info), "\n")
  end
  return 0
end

-- The file holding depth d of img's chain (for qemu-img map's File column).
local function layer_path(img, depth)
  local layer = img
  for _ = 1, depth do
    layer = layer and layer:backing()
  end
  return layer and layer.path or "?"
end

-- printf's "%#x": 0 has no 0x prefix.
local function hex(n) return n == 0 and "0" or ("0x%x"):format(n) end

function commands.map(args, out)
  local flags, rest = parse(args, { ["--json"] = true, ["--output=json"] = true })
  if #rest ~= 1 then usage("map takes one image") end
  local img <close> = open(rest[1])
  local m = check(img:map())
  if flags["--json"] or flags["--output=json"] then
    out:write(m:to_json(), "\n")
    return 0
  end
  -- qemu-img's human format lists data with a host offset, and cannot
  -- describe compressed clusters.
  local lines = { ("%-16s%-16s%-16s%s"):format("Offset", "Length", "Mapped to", "File") }
  for _, r in ipairs(m:records()) do
    if r.data and not r.offset then
      fail(img.path .. ": File contains external, encrypted or compressed clusters.")
    end
    if r.data then
      lines[#lines + 1] = ("%-16s%-16s%-16s%s"):format(
        hex(r.start), hex(r.length), hex(r.offset), layer_path(img, r.depth))
    end
  end
  out:write(table.concat(lines, "\n"), "\n")
  return 0
end

function commands.snapshot(args, out)
  local flags, rest = parse(args, { ["-l"] = true })
  if not flags["-l"] or #rest ~= 1 then usage("snapshot takes -l and one image") end
  local img <close> = open(rest[1])
  local snapshots = check(img:snapshots())
  if #snapshots > 0 then out:write(qcow2.snapshot_list(snapshots), "\n") end
  return 0
end

function commands.read(args, out)
  local _, rest = parse(args, {})
  if #rest ~= 3 then usage("read takes IMG OFFSET LENGTH") end
  local offset = parse_size(rest[2], "offset")
  local length = parse_size(rest[3], "length")
  local img <close> = open(rest[1])
  -- In 4 MiB pieces, so a whole disk goes to stdout in bounded memory.
  local chunk = 4 << 20
  while length > 0 do
    local n = math.min(length, chunk)
    local data = check(img:read(offset, n))
    if #data == 0 then break end
    out:write(data)
    offset, length = offset + #data, length - #data
  end
  return 0
end

function commands.digest(args, out)
  local _, rest = parse(args, {})
  if #rest < 1 or #rest > 2 then usage("digest takes IMG [ALGO]") end
  local img <close> = open(rest[1])
  out:write(check(img:digest(rest[2] or "sha256")), "\n")
  return 0
end

--- Run the tool with an argument array (arg of the script). Returns the
-- exit status; output goes to out/err (io.stdout/io.stderr by default).
function M.main(args, out, err)
  out, err = out or io.stdout, err or io.stderr
  local list = {}
  for i = 1, #(args or {}) do list[i] = args[i] end
  local cmd = table.remove(list, 1)
  if cmd == nil or cmd == "--help" or cmd == "-h" or cmd == "help" then
    ;(cmd and out or err):write(USAGE, "\n")
    return cmd and 0 or 2
  end
  local run = commands[cmd]
  local ok, status = pcall(function()
    if not run then usage(("unknown command '%s'"):format(cmd)) end
    return run(list, out)
  end)
  if ok then return status end
  if getmetatable(status) == Failure then
    err:write("qcow2: ", status.msg, "\n")
    return status.status
  end
  err:write("qcow2: ", tostring(status), "\n")
  return 1
end

return M
