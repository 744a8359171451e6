--- qcow2 diff: guest ranges that differ between two views (images,
-- internal snapshots, the active disk).
local qcow2 = require "qcow2"
local util = require "qcow2.cli.util"

return {
  summary = "guest ranges that differ between two images or snapshots",
  usage = [[
usage: qcow2 diff [--json] [-U] A B
       qcow2 diff [--json] [-U] IMG --snapshot X [--snapshot Y]

Lists the guest ranges whose bytes differ (a:diff(b)): between images A
and B (each read through its backing chain), between two internal
snapshots X and Y of IMG, or with one --snapshot between snapshot X and
IMG's active disk. Maps are compared first; bytes only where both sides
hold data. Each line is START LENGTH (hex) of one range; --json prints
an array of {start, length}. Images are opened read-only.
Exit status 0 whether or not they differ (1 on failure).]],
  options = {
    ["--snapshot"] = { arg = true, multi = true },
    ["-l"] = { arg = true, multi = true, alias = "--snapshot" },
    ["--json"] = {}, ["--output"] = { arg = true, choices = { "human", "json" } },
    ["-U"] = {}, ["--force-share"] = { alias = "-U" },
  },
  run = function(opts, args, ctx)
    local snaps = opts["--snapshot"] or {}
    local share = opts["-U"] or nil
    local a, b, la, lb
    local open <close> = util.handles()
    if #snaps == 0 then
      if #args ~= 2 then util.usage("diff takes two images, or one and --snapshot") end
      a = open(util.open(args[1], { force_share = share }))
      b = open(util.open(args[2], { force_share = share }))
      la, lb = args[1], args[2]
    else
      if #args ~= 1 then util.usage("diff with --snapshot takes one image") end
      if #snaps > 2 then util.usage("give --snapshot once or twice") end
      local img = open(util.open(args[1], { force_share = share }))
      a = open(util.snapshot_view(img, snaps[1]))
      la = "snapshot " .. snaps[1]
      if snaps[2] then
        b, lb = open(util.snapshot_view(img, snaps[2])), "snapshot " .. snaps[2]
      else
        b, lb = img, "active"
      end
    end
    local finish = util.status(ctx, ("comparing %s with %s ..."):format(la, lb))
    local list = util.check(a:diff(b))
    finish()
    if util.output_format(opts) == "json" then
      ctx.out:write(util.json(list), "\n")
      return 0
    end
    ctx.out:write(("%-18s %s\n"):format("Start", "Length"))
    local sum = 0
    for _, d in ipairs(list) do
      sum = sum + d.length
      ctx.out:write(("0x%016x 0x%016x\n"):format(d.start, d.length))
    end
    ctx.out:write(("%d ranges, %s (%d bytes) differ between %s and %s\n"):format(
      #list, qcow2.human_size(sum), sum, la, lb))
    return 0
  end,
}
