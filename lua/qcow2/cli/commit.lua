--- qcow2 commit: qemu-img commit IMG.
local util = require "qcow2.cli.util"

return {
  summary = "write an image's data into its backing file, as qemu-img commit",
  usage = [[
usage: qcow2 commit [-q] [-f qcow2] IMG

Writes the clusters IMG holds itself (data and zero clusters, not its
backing chain's) into its backing file (qcow2 or raw, opened read-write),
then empties IMG, as qemu-img commit does. Prints "Image committed."]],
  options = { ["-f"] = { arg = true }, ["-q"] = {}, ["-p"] = {} },
  run = function(opts, args, ctx)
    if #args ~= 1 then util.usage("commit takes one image") end
    if opts["-f"] and opts["-f"] ~= "qcow2" then
      util.fail(("this tool commits qcow2 images, not '%s'"):format(opts["-f"]))
    end
    local img <close> = util.open(args[1], { mode = "rw", allow_raw = false })
    util.check(img:commit())
    util.check(img:close())
    if not opts["-q"] then ctx.out:write("Image committed.\n") end
    return 0
  end,
}
