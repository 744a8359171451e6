--- qcow2 map: qemu-img map, JSON and human (QEMU 7.2).
local util = require "qcow2.cli.util"

-- The file holding depth d of img's chain (qemu-img map's File column).
local function layer_path(img, depth)
  local layer = img
  for _ = 1, depth do layer = layer and layer:backing() end
  return layer and layer.path or ""
end

-- qemu-img.c dump_map_entry, OFORMAT_HUMAN: data that is not known to
-- read as zeroes, one line each; compressed data has no host offset to
-- print and stops the listing, as qemu-img does. Records with the flags
-- the human format ignores merge further (qemu-img turns every non-data
-- record into "zero" so that they coalesce): only data lines matter.
local function human(img, m, out)
  out:write(("%-16s%-16s%-16s%s\n"):format("Offset", "Length", "Mapped to", "File"))
  for _, r in ipairs(m:records()) do
    if r.data and not r.offset then
      util.fail("File contains external, encrypted or compressed clusters.")
    end
    if r.data and not r.zero then
      out:write(("%-16s%-16s%-16s%s\n"):format(util.hex(r.start),
        util.hex(r.length), util.hex(r.offset), layer_path(img, r.depth)))
    end
  end
end

-- qemu-img.c dump_map_entry, OFORMAT_JSON: its fixed layout, one record
-- a line (m:to_json() is the same JSON value, compactly encoded).
local function json(m, out)
  local records = m:records()
  out:write("[")
  for i, r in ipairs(records) do
    out:write(('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, "data": %s')
      :format(r.start, r.length, r.depth, tostring(r.present), tostring(r.zero), tostring(r.data)))
    if r.offset then out:write((', "offset": %d'):format(r.offset)) end
    out:write("}", i < #records and ",\n" or "")
  end
  out:write("]\n")
end

return {
  summary = "guest extents and where they live, as qemu-img map",
  usage = [[
usage: qcow2 map [--output=human|json] [--snapshot NAME] IMG

Prints what `qemu-img map` (QEMU 7.2) prints: the human table "Offset
Length Mapped to File" of data extents, or with --output=json (or --json)
every extent with its flags. --snapshot maps an internal snapshot's view.]],
  options = {
    ["--output"] = { arg = true, choices = { "human", "json" } },
    ["--json"] = {},
    ["--snapshot"] = { arg = true },
    ["-l"] = { arg = true, alias = "--snapshot" },
    ["-U"] = {}, ["--force-share"] = { alias = "-U" },
  },
  run = function(opts, args, ctx)
    if #args ~= 1 then util.usage("map takes one image") end
    local img <close> = util.open(args[1], { key = opts.key, force_share = opts["-U"] or nil })
    local view = img
    if opts["--snapshot"] then view = util.snapshot_view(img, opts["--snapshot"]) end
    local m = util.check(view:map())
    if util.output_format(opts) == "json" then
      json(m, ctx.out)
    else
      human(view, m, ctx.out)
    end
    return 0
  end,
}
