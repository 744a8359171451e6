-- make bench: the library and qemu-img on the same workloads, side by side.
-- Prints wall-clock seconds for each and the ratio qemu-img / library
-- (above 1 = the library is faster). Never part of make test.
local qcow2 = require "qcow2"

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  if not p:close() then error("command failed: " .. cmd .. "\n" .. out) end
  return out
end
local function now() return tonumber(sh("date +%s.%N")) end
local function timed(fn)
  local best = math.huge
  for _ = 1, 3 do
    local t0 = now(); fn(); best = math.min(best, now() - t0)
  end
  return best
end

local dir = sh("mktemp -d /tmp/lua-qcow2-bench.XXXXXX"):gsub("%s+$", "")
local size_mb = tonumber(os.getenv("BENCH_MB") or "512")
local plain, comp, frag = dir .. "/plain.qcow2", dir .. "/comp.qcow2", dir .. "/frag.qcow2"
sh(("qemu-img create -q -f qcow2 %s %dM"):format(plain, size_mb))
sh(("qemu-io -f qcow2 -c 'write -P 0x5a 0 %dM' %s"):format(size_mb, plain))
sh(("qemu-img convert -c -O qcow2 %s %s"):format(plain, comp))
-- A fragmented image: 4 KiB clusters written in a scattered order.
sh(("qemu-img create -q -f qcow2 -o cluster_size=4096 %s %dM"):format(frag, size_mb // 4))
local cmds = {}
for i = 0, 2047 do cmds[#cmds + 1] = ("-c 'write -P %d %d 4k'"):format(i % 251, ((i * 7919) % 2048) * 8192) end
sh(("qemu-io -f qcow2 %s %s"):format(table.concat(cmds, " "), frag))

local rows = {}
local function row(name, lib, qemu)
  rows[#rows + 1] = ("%-44s lib %8.3fs  qemu-img %8.3fs  ratio %6.2f"):format(name, lib, qemu, qemu / lib)
  print(rows[#rows])
end

for _, case in ipairs({ { "plain", plain }, { "compressed", comp }, { "fragmented 4K", frag } }) do
  local name, path = case[1], case[2]
  local img <close> = assert(qcow2.open(path))
  local size = img.size
  row(("read whole disk (%s)"):format(name),
    timed(function()
      local chunk = 4 << 20
      for off = 0, size - 1, chunk do img:read(off, math.min(chunk, size - off)) end
    end),
    timed(function() sh(("qemu-io -f qcow2 -c 'read 0 %d' %s"):format(size, path)) end))
  row(("sha256 of guest disk (%s)"):format(name),
    timed(function() img:digest("sha256") end),
    -- qemu-img's way to hash a guest disk: export it raw, then hash it
    timed(function()
      sh(("qemu-img convert -O raw %s %s/export.raw && sha256sum %s/export.raw && rm -f %s/export.raw")
        :format(path, dir, dir, dir))
    end))
  row(("map --output=json (%s)"):format(name),
    timed(function() img:map():to_json() end),
    timed(function() sh(("qemu-img map --output=json %s > /dev/null"):format(path)) end))
end
os.execute("rm -rf " .. dir)
