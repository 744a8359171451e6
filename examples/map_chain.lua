-- Print which layer of a backing chain holds every guest range, with host
-- offsets, and a byte count per type: where the evidence actually lives.
--   lua5.4 examples/map_chain.lua top.qcow2
local qcow2 = require "qcow2"
local img <close> = assert(qcow2.open(assert(arg[1], "usage: map_chain.lua IMAGE")))
local names, layer = {}, img
while layer do names[#names + 1] = layer.path; layer = layer:backing() end
local m = img:map()
for e in m:extents() do
  local where = e.type == "unallocated" and "-" or names[e.depth + 1]
  print(("%14d %14d  %-11s %s%s"):format(e.start, e.length, e.type, where,
    e.offset and (" @0x%x"):format(e.offset) or ""))
end
for kind, bytes in pairs(m:stats()) do print(("%-12s %d bytes"):format(kind, bytes)) end
