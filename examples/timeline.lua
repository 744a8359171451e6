-- The snapshots of an image in date order, and what changed in the guest
-- disk from each to the next (and from the last to the active disk):
-- a:diff(b) compares the maps first and bytes only where both hold data.
--   lua5.4 examples/timeline.lua evidence.qcow2
local qcow2 = require "qcow2"

local path = arg[1]
if not path then io.stderr:write("usage: timeline.lua IMAGE\n") os.exit(2) end
local img <close> = assert(qcow2.open(path, { mode = "r" }))

local snaps = img:snapshots()
table.sort(snaps, function(a, b)
  if a.date ~= b.date then return a.date < b.date end
  return a.date_nsec < b.date_nsec
end)

local prev, prev_label = nil, nil
local function step(view, label, when)
  print(("%s  %s"):format(when, label))
  if prev then
    local changes = assert(prev:diff(view))
    local bytes = 0
    for _, d in ipairs(changes) do bytes = bytes + d.length end
    print(("  changed since %s: %d ranges, %d bytes"):format(prev_label, #changes, bytes))
    for _, d in ipairs(changes) do
      print(("    0x%x +0x%x"):format(d.start, d.length))
    end
  end
  prev, prev_label = view, label
end

local views = {}
for _, s in ipairs(snaps) do
  local view = assert(s:open())
  views[#views + 1] = view
  step(view, ("snapshot %s (%s)"):format(s.id, s.name),
       os.date("!%Y-%m-%d %H:%M:%S", s.date))
end
step(img, "active disk", "now                ")
for i = #views, 1, -1 do views[i]:close() end
