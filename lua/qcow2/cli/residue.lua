--- qcow2 residue: bytes in the file that no view of the disk reads,
-- optionally carved out one file per region.
local qcow2 = require "qcow2"
local util = require "qcow2.cli.util"

local CHUNK = 4 << 20   -- bytes copied at a time when carving

--- The file name a region is carved to: its file offset and kind, e.g.
-- 0x00012000-leaked.bin (at least 8 hex digits, so names sort by offset).
local function carve_name(r)
  return ("0x%08x-%s.bin"):format(r.offset, r.kind)
end

-- Copy the region's bytes (img:raw_read) to dir/name.
local function carve(img, r, dir)
  local path = dir .. "/" .. carve_name(r)
  local f <close> = util.check(io.open(path, "wb"))
  local at, stop = r.offset, r.offset + r.length
  while at < stop do
    local n = math.min(CHUNK, stop - at)
    local data = util.check(img:raw_read(at, n))
    if #data ~= n then util.fail(("%s: short read at 0x%x"):format(img.path, at)) end
    util.check(f:write(data))
    at = at + n
  end
  util.check(f:close())
  return path
end

return {
  summary = "bytes no view of the disk reads (forensics); --carve saves them",
  carve_name = carve_name,
  usage = [[
usage: qcow2 residue [--carve DIR] [--json] [-U] IMG

Lists the byte ranges of the file IMG that no view of the disk (active
disk, snapshots) reads and that are not all zeroes: leaked clusters,
non-zero free clusters, slack after compressed streams, header slack in
cluster 0, data behind zero-flagged entries and the file tail, with
their entropy in bits per byte (img:residue()).
--carve DIR writes each region to DIR/0xOFFSET-KIND.bin (DIR is created
if missing). --json prints the list as a JSON array of {offset, length,
kind, entropy[, file]}. IMG is opened read-only.]],
  options = {
    ["--carve"] = { arg = true },
    ["--json"] = {}, ["--output"] = { arg = true, choices = { "human", "json" } },
    ["-U"] = {}, ["--force-share"] = { alias = "-U" },
  },
  run = function(opts, args, ctx)
    if #args ~= 1 then util.usage("residue takes one image") end
    local img <close>, list = util.open_listing(ctx, opts, args[1], "looking for residue",
                                                "residue")
    local dir = opts["--carve"]
    if dir then
      local ok = os.execute("mkdir -p -- '" .. dir:gsub("'", "'\\''") .. "'")
      if not ok then util.fail(dir .. ": cannot create the folder") end
      local total = 0
      for _, r in ipairs(list) do total = total + r.length end
      local update, done_fn = util.progress(ctx, "carve " .. args[1], total)
      local done = 0
      for _, r in ipairs(list) do
        r.file = carve(img, r, dir)
        done = done + r.length
        update(done)
      end
      done_fn()
    end
    if util.output_format(opts) == "json" then
      ctx.out:write(util.json(list), "\n")
      return 0
    end
    ctx.out:write(("%-18s %-18s %-17s %7s%s\n"):format("Offset", "Length", "Kind",
                  "Entropy", dir and "  File" or ""))
    local sum = 0
    for _, r in ipairs(list) do
      sum = sum + r.length
      ctx.out:write(("0x%016x 0x%016x %-17s %7.3f%s\n"):format(r.offset, r.length,
                    r.kind, r.entropy, r.file and ("  " .. r.file) or ""))
    end
    ctx.out:write(("%d regions, %s (%d bytes)\n"):format(#list, qcow2.human_size(sum), sum))
    return 0
  end,
}
