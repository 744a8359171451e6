-- Digest every view of an evidence image (the active disk, each internal
-- snapshot, each backing layer on its own), then prove that doing so
-- changed no file: hash, size and modification time of the image and its
-- backing files, before and after.
--   lua5.4 examples/evidence.lua evidence.qcow2
local qcow2 = require "qcow2"

local path = arg[1]
if not path then io.stderr:write("usage: evidence.lua IMAGE\n") os.exit(2) end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end
local function sh(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("a")
  assert(p:close(), cmd)
  return (out:gsub("%s+$", ""))
end

-- sha256, size and mtime (ns) of a file, by coreutils: not by the library
-- under test.
local function fingerprint(file)
  local hash = sh("sha256sum -- " .. q(file)):match("^(%x+)")
  local size, mtime = sh("stat -c '%s %.9Y' -- " .. q(file)):match("^(%d+) (%S+)$")
  return { hash = hash, size = tonumber(size), mtime = mtime }
end

-- The files of the chain, opened without following anything but plain
-- names (the library's default policy), read-only.
local files = {}
do
  local img <close> = assert(qcow2.open(path, { mode = "r" }))
  local layer = img
  while layer do files[#files + 1] = layer.path; layer = layer:backing() end
end

local before = {}
for i, f in ipairs(files) do
  before[i] = fingerprint(f)
  print(("before  %s  %d bytes  mtime %s  %s"):format(before[i].hash, before[i].size, before[i].mtime, f))
end

do
  local img <close> = assert(qcow2.open(path, { mode = "r" }))
  print(("view    %s  active"):format((img:digest("sha256", { on_error = "zero" }))))
  for _, s in ipairs(img:snapshots()) do
    local view <close> = assert(s:open())
    print(("view    %s  snapshot %s (%s)"):format((view:digest("sha256", { on_error = "zero" })), s.id, s.name))
  end
  local layer, depth = img:backing(), 1
  while layer do
    print(("view    %s  backing layer %d %s"):format((layer:digest("sha256", { on_error = "zero" })), depth, layer.path))
    layer, depth = layer:backing(), depth + 1
  end
end

local same = true
for i, f in ipairs(files) do
  local after = fingerprint(f)
  print(("after   %s  %d bytes  mtime %s  %s"):format(after.hash, after.size, after.mtime, f))
  local b = before[i]
  if after.hash ~= b.hash or after.size ~= b.size or after.mtime ~= b.mtime then same = false end
end
print(same and "unchanged: every file has the same hash, size and mtime"
           or "CHANGED: a file differs from before")
os.exit(same and 0 or 1)
