-- Which layer of a backing chain provides each guest range: the map's
-- depth (0 = the image given, 1 its backing file, ...) named by file.
--   lua5.4 examples/chain.lua top.qcow2
local qcow2 = require "qcow2"

local path = arg[1]
if not path then io.stderr:write("usage: chain.lua IMAGE\n") os.exit(2) end
local img <close> = assert(qcow2.open(path, { mode = "r" }))

local layers, layer = {}, img
while layer do layers[#layers + 1] = layer.path; layer = layer:backing() end
for depth, p in ipairs(layers) do print(("layer %d: %s"):format(depth - 1, p)) end

local per_layer = {}
for e in assert(img:map()):extents() do
  local from = e.type == "unallocated" and "none (reads as zeroes)" or
               ("layer %d %s"):format(e.depth, layers[e.depth + 1])
  print(("0x%012x +0x%-10x %-11s %s"):format(e.start, e.length, e.type, from))
  if e.type ~= "unallocated" then
    per_layer[e.depth] = (per_layer[e.depth] or 0) + e.length
  end
end
for depth = 0, #layers - 1 do
  print(("layer %d provides %d bytes"):format(depth, per_layer[depth] or 0))
end
