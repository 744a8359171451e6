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
    timed(function() sh(("qemu-io -r -f qcow2 -c 'read 0 %d' %s"):format(size, path)) end))
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
-- Writes: the same seeded 4 KiB random writes into a fresh 1 GiB image.
do
  local n, offsets, x = 4096, {}, 12345
  for i = 1, n do
    x = (x * 1103515245 + 12345) % 2147483648
    offsets[i] = (x % (1 << 18)) * 4096
  end
  local block = string.rep("\x5a", 4096)
  local lib_path, qemu_path = dir .. "/w-lib.qcow2", dir .. "/w-qemu.qcow2"
  local script = dir .. "/w.cmds"
  local f = assert(io.open(script, "w"))
  for i = 1, n do f:write(("write -P 0x5a %d 4k\n"):format(offsets[i])) end
  f:close()
  row(("%d random 4 KiB writes (1 GiB image)"):format(n),
    timed(function()
      local img = assert(qcow2.create(lib_path, { size = 1 << 30, overwrite = true }))
      for i = 1, n do assert(img:write(offsets[i], block)) end
      img:close()
    end),
    timed(function()
      sh(("rm -f %s && qemu-img create -q -f qcow2 %s 1G && qemu-io -f qcow2 %s < %s > /dev/null")
        :format(qemu_path, qemu_path, qemu_path, script))
    end))
end

-- Lifecycle: convert to raw, convert compressed, compare (a plain image
-- against a copy with other clusters, so every byte is compared).
do
  local img <close> = assert(qcow2.open(plain))
  local out = dir .. "/conv.out"
  row("convert qcow2 -> raw (plain)",
    timed(function() assert(img:convert(out, { format = "raw", overwrite = true })) end),
    timed(function() sh(("qemu-img convert -O raw %s %s"):format(plain, out)) end))
  row("convert -> qcow2 compressed (plain)",
    timed(function() assert(img:convert(out, { compress = true, overwrite = true })) end),
    timed(function() sh(("qemu-img convert -c -O qcow2 %s %s"):format(plain, out)) end))
  local copy = dir .. "/copy.qcow2"
  sh(("qemu-img convert -O qcow2 -o cluster_size=4096 %s %s"):format(plain, copy))
  row("compare (plain vs a 4K-cluster copy)",
    timed(function() assert(qcow2.compare(img, copy) == true) end),
    timed(function() sh(("qemu-img compare %s %s"):format(plain, copy)) end))
  os.remove(out)
end

-- Memory: peak resident size of this process (the library's side of every
-- workload above) against qemu-img map and qemu-io read of the plain image.
local function peak_kib(status_file)
  for line in io.lines(status_file) do
    local kib = line:match("^VmHWM:%s+(%d+)")
    if kib then return tonumber(kib) end
  end
end
local qemu_peak = tonumber((sh(("command -v /usr/bin/time >/dev/null && /usr/bin/time -f %%M qemu-io -r -f qcow2 -c 'read 0 %dM' %s 2>&1 >/dev/null | tail -n 1 || echo 0")
  :format(size_mb, plain)):match("(%d+)%s*$"))) or 0
print(("peak RSS: library process %d KiB%s"):format(peak_kib("/proc/self/status"),
  qemu_peak > 0 and (", qemu-io whole-disk read %d KiB"):format(qemu_peak) or " (install GNU time for qemu-io's)"))
os.execute("rm -rf " .. dir)
