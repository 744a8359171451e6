--- qcow2 digest: a hex digest of the guest disk (or a snapshot's view).
local qcow2 = require "qcow2"
local util = require "qcow2.cli.util"

return {
  summary = "hex digest of the guest disk (default sha256)",
  usage = [[
usage: qcow2 digest [--algo ALGO] [--snapshot NAME] IMG [ALGO]

Prints the digest (any OpenSSL digest name; default sha256) of the guest
bytes of IMG through its backing chain: the same as hashing the output
of `qemu-img convert -O raw`. --snapshot digests an internal snapshot's
view (by id or name). The image is opened read-only.]],
  options = {
    ["--algo"] = { arg = true }, ["-a"] = { arg = true, alias = "--algo" },
    ["--snapshot"] = { arg = true }, ["-l"] = { arg = true, alias = "--snapshot" },
    ["-U"] = {}, ["--force-share"] = { alias = "-U" },
  },
  run = function(opts, args, ctx)
    if #args < 1 or #args > 2 then util.usage("digest takes IMG [ALGO]") end
    if args[2] and opts["--algo"] then util.usage("give the algorithm once") end
    local algo = opts["--algo"] or args[2] or "sha256"
    local img <close> = util.open(args[1], { key = opts.key, force_share = opts["-U"] or nil })
    local view = img
    if opts["--snapshot"] then view = util.snapshot_view(img, opts["--snapshot"]) end
    -- img:digest is one call with no progress hook: on a terminal, a
    -- status line says what is being hashed until it is done.
    local finish = util.status(ctx, ("%s: %s of %s ..."):format(args[1], algo,
                                                           qcow2.human_size(view.size)))
    local hex = util.check(view:digest(algo))
    finish()
    ctx.out:write(hex, "\n")
    return 0
  end,
}
