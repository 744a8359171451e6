--- qcow2 create: qemu-img create -f qcow2, with its -o option syntax.
local qcow2 = require "qcow2"
local util = require "qcow2.cli.util"

-- qemu-img's -o names: how each becomes a qcow2.create option. `kind`
-- says how the text is read; `default` is what qemu-img's "Formatting"
-- line shows when the option is not given. The order is that line's
-- (block/qcow2.c qcow2_create_opts).
local OPTIONS = {
  { "cluster_size", "cluster_size", kind = "size", default = "65536" },
  { "extended_l2", "extended_l2", kind = "bool", default = "off" },
  { "preallocation", "preallocation", kind = "string" },
  { "compression_type", "compression_type", kind = "string", default = "zlib" },
  { "size", "size", kind = "size" },
  { "compat", "compat", kind = "string" },
  { "backing_file", "backing_file", kind = "string" },
  { "backing_fmt", "backing_format", kind = "string" },
  { "data_file", "data_file", kind = "string" },
  { "data_file_raw", "data_file_raw", kind = "bool" },
  { "lazy_refcounts", "lazy_refcounts", kind = "bool", default = "off" },
  { "refcount_bits", "refcount_bits", kind = "integer", default = "16" },
}
local BY_NAME = {}
for _, o in ipairs(OPTIONS) do BY_NAME[o[1]] = o end

-- qapi_bool_parse's spellings
local BOOL = { on = true, yes = true, ["true"] = true, y = true,
               off = false, no = false, ["false"] = false, n = false }

