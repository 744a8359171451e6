--- qcow2 convert: qemu-img convert to qcow2 or raw (img:convert).
local util = require "qcow2.cli.util"
local create = require "qcow2.cli.create"

-- -l's argument: "snapshot.name=X", "snapshot.id=X" or a bare id or name.
local function snapshot_arg(text)
  local key, value = text:match("^snapshot%.(%a+)=(.*)$")
  if key == "name" or key == "id" then return value end
  if text:match("^[%a_.]+=") then util.fail(("Invalid -l option '%s'"):format(text)) end
  return text
end

return {
  summary = "copy an image (or a snapshot) to a new qcow2 or raw image, as qemu-img convert",
  usage = [==[
usage: qcow2 convert [-O qcow2|raw] [-o OPT=VAL,...] [-c] [-B BACKING [-F FMT]]
                     [-l snapshot.name=NAME] [-t CACHE] [-p] [-q] [-U] IN OUT

Writes IN's guest disk (with its backing chain; or the snapshot -l names)
to OUT, as `qemu-img convert` does: sparse (unallocated and zero ranges
are not written; raw output gets holes), OUT replaced if it exists.
-O is the output format (default qcow2 here; qemu-img's is raw), -o its
create options (-o help lists them), -c writes compressed clusters (on
all cores). -B makes OUT an overlay of BACKING holding only what differs
from it (-F: BACKING's format, probed when absent). -t is OUT's cache
mode: unsafe (the default, as qemu-img's: OUT is not synced), writeback
or writethrough (OUT synced before the command ends). -p shows progress
on a terminal. A failed convert removes OUT.]==],
  options = {
    ["-f"] = { arg = true }, ["-O"] = { arg = true, choices = { "qcow2", "raw" } },
    ["-o"] = { arg = true, multi = true }, ["-c"] = {}, ["-B"] = { arg = true },
    ["-F"] = { arg = true }, ["-l"] = { arg = true }, ["-s"] = { arg = true, alias = "-l" },
    ["-t"] = { arg = true, choices = { "unsafe", "writeback", "writethrough" } },
    ["-p"] = {}, ["-q"] = {}, ["-U"] = {}, ["-n"] = {},
  },
  run = function(opts, args, ctx)
    local copts = create.create_options(ctx, opts["-o"])
    if not copts then return 0 end
    if #args ~= 2 then util.usage("convert takes IN OUT") end
    if opts["-n"] then util.fail("-n (an existing output) is not supported") end
    local format = opts["-O"] or "qcow2"
    if copts.size then util.fail("Invalid parameter 'size'") end
    if format == "raw" and next(copts) then
      util.fail("Invalid options for file format 'raw'")
    end
    if opts["-B"] then
      if format ~= "qcow2" then util.fail("Backing files are supported only with qcow2 output") end
      copts.backing_file, copts.backing_format = opts["-B"], opts["-F"]
    elseif opts["-F"] then
      util.fail("-F needs -B")
    end
    if opts["-c"] and format ~= "qcow2" then
      util.fail("Compression not supported for file format 'raw'")
    end
    local src = util.open(args[1], { force_share = opts["-U"] or nil })
    copts.format = format
    copts.overwrite = true
    copts.compress = opts["-c"] or nil
    copts.cache = opts["-t"]
    if opts["-l"] then copts.snapshot = snapshot_arg(opts["-l"]) end
    local finish = function() end
    if opts["-p"] and not opts["-q"] then
      local update
      update, finish = util.progress(ctx, "convert", src.size)
      copts.progress = function(done) update(done) end
    end
    local ok, res, msg = pcall(src.convert, src, args[2], copts)
    finish()
    src:close()
    if not ok then util.fail(tostring(res):gsub("^[^:]*:%d+: ", "")) end
    util.check(res, msg)
    return 0
  end,
}
