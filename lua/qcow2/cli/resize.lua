--- qcow2 resize: qemu-img resize [--shrink] IMG [+|-]SIZE.
local util = require "qcow2.cli.util"

return {
  summary = "change the virtual size, as qemu-img resize",
  usage = [[
usage: qcow2 resize [-q] [-f qcow2] [--shrink] IMG [+|-]SIZE

Sets the virtual size of IMG to SIZE, or grows (+SIZE) or shrinks (-SIZE)
it by that much; SIZE takes k, M, G, T, P or E. Shrinking needs --shrink,
as in qemu-img (data past the new end is lost). Prints "Image resized."]],
  last_arg_raw = true,
  options = { ["-f"] = { arg = true }, ["-q"] = {}, ["--shrink"] = {} },
  run = function(opts, args, ctx)
    if #args ~= 2 then util.usage("resize takes IMG and SIZE") end
    if opts["-f"] and opts["-f"] ~= "qcow2" then
      util.fail(("this tool resizes qcow2 images, not '%s'"):format(opts["-f"]))
    end
    local sign, text = args[2]:match("^([+-]?)(.*)$")
    local n = util.size(text)
    if not n then util.usage("Invalid image size specified") end
    local img <close> = util.open(args[1], { mode = "rw", allow_raw = false })
    local size = n
    if sign == "+" then size = img.size + n end
    if sign == "-" then size = img.size - n end
    if size <= 0 then util.fail("New image size must be positive") end
    if size < img.size and not opts["--shrink"] then
      util.fail("Use the --shrink option to perform a shrink operation.")
    end
    util.check(img:resize(size))
    util.check(img:close())
    if not opts["-q"] then ctx.out:write("Image resized.\n") end
    return 0
  end,
}