-- "a=1,b=2" into pairs; ",," is a literal comma (QEMU's option syntax).
local function split_options(text, into)
  local i, key, buf = 1, nil, {}
  local function finish()
    local item = table.concat(buf)
    buf = {}
    if item == "" then return end
    local k, v = item:match("^([^=]*)=(.*)$")
    into[#into + 1] = { k or item, v }
  end
  while i <= #text do
    local c = text:sub(i, i)
    if c == "," and text:sub(i + 1, i + 1) == "," then
      buf[#buf + 1] = ","
      i = i + 2
    elseif c == "," then
      finish()
      i = i + 1
    else
      buf[#buf + 1] = c
      i = i + 1
    end
  end
  finish()
  return into, key
end

-- The value of one -o option for qcow2.create; failures as qemu-img's.
local function convert(o, text)
  if o.kind == "size" then
    local n = util.size(text)
    if not n then
      util.fail(("Parameter '%s' expects a non-negative number below 2^64"):format(o[1]))
    end
    return n, tostring(n)
  elseif o.kind == "bool" then
    local b = BOOL[text]
    if b == nil then
      util.fail(("Parameter '%s' expects 'on' or 'off'"):format(o[1]))
    end
    return b, text
  elseif o.kind == "integer" then
    local n = text:match("^%d+$") and math.tointeger(tonumber(text))
    if not n then
      util.fail(("Parameter '%s' expects a number"):format(o[1]))
    end
    return n, text
  end
  return text, text
end

local HELP_O = [[
Supported options:
  backing_file=<str>      - File name of a base image
  backing_fmt=<str>       - Image format of the base image
  cluster_size=<size>     - qcow2 cluster size
  compat=<str>            - Compatibility level (v2 [0.10] or v3 [1.1])
  compression_type=<str>  - Compression method used for image cluster compression (zlib, zstd)
  data_file=<str>         - File name of an external data file
  data_file_raw=<bool>    - The external data file must stay valid as a raw image
  extended_l2=<bool>      - Extended L2 tables
  lazy_refcounts=<bool>   - Postpone refcount updates
  preallocation=<str>     - Preallocation mode (allowed values: off, metadata, falloc, full)
  refcount_bits=<num>     - Width of a reference count entry in bits
  size=<size>             - Virtual disk size]]

-- The backing file's size, opened as qemu-img does it (relative names
-- against the new image's folder).
local function backing_size(image, backing, fmt)
  local path = backing
  if backing:sub(1, 1) ~= "/" then
    path = (image:match("^(.*/)") or "") .. backing
  end
  local b, msg = qcow2.open(path, { backing = false, force_share = true,
                                    allow_raw = fmt ~= "qcow2" })
  if not b then
    util.fail(("%s: Could not open backing image: %s"):format(image, msg))
  end
  local size = b.size
  b:close()
  return size
end

-- -o texts (qemu-img's syntax and names) into qcow2.create options, for
-- the subcommands that take create options too (convert, measure); nil
-- when one of them asks for help, which is then written to ctx.out.
local function create_options(ctx, texts)
  local given, out = {}, {}
  for _, text in ipairs(texts or {}) do split_options(text, given) end
  for _, kv in ipairs(given) do
    local name, value = kv[1], kv[2]
    if name == "help" or name == "?" then
      ctx.out:write(HELP_O, "\n")
      return nil
    end
    if name:match("^encrypt") then
      util.fail("encryption needs a secret object: use qemu-img")
    end
    local o = BY_NAME[name]
    if not o then util.fail(("Invalid parameter '%s'"):format(name)) end
    if value == nil then util.fail(("Parameter '%s' needs a value"):format(name)) end
    out[o[2]] = (convert(o, value))
  end
  return out
end

return {
  create_options = create_options,
  summary = "create a qcow2 image, as qemu-img create",
  usage = [[
usage: qcow2 create [-f qcow2] [-o OPT=VAL,...] [-b BACKING -F FMT] [-u] [-q] IMG [SIZE]

Creates IMG as `qemu-img create -f qcow2` does, byte for byte. SIZE takes
k, M, G, T, P or E (powers of 1024); with a backing file and no SIZE the
backing file's size is used. -o takes qemu-img's qcow2 options (-o help
lists them): cluster_size, compat, refcount_bits, lazy_refcounts,
preallocation, backing_file, backing_fmt, extended_l2, compression_type,
data_file, data_file_raw, size. -u does not open the backing file.
Encryption needs secrets this tool does not take: use qemu-img.]],
  options = {
    ["-f"] = { arg = true }, ["-o"] = { arg = true, multi = true },
    ["-b"] = { arg = true }, ["-F"] = { arg = true }, ["-u"] = {}, ["-q"] = {},
  },
  run = function(opts, args, ctx)
    local fmt = opts["-f"] or "qcow2"
    if fmt ~= "qcow2" then util.fail(("this tool creates qcow2 images, not '%s'"):format(fmt)) end
    local given = {}
    for _, text in ipairs(opts["-o"] or {}) do split_options(text, given) end
    for _, kv in ipairs(given) do
      if kv[1] == "help" or kv[1] == "?" then
        ctx.out:write(HELP_O, "\n")
        return 0
      end
    end
    if #args < 1 or #args > 2 then util.usage("create takes IMG [SIZE]") end
    local image = args[1]
    -- option name -> text as given (the last one wins, as in QEMU)
    local text = {}
    for _, kv in ipairs(given) do
      local name, value = kv[1], kv[2]
      if name:match("^encrypt") then
        util.fail("encryption needs a secret object: create encrypted images with qemu-img")
      end
      if not BY_NAME[name] then util.fail(("Invalid parameter '%s'"):format(name)) end
      if value == nil then util.fail(("Parameter '%s' needs a value"):format(name)) end
      text[name] = value
    end
    if opts["-b"] then text.backing_file = opts["-b"] end
    if opts["-F"] then text.backing_fmt = opts["-F"] end
    if args[2] then
      local n = util.size(args[2])
      if not n or n > math.maxinteger then
        util.usage("Invalid image size specified. You may use k, M, G, T, P or E suffixes")
      end
      text.size = tostring(n)
    end
    if text.backing_file and not text.backing_fmt then
      util.fail(image .. ": Backing file specified without backing format")
    end
    if text.backing_file and not opts["-u"] then
      local size = backing_size(image, text.backing_file, text.backing_fmt)
      text.size = text.size or tostring(size)
    end
    if not text.size then util.fail(image .. ": Image creation needs a size parameter") end
    local create, shown = { overwrite = true }, {}
    for _, o in ipairs(OPTIONS) do
      local t = text[o[1]]
      if t then
        local value, show = convert(o, t)
        create[o[2]] = value
        shown[#shown + 1] = o[1] .. "=" .. show
      elseif o.default then
        shown[#shown + 1] = o[1] .. "=" .. o.default
      end
    end
    if not opts["-q"] then
      ctx.out:write(("Formatting '%s', fmt=qcow2 %s\n"):format(image, table.concat(shown, " ")))
    end
    -- unknown enumeration values raise in the library: a failure here
    local ok, img, msg = pcall(qcow2.create, image, create)
    if not ok then util.fail(image .. ": " .. tostring(img):gsub("^[^:]*:%d+: ", "")) end
    util.check(img, msg)
    util.check(img:close())
    return 0
  end,
}
