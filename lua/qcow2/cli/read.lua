--- qcow2 read: guest bytes to stdout.
local util = require "qcow2.cli.util"

return {
  summary = "write guest bytes to stdout",
  usage = [[
usage: qcow2 read [--snapshot NAME] IMG OFFSET LENGTH

Writes LENGTH guest bytes of IMG from OFFSET (through the backing chain,
or of a snapshot's view) to stdout. OFFSET and LENGTH take a k, M, G or
T suffix (powers of 1024) or 0x hex.]],
  options = {
    ["--snapshot"] = { arg = true }, ["-l"] = { arg = true, alias = "--snapshot" },
    ["-U"] = {}, ["--force-share"] = { alias = "-U" },
  },
  run = function(opts, args, ctx)
    if #args ~= 3 then util.usage("read takes IMG OFFSET LENGTH") end
    local offset = util.parse_size(args[2], "offset")
    local length = util.parse_size(args[3], "length")
    local img <close> = util.open(args[1], { key = opts.key, force_share = opts["-U"] or nil })
    local view = img
    if opts["--snapshot"] then view = util.snapshot_view(img, opts["--snapshot"]) end
    -- in 4 MiB pieces: a whole disk goes out in bounded memory
    local chunk = 4 << 20
    while length > 0 do
      local n = math.min(length, chunk)
      local data = util.check(view:read(offset, n))
      if #data == 0 then break end
      ctx.out:write(data)
      offset, length = offset + #data, length - #data
    end
    return 0
  end,
}
