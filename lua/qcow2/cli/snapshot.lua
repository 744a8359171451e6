--- qcow2 snapshot: qemu-img snapshot -l|-c|-a|-d.
local qcow2 = require "qcow2"
local util = require "qcow2.cli.util"

local ACTIONS = { "-l", "-c", "-a", "-d" }

return {
  summary = "list, create, apply or delete internal snapshots",
  usage = [[
usage: qcow2 snapshot -l IMG
       qcow2 snapshot -c NAME IMG
       qcow2 snapshot -a NAME IMG
       qcow2 snapshot -d NAME IMG

As qemu-img snapshot: -l lists the snapshots (read-only), -c creates one
of the current disk, -a reverts the disk to one, -d deletes one (these
three open the image read-write). NAME is an id or a name for -a and -d.]],
  options = {
    ["-l"] = {}, ["-c"] = { arg = true }, ["-a"] = { arg = true },
    ["-d"] = { arg = true }, ["-q"] = {},
    ["-U"] = {}, ["--force-share"] = { alias = "-U" },
  },
  run = function(opts, args, ctx)
    local action
    for _, a in ipairs(ACTIONS) do
      if opts[a] then
        if action then util.usage("snapshot takes one of -l, -c, -a, -d") end
        action = a
      end
    end
    if not action then util.usage("snapshot needs -l, -c NAME, -a NAME or -d NAME") end
    if #args ~= 1 then util.usage("snapshot takes one image") end
    if action == "-l" then
      local img <close> = util.open(args[1], { key = opts.key, backing = false, force_share = opts["-U"] or nil })
      local list = util.check(img:snapshots())
      if #list > 0 then ctx.out:write(qcow2.snapshot_list(list), "\n") end
      return 0
    end
    if opts["-U"] then util.usage("-U is only allowed with -l") end
    local name = opts[action]
    local img <close> = util.open(args[1], { key = opts.key, mode = "rw", backing = false, allow_raw = false })
    if action == "-c" then
      local ok, msg = img:create_snapshot(name, { date = os.time() })
      if not ok then util.fail(("Could not create snapshot '%s': %s"):format(name, msg)) end
    else
      local verb = action == "-a" and "apply" or "delete"
      local s = img:snapshot(name)
      if not s then
        util.fail(("Could not %s snapshot '%s': snapshot not found"):format(verb, name))
      end
      local ok, msg = s[verb](s)
      if not ok then util.fail(("Could not %s snapshot '%s': %s"):format(verb, name, msg)) end
    end
    util.check(img:close())
    return 0
  end,
}
