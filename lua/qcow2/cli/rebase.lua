--- qcow2 rebase: qemu-img rebase [-u] -b BACKING [-F FMT] IMG.
local util = require "qcow2.cli.util"

return {
  summary = "change an image's backing file, as qemu-img rebase",
  usage = [[
usage: qcow2 rebase [-u] [-q] [-p] [-f qcow2] -b BACKING [-F FMT] IMG

Makes BACKING (a plain file name, relative to IMG's folder) the backing
file of IMG; -b "" removes it. Safe by default: before the switch, every
range IMG does not hold itself and whose bytes differ between the old and
the new backing chain is copied into IMG, so the guest disk reads the same.
-u (unsafe) only rewrites the name and format. -F (qcow2 or raw) is
needed with a backing file, as qemu-img needs it.]],
  options = {
    ["-b"] = { arg = true }, ["-F"] = { arg = true }, ["-f"] = { arg = true },
    ["-u"] = {}, ["-q"] = {}, ["-p"] = {},
  },
  run = function(opts, args)
    if #args ~= 1 then util.usage("rebase takes one image") end
    if opts["-f"] and opts["-f"] ~= "qcow2" then
      util.fail(("this tool rebases qcow2 images, not '%s'"):format(opts["-f"]))
    end
    local backing, fmt = opts["-b"], opts["-F"]
    if backing == nil and not opts["-u"] then
      util.usage("rebase needs -b BACKING (-b \"\" removes the backing file)")
    end
    backing = backing or ""
    if backing ~= "" and not fmt then
      util.fail(("Could not change the backing file to '%s': backing format must be specified")
                :format(backing))
    end
    if fmt and fmt ~= "qcow2" and fmt ~= "raw" then
      util.fail(("Unknown backing format '%s' (qcow2 or raw)"):format(fmt))
    end
    local img <close> = util.open(args[1], { mode = "rw", allow_raw = false })
    util.check(img:rebase(backing, { format = fmt, unsafe = opts["-u"] or nil }))
    util.check(img:close())
    return 0
  end,
}
