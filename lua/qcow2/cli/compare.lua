--- qcow2 compare: qemu-img compare's messages and exit statuses.
local qcow2 = require "qcow2"
local util = require "qcow2.cli.util"

return {
  summary = "compare the guest bytes of two images, as qemu-img compare",
  usage = [==[
usage: qcow2 compare [-s] [-q] [-U] A B

Compares the guest disks of A and B (each with its backing chain), as
`qemu-img compare` does: "Images are identical." and status 0, or
"Content mismatch at offset N!" (N: the first differing 512-byte sector)
and status 1; status 2 on errors. A size mismatch is a warning and the
longer image's tail must read as zeroes; with -s (strict) it is a
difference, and so is a block status mismatch.]==],
  options = {
    ["-s"] = {}, ["-q"] = {}, ["-U"] = {}, ["-f"] = { arg = true }, ["-F"] = { arg = true },
  },
  run = function(opts, args, ctx)
    if #args ~= 2 then util.usage("compare takes A B") end
    local function open(path)
      local img, msg = qcow2.open(path, { allow_raw = true, force_share = opts["-U"] or nil })
      if not img then util.fail(("Could not open '%s': %s"):format(path, msg), 2) end
      return img
    end
    local a, b = open(args[1]), open(args[2])
    local say = opts["-q"] and function() end or function(s) ctx.out:write(s, "\n") end
    local ok, offset, why = qcow2.compare(a, b, { strict = opts["-s"] or false })
    local sa, sb = a.size, b.size
    a:close()
    b:close()
    if ok == nil then util.fail(tostring(offset), 2) end
    if sa ~= sb and not opts["-s"] then say("Warning: Image size mismatch!") end
    if ok then
      say("Images are identical.")
      return 0
    elseif why == "size" then
      say("Strict mode: Image size mismatch!")
    elseif why == "status" then
      say(("Strict mode: Offset %d block status mismatch!"):format(offset))
    else
      say(("Content mismatch at offset %d!"):format(offset))
    end
    return 1
  end,
}
