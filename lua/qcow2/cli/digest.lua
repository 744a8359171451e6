--- qcow2 digest: a hex digest of the guest disk (or a snapshot's view).
local util = require "qcow2.cli.util"

return {
  summary = "hex digest of the guest disk (default sha256)",
  usage = [[
usage: qcow2 digest [--algo ALGO] [--snapshot NAME] [--on-error zero|fail] IMG [ALGO]

Prints the digest (any OpenSSL digest name; default sha256) of the guest
bytes of IMG through its backing chain: the same as hashing the output
of `qemu-img convert -O raw`. --snapshot digests an internal snapshot's
view (by id or name). The image is opened read-only.
--on-error fail (default) fails on a range whose metadata is damaged;
--on-error zero hashes such ranges as zeroes and lists them on stderr,
one "unreadable START+LENGTH: REASON" line each.]],
  options = {
    ["--algo"] = { arg = true }, ["-a"] = { arg = true, alias = "--algo" },
    ["--snapshot"] = { arg = true }, ["-l"] = { arg = true, alias = "--snapshot" },
    ["--on-error"] = { arg = true, choices = { "zero", "fail" } },
    ["-U"] = {}, ["--force-share"] = { alias = "-U" },
  },
  run = function(opts, args, ctx)
    if #args < 1 or #args > 2 then util.usage("digest takes IMG [ALGO]") end
    if args[2] and opts["--algo"] then util.usage("give the algorithm once") end
    local algo = opts["--algo"] or args[2] or "sha256"
    local img <close> = util.open(args[1], { key = opts.key, force_share = opts["-U"] or nil })
    local view = img
    if opts["--snapshot"] then view = util.snapshot_view(img, opts["--snapshot"]) end
    local update, finish = util.progress(ctx, ("%s %s"):format(algo, args[1]), view.size)
    local hex, damage = util.check(view:digest(algo, {
      on_error = opts["--on-error"] or "fail", progress = update }))
    finish()
    for _, d in ipairs(damage or {}) do
      ctx.err:write(("qcow2: unreadable 0x%x+0x%x: %s\n"):format(d.start, d.length, d.reason))
    end
    ctx.out:write(hex, "\n")
    return 0
  end,
}
