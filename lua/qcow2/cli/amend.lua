--- qcow2 amend: qemu-img amend -o OPTIONS IMG.
local util = require "qcow2.cli.util"

-- qemu-img's -o names: the img:amend option each becomes, and its kind.
local OPTIONS = {
  compat = { "compat", "string" }, lazy_refcounts = { "lazy_refcounts", "bool" },
  backing_file = { "backing_file", "string" }, backing_fmt = { "backing_format", "string" },
  size = { "size", "size" }, cluster_size = { "cluster_size", "size" },
  refcount_bits = { "refcount_bits", "integer" }, extended_l2 = { "extended_l2", "bool" },
  compression_type = { "compression_type", "string" },
  preallocation = { "preallocation", "string" },
  data_file = { "data_file", "string" }, data_file_raw = { "data_file_raw", "bool" },
}
local BOOL = { on = true, yes = true, ["true"] = true, y = true,
               off = false, no = false, ["false"] = false, n = false }

-- "a=1,b=2" into pairs; ",," is a literal comma (QEMU's option syntax).
local function split(text, into)
  local item = {}
  local function finish()
    local s = table.concat(item)
    item = {}
    if s ~= "" then
      local k, v = s:match("^([^=]*)=(.*)$")
      into[#into + 1] = { k or s, v }
    end
  end
  local i = 1
  while i <= #text do
    local c = text:sub(i, i)
    if c == "," and text:sub(i + 1, i + 1) == "," then
      item[#item + 1] = ","; i = i + 2
    elseif c == "," then
      finish(); i = i + 1
    else
      item[#item + 1] = c; i = i + 1
    end
  end
  finish()
end

local function value_of(name, kind, text)
  if kind == "bool" then
    local b = BOOL[text]
    if b == nil then
      util.fail(("Parameter '%s' expects 'on' or 'off'"):format(name))
    end
    return b
  elseif kind == "size" or kind == "integer" then
    local n = kind == "size" and util.size(text) or math.tointeger(tonumber(text))
    if not n then util.fail(("Parameter '%s' expects a size"):format(name)) end
    return n
  end
  return text
end

return {
  summary = "change image options, as qemu-img amend",
  usage = [[
usage: qcow2 amend [-q] [-f qcow2] -o OPT=VAL[,...] IMG

Changes what qemu-img amend changes on a qcow2 image: compat (0.10 or
1.1: version 2 or 3), lazy_refcounts, backing_file, backing_fmt (the name
only, as rebase -u) and size. Creation-only options (cluster_size,
refcount_bits, ...) are refused unless they say what the image is.]],
  options = { ["-o"] = { arg = true, multi = true }, ["-f"] = { arg = true }, ["-q"] = {} },
  run = function(opts, args)
    if #args ~= 1 then util.usage("amend takes one image") end
    if not opts["-o"] then util.usage("amend needs -o OPTIONS") end
    if opts["-f"] and opts["-f"] ~= "qcow2" then
      util.fail(("this tool amends qcow2 images, not '%s'"):format(opts["-f"]))
    end
    local given = {}
    for _, text in ipairs(opts["-o"]) do split(text, given) end
    local amend = {}
    for _, kv in ipairs(given) do
      local o = OPTIONS[kv[1]]
      if not o then util.fail(("Invalid parameter '%s'"):format(kv[1])) end
      if kv[2] == nil then util.fail(("Parameter '%s' needs a value"):format(kv[1])) end
      amend[o[1]] = value_of(kv[1], o[2], kv[2])
    end
    local img <close> = util.open(args[1], { mode = "rw", allow_raw = false, backing = false })
    -- unknown enumeration values raise in the library: a failure here
    local ok, res, msg = pcall(img.amend, img, amend)
    if not ok then util.fail(tostring(res):gsub("^[^:]*:%d+: ", "")) end
    util.check(res, msg)
    util.check(img:close())
    return 0
  end,
}
