--- qcow2 owners: every byte of the image file attributed to its owner.
local qcow2 = require "qcow2"
local util = require "qcow2.cli.util"

return {
  summary = "who owns each byte of the image file (forensics)",
  usage = [[
usage: qcow2 owners [--json] [-U] IMG

Lists every byte range of the file IMG in file order with its owner:
header, l1, l2, refcount_table, refcount_block, snapshot_table, data,
compressed, leaked, free, unaccounted, overlap, ... (img:owners()). For
data and compressed ranges the detail names the guest offsets and the
views that read them. The ranges cover the file exactly once. Damaged
metadata is reported, not fatal. --json prints the same list as a JSON
array of {offset, length, owner, detail}. IMG is opened read-only; -U
opens an image a running VM holds.]],
  options = {
    ["--json"] = {}, ["--output"] = { arg = true, choices = { "human", "json" } },
    ["-U"] = {}, ["--force-share"] = { alias = "-U" },
  },
  run = function(opts, args, ctx)
    if #args ~= 1 then util.usage("owners takes one image") end
    local _ <close>, list = util.open_listing(ctx, opts, args[1], "walking the metadata",
                                             "owners")
    if util.output_format(opts) == "json" then
      ctx.out:write(util.json(list), "\n")
      return 0
    end
    ctx.out:write(("%-18s %-18s %-18s %s\n"):format("Offset", "Length", "Owner", "Detail"))
    for _, o in ipairs(list) do
      ctx.out:write(("0x%016x 0x%016x %-18s %s\n"):format(o.offset, o.length,
                                                          o.owner, o.detail or ""))
    end
    local sum = 0
    for _, o in ipairs(list) do sum = sum + o.length end
    ctx.out:write(("%d ranges, %s (%d bytes)\n"):format(#list, qcow2.human_size(sum), sum))
    return 0
  end,
}
