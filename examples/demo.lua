-- make demo: build a sample image with a backing file, internal snapshots,
-- compressed and zero clusters (qemu-img/qemu-io make it), then print a
-- report of it read through the library. Run from the repo root after make.
local qcow2 = require "qcow2"

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  if not ok then error("command failed: " .. cmd .. "\n" .. out) end
  return out
end

local dir = os.getenv("DEMO_DIR") or sh("mktemp -d /tmp/lua-qcow2-demo.XXXXXX"):gsub("%s+$", "")
local base, top = dir .. "/base.qcow2", dir .. "/disk.qcow2"

local function io_cmds(path, cmds)
  local args = {}
  for _, c in ipairs(cmds) do args[#args + 1] = "-c '" .. c .. "'" end
  sh("qemu-io -f qcow2 " .. table.concat(args, " ") .. " " .. path)
end

sh("qemu-img create -q -f qcow2 -o cluster_size=65536 " .. base .. " 64M")
io_cmds(base, { "write -P 0x42 0 1M", "write -c -P 0x17 2M 64k", "write -c -P 0x18 2112k 64k" })
sh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 " .. top)
io_cmds(top, { "write -P 0x61 512k 128k", "write -z 768k 64k" })
sh("qemu-img snapshot -c before-update " .. top)
io_cmds(top, { "write -P 0x62 4M 256k", "write -c -P 0x63 8M 64k", "discard 512k 64k" })
sh("qemu-img snapshot -c after-update " .. top)

local img <close> = assert(qcow2.open(top))
local function mib(n) return ("%.2f MiB"):format(n / 1048576) end

print(("lua-qcow2 %s report: %s"):format(qcow2.version, top))
print(tostring(img))
local info = img:info()
print(("  format %s, compat %s, virtual size %s, cluster size %d, file %s on disk"):format(
  info.format, info["format-specific"].data.compat, mib(info["virtual-size"]),
  info["cluster-size"], mib(info["actual-size"])))

print("\nBacking chain:")
local layer, depth = img, 0
while layer do
  print(("  depth %d  %-40s %s, %s"):format(depth, layer.path, layer.version and ("v" .. layer.version) or "raw", mib(layer.size)))
  layer, depth = layer:backing(), depth + 1
end

print("\nGuest map (depth 0 = this image):")
local m = img:map()
for e in m:extents() do
  print(("  %10d +%-10d %-12s depth %d%s"):format(e.start, e.length, e.type, e.depth,
    e.offset and (" host 0x%x"):format(e.offset) or ""))
end
local st = m:stats()
print(("  bytes: data %s, compressed %s, zero %s, unallocated %s"):format(
  mib(st.data or 0), mib(st.compressed or 0), mib(st.zero or 0), mib(st.unallocated or 0)))

print("\nInternal snapshots:")
for _, s in ipairs(img:snapshots()) do
  print("  " .. tostring(s))
  local view <close> = s:open()
  print(("    disk at snapshot: sha256 %s"):format(view:digest("sha256")))
end

print("\nActive disk: sha256 " .. img:digest("sha256"))
local l1 = img:l1()
print(("L1 table: %d entries, first 0x%x; refcount of host cluster 0 (header): %d"):format(
  #l1, l1[1] or 0, img:refcount(0)))
local r = img:check()
print(("Consistency check: %s (%d corruptions, %d leaks; %d/%d clusters allocated, %d compressed)"):format(
  r.ok and "clean" or "PROBLEMS", r.corruptions, r.leaks, r.allocated_clusters,
  r.total_clusters, r.compressed_clusters))

-- The same image through the tool: `qcow2 inspect` (its module, run as
-- the installed `qcow2` script runs it).
print("\n$ qcow2 inspect " .. top)
io.stdout:flush()
local status = require("qcow2.cli").main({ "inspect", top })
if status ~= 0 then error("qcow2 inspect failed with status " .. status) end
print(("\nImages kept in %s"):format(dir))
