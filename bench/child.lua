-- The library's side of one bench/run.lua workload, run as its own process
-- (so that its time and peak RSS are measured as qemu's are: a whole
-- process under /usr/bin/time). usage: lua5.4 bench/child.lua WORKLOAD ARGS...
local qcow2 = require "qcow2"

local work, a = arg[1], { table.unpack(arg, 2) }

-- The offsets listed in a file, one by one (streamed, as qemu-io reads
-- its commands: no table of them all in memory).
local function offsets(path)
  local lines = io.lines(path)
  return function()
    local line = lines()
    return line and math.tointeger(tonumber(line))
  end
end

local W = {}

-- 1: the whole disk in 4 MiB calls
function W.seqread(path)
  local img <close> = assert(qcow2.open(path))
  local size, chunk = img.size, 4 << 20
  for off = 0, size - 1, chunk do assert(img:read(off, math.min(chunk, size - off))) end
end

-- 2
function W.digest(path)
  local img <close> = assert(qcow2.open(path))
  io.write(assert(img:digest("sha256")), "\n")
end

-- 3: 4 KiB writes at the offsets listed in a file, in a cache mode
function W.writes(path, list, cache, lazy)
  local img <close> = assert(qcow2.open(path, { mode = "rw", cache = cache,
    lazy_refcounts = lazy == "lazy" or nil }))
  local block = ("\x5a"):rep(4096)
  for off in offsets(list) do assert(img:write(off, block)) end
  assert(img:flush())
end

-- 4
function W.check(path)
  local img <close> = assert(qcow2.open(path))
  local r = assert(img:check())
  assert(r.corruptions == 0 and r.leaks == 0)
end

-- 5: to a file as qemu-img map prints to its stdout
function W.map(path)
  local img <close> = assert(qcow2.open(path))
  assert(img:map():to_json(io.stdout))
end

-- 6
function W.create(path, size)
  local img = assert(qcow2.create(path, { size = math.tointeger(tonumber(size)),
    preallocation = "metadata", overwrite = true }))
  img:close()
end

-- 7
function W.snapshot(path)
  local img <close> = assert(qcow2.open(path, { mode = "rw" }))
  local s = assert(img:create_snapshot("bench"))
  assert(s:delete())
end

-- 8: 4 KiB reads at the offsets listed in a file
function W.randread(path, list)
  local img <close> = assert(qcow2.open(path))
  for off in offsets(list) do assert(img:read(off, 4096)) end
end

-- 9: safe rebase onto another backing file, as qemu-img rebase -b (its
-- default cache mode, writeback)
function W.rebase(path, backing)
  local img <close> = assert(qcow2.open(path, { mode = "rw", cache = "writeback" }))
  assert(img:rebase(backing, { format = "qcow2" }))
end

-- 9: commit into the backing file, as qemu-img commit (writeback)
function W.commit(path)
  local img <close> = assert(qcow2.open(path, { mode = "rw", cache = "writeback" }))
  assert(img:commit())
end

-- 9: measure for a new qcow2 image, printed as qemu-img measure's JSON
local function print_measure(r)
  io.write(('{\n    "bitmaps": %d,\n    "required": %d,\n    "fully-allocated": %d\n}\n')
    :format(r.bitmaps or 0, r.required, r.fully_allocated))
end
function W.measure_from(path)
  print_measure(assert(qcow2.measure { from = path }))
end
function W.measure_size(size)
  print_measure(assert(qcow2.measure { size = math.tointeger(tonumber(size)) }))
end

assert(W[work], "unknown workload " .. tostring(work))(table.unpack(a))
