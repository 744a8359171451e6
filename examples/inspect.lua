-- A one-page report of an evidence image through the library alone: the
-- header, the backing chain, snapshots, the map, the check verdict, who
-- owns the file's bytes, residue no view reads, and a digest per view.
-- Nothing is written to the image (mode "r").
--   lua5.4 examples/inspect.lua evidence.qcow2
-- (`qcow2 inspect IMAGE [--json]` is the tool's fuller version.)
local qcow2 = require "qcow2"

local path = arg[1]
if not path then io.stderr:write("usage: inspect.lua IMAGE\n") os.exit(2) end
local img <close>, err, code = qcow2.open(path, { mode = "r" })
if not img then io.stderr:write(("%s (%s)\n"):format(err, code)) os.exit(1) end

local h = img:header()
print(("%s: qcow2 v%d, %d bytes virtual, cluster %d"):format(path, h.version, img.size, img.cluster_size))
for kind, list in pairs(h.features) do
  if #list > 0 then print(("  %s features: %s"):format(kind, table.concat(list, ", "))) end
end

print("chain:")
local layer, depth = img, 0
while layer do
  print(("  depth %d %s"):format(depth, layer.path))
  layer, depth = layer:backing(), depth + 1
end

print("snapshots:")
for _, s in ipairs(img:snapshots()) do print("  " .. tostring(s)) end

local map = assert(img:map())
local stats = map:stats()
print(("map: %d extents, data %d, compressed %d, zero %d, unallocated %d, corrupt %d bytes"):format(
  #map, stats.data or 0, stats.compressed or 0, stats.zero or 0, stats.unallocated or 0, stats.corrupt or 0))

local r = assert(img:check())
print(("check: %s, %d corruptions, %d leaks"):format(r.ok and "clean" or "PROBLEMS", r.corruptions, r.leaks))

local per_owner = {}
for _, o in ipairs(assert(img:owners())) do
  per_owner[o.owner] = (per_owner[o.owner] or 0) + o.length
end
local owners = {}
for k in pairs(per_owner) do owners[#owners + 1] = k end
table.sort(owners)
for _, k in ipairs(owners) do print(("owner %-16s %d bytes"):format(k, per_owner[k])) end

for _, res in ipairs(assert(img:residue())) do
  print(("residue %-16s at 0x%x, %d bytes, entropy %.2f"):format(res.kind, res.offset, res.length, res.entropy))
end

local hex, damaged = img:digest("sha256", { on_error = "zero" })
print(("digest active %s%s"):format(hex, #damaged > 0 and (" (%d damaged ranges hashed as zeroes)"):format(#damaged) or ""))
for _, s in ipairs(img:snapshots()) do
  local view <close> = assert(s:open())
  print(("digest snapshot %s %s"):format(s.name, (view:digest("sha256", { on_error = "zero" }))))
end
