--- qcow2 check: qemu-img check, its text, JSON and exit statuses.
local util = require "qcow2.cli.util"

return {
  summary = "check the image's metadata, as qemu-img check",
  usage = [[
usage: qcow2 check [-r leaks|all] [--output=human|json] IMG

Checks IMG as `qemu-img check` (QEMU 7.2) does and prints the same text
or JSON. Without -r the image is opened read-only; -r leaks frees leaked
clusters, -r all also repairs corruptions (read-write). Findings go to
stderr, one a line.
Exit status as qemu-img check: 0 no problem, 1 the check could not be
completed (internal errors, or the image does not open), 2 corruptions,
3 leaked clusters only.]],
  options = {
    ["-r"] = { arg = true, choices = { "leaks", "all" } },
    ["--repair"] = { arg = true, choices = { "leaks", "all" }, alias = "-r" },
    ["--output"] = { arg = true, choices = { "human", "json" } },
    ["--json"] = {},
    ["-q"] = {},
    ["-U"] = {}, ["--force-share"] = { alias = "-U" },
  },
  run = function(opts, args, ctx)
    if #args ~= 1 then util.usage("check takes one image") end
    local repair = opts["-r"]
    if repair and opts["-U"] then util.usage("-U cannot be used with -r") end
    local img <close> = util.open(args[1], { key = opts.key,
      mode = repair and "rw" or "r", repair = repair and true or nil,
      backing = false, allow_raw = false, force_share = opts["-U"] or nil,
    })
    local r = util.check(img:check(repair and { repair = repair } or nil))
    -- what qemu-img prints on stderr; "strict" findings are our extras
    for f in r:findings() do
      if f.kind ~= "strict" then ctx.err:write(f.message, "\n") end
    end
    if not opts["-q"] then
      if util.output_format(opts) == "json" then
        ctx.out:write(r:to_json(), "\n")
      else
        ctx.out:write(tostring(r), "\n")
      end
    end
    if repair then util.check(img:close()) end
    -- qemu-img.c img_check's verdict
    if r.check_errors > 0 then
      ctx.err:write("qcow2: Check failed\n")
      return 1
    end
    if r.corruptions > 0 then return 2 end
    if r.leaks > 0 then return 3 end
    return 0
  end,
}
