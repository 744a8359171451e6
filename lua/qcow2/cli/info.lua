--- qcow2 info: qemu-img info, text and JSON (QEMU 7.2).
local qcow2 = require "qcow2"
local util = require "qcow2.cli.util"

local qdict_keys, is_list = util.qdict_keys, util.is_list

-- block/qapi.c dump_qobject/dump_qdict/dump_qlist: 4 spaces per level,
-- dashes of keys printed as spaces, composites on their own lines.
local function dump_value(lines, level, v, prefix)
  local pad = (" "):rep(level * 4)
  if type(v) == "table" then
    lines[#lines + 1] = pad .. prefix .. ":"
    if is_list(v) then
      for i, item in ipairs(v) do dump_value(lines, level + 1, item, ("[%d]"):format(i - 1)) end
    else
      for _, k in ipairs(qdict_keys(v)) do
        dump_value(lines, level + 1, v[k], (k:gsub("-", " ")))
      end
    end
  else
    local text = type(v) == "boolean" and tostring(v) or tostring(v)
    lines[#lines + 1] = pad .. prefix .. ": " .. text
  end
end

-- block/qapi.c bdrv_image_info_dump (QEMU 7.2), without the last newline.
local function info_text(img, info)
  local lines = {
    "image: " .. info.filename,
    "file format: " .. info.format,
    ("virtual size: %s (%d bytes)"):format(
      qcow2.human_size(info["virtual-size"]), info["virtual-size"]),
    "disk size: " .. (info["actual-size"]
                      and qcow2.human_size(info["actual-size"]) or "unavailable"),
  }
  if info.encrypted then lines[#lines + 1] = "encrypted: yes" end
  if info["cluster-size"] then
    lines[#lines + 1] = "cluster_size: " .. info["cluster-size"]
  end
  if info["dirty-flag"] then lines[#lines + 1] = "cleanly shut down: no" end
  if info["backing-filename"] then
    local b = "backing file: " .. info["backing-filename"]
    local full = info["full-backing-filename"]
    if not full then
      b = b .. " (cannot determine actual path)"
    elseif full ~= info["backing-filename"] then
      b = ("%s (actual path: %s)"):format(b, full)
    end
    lines[#lines + 1] = b
    if info["backing-filename-format"] then
      lines[#lines + 1] = "backing file format: " .. info["backing-filename-format"]
    end
  end
  if info.snapshots then
    lines[#lines + 1] = qcow2.snapshot_list(util.check(img:snapshots()))
  end
  local fs = info["format-specific"]
  if fs then
    lines[#lines + 1] = "Format specific information:"
    for _, k in ipairs(qdict_keys(fs.data)) do
      dump_value(lines, 1, fs.data[k], (k:gsub("-", " ")))
    end
  end
  return table.concat(lines, "\n")
end

return {
  summary = "image information, as qemu-img info",
  usage = [[
usage: qcow2 info [--output=human|json] [--backing-chain] IMG

Prints what `qemu-img info` (QEMU 7.2) prints for IMG: the same text, or
with --output=json (or --json) the same JSON object. --backing-chain
describes every layer of the chain (JSON: an array).]],
  options = {
    ["--output"] = { arg = true, choices = { "human", "json" } },
    ["--json"] = {},
    ["--backing-chain"] = {},
    ["-U"] = {}, ["--force-share"] = { alias = "-U" },
  },
  text = info_text,
  run = function(opts, args, ctx)
    if #args ~= 1 then util.usage("info takes one image") end
    local img <close> = util.open(args[1], { key = opts.key, force_share = opts["-U"] or nil })
    local layers = { img }
    if opts["--backing-chain"] then
      local b = img:backing()
      while b do layers[#layers + 1] = b; b = b:backing() end
    end
    local json = util.output_format(opts) == "json"
    local infos, parts = {}, {}
    for i, layer in ipairs(layers) do
      infos[i] = util.check(layer:info())
      parts[i] = not json and info_text(layer, infos[i]) or nil
    end
    if json then
      ctx.out:write(util.qemu_json(opts["--backing-chain"] and infos or infos[1]), "\n")
    else
      ctx.out:write(table.concat(parts, "\n\n"), "\n")
    end
    return 0
  end,
}
