--- qcow2 measure: qemu-img measure (qcow2.measure).
local qcow2 = require "qcow2"
local util = require "qcow2.cli.util"
local create = require "qcow2.cli.create"

return {
  summary = "file size a new image needs, as qemu-img measure",
  usage = [==[
usage: qcow2 measure [--output=human|json] [-O qcow2|raw] [-o OPT=VAL,...]
                     [--size N | [-l snapshot.name=NAME] IMG]

Prints the size a new image needs ("required size") and its size fully
allocated, as `qemu-img measure` does, for the create options -o (-o
help lists them) and a disk of --size bytes or IMG's data (with -l, a
snapshot's). qcow2 with a v3 qcow2 input also prints the bitmaps' size.
-O defaults to raw, as in qemu-img.]==],
  options = {
    ["--output"] = { arg = true, choices = { "human", "json" } },
    ["-O"] = { arg = true, choices = { "qcow2", "raw" } },
    ["-o"] = { arg = true, multi = true }, ["--size"] = { arg = true },
    ["-l"] = { arg = true }, ["-f"] = { arg = true }, ["-U"] = {},
  },
  run = function(opts, args, ctx)
    local mopts = create.create_options(ctx, opts["-o"])
    if not mopts then return 0 end
    if #args > 1 then util.usage("measure takes at most one IMG") end
    if opts["--size"] and args[1] then
      util.usage("--size N cannot be used together with a filename")
    end
    if not opts["--size"] and not args[1] then
      util.usage("Either --size N or one filename must be specified")
    end
    if opts["-l"] and not args[1] then util.usage("-l needs a filename") end
    local size = opts["--size"] and util.parse_size(opts["--size"], "size")
    local format = opts["-O"] or "raw"
    local img
    if args[1] then img = util.open(args[1], { force_share = opts["-U"] or nil }) end
    local snapshot = opts["-l"] and (opts["-l"]:match("^snapshot%.%a+=(.*)$") or opts["-l"])
    local res
    if format == "raw" then
      if next(mopts) then util.fail("Invalid options for file format 'raw'") end
      local n = size
      if img then
        n = img.size
        if snapshot then n = util.check(img:snapshot(snapshot) or nil, "snapshot not found").disk_size end
      end
      n = (n + 511) // 512 * 512
      res = { required = n, fully_allocated = n }
    else
      mopts.size = size
      mopts.from = img
      mopts.snapshot = snapshot
      local ok, r, msg = pcall(qcow2.measure, mopts)
      if not ok then util.fail(tostring(r):gsub("^[^:]*:%d+: ", "")) end
      res = util.check(r, msg)
    end
    if img then img:close() end
    if util.output_format(opts) == "json" then
      local t = { required = res.required, ["fully-allocated"] = res.fully_allocated,
                  bitmaps = res.bitmaps }
      ctx.out:write(util.qemu_json(t), "\n")
    else
      ctx.out:write(("required size: %d\nfully allocated size: %d\n")
                    :format(res.required, res.fully_allocated))
      if res.bitmaps then ctx.out:write(("bitmaps size: %d\n"):format(res.bitmaps)) end
    end
    return 0
  end,
}
