-- The raw model of a guest disk for write specs: a sparse raw file that
-- receives the same writes, zero writes, discards and resizes as the image
-- under test, with QEMU's semantics. `qemu-img compare` of the model with
-- the image, and reads through the library, then say whether the image
-- holds what the guest wrote.
--
--   local m = model.new(dir .. "/model.raw", size, { base = backing_raw,
--                       cluster_size = cs, version = 3 })
--   m:write(offset, data); m:zero(offset, length); m:discard(offset, length)
--   m:resize(size); m:read(offset, length)
--   m:compare(image_path)      -- qemu-img compare, true or false, output
--   m:verify(img [, ranges])   -- library reads vs the model
local h = require("helpers")

local M = {}
local Model = {}
Model.__index = Model

local CHUNK = 1 << 20

-- The model file of `size` bytes: a copy of the base's guest bytes (the
-- backing file seen as raw) or all zeroes.
function M.new(path, size, opts)
  opts = opts or {}
  local self = setmetatable({
    path = path, size = size, base = opts.base,
    cluster_size = opts.cluster_size or 65536,
    version = opts.version or 3,
    touched = {},
  }, Model)
  if opts.base then
    h.must("cp --sparse=always " .. h.q(opts.base) .. " " .. h.q(path))
  else
    h.must(": > " .. h.q(path))
  end
  h.must("truncate -s " .. size .. " " .. h.q(path))
  -- qcow2 reads the backing file's bytes past its end as zeroes, and the
  -- model's truncate cut or zero-extended them the same way.
  self.file = assert(io.open(path, "r+b"))
  return self
end

function Model:close()
  if self.file then self.file:close(); self.file = nil end
end

local function note(self, offset, length)
  if length > 0 then self.touched[#self.touched + 1] = { offset, length } end
end

function Model:write(offset, data)
  assert(offset + #data <= self.size, "model write past the end")
  self.file:seek("set", offset)
  self.file:write(data)
  note(self, offset, #data)
end

local ZEROES = string.rep("\0", CHUNK)

function Model:zero(offset, length)
  assert(offset + length <= self.size, "model zero write past the end")
  self.file:seek("set", offset)
  local left = length
  while left > 0 do
    local n = math.min(left, CHUNK)
    self.file:write(n == CHUNK and ZEROES or ZEROES:sub(1, n))
    left = left - n
  end
  note(self, offset, length)
end

-- The whole clusters a discard of [offset, offset+length) drops, as
-- QEMU's block layer cuts the request: the unaligned head and tail are
-- left alone, except that the disk's last, partial cluster counts as
-- whole when the request runs to the end of the disk.
function Model:discard_range(offset, length)
  local cs = self.cluster_size
  local first = (offset + cs - 1) // cs * cs
  local last
  if offset + length == self.size then last = self.size
  else last = (offset + length) // cs * cs end
  if last > first then return first, last - first end
end

-- A discarded cluster reads as zeroes (zero flag on v3, an empty entry
-- without a backing file). On v2 with a backing file QEMU refuses the
-- discard (qcow2_co_pdiscard: no zero flag, so clearing the entry would
-- expose stale backing data) and nothing changes.
function Model:discard(offset, length)
  local first, bytes = self:discard_range(offset, length)
  if not first or (self.base and self.version < 3) then return end
  self:zero(first, bytes)
end

-- Growing reads zeroes past the old end (QEMU never exposes backing data
-- beyond the overlay's old size after a resize); shrinking drops the tail.
function Model:resize(size)
  self.file:flush()
  h.must("truncate -s " .. size .. " " .. h.q(self.path))
  self.size = size
end

function Model:read(offset, length)
  self.file:flush()
  self.file:seek("set", offset)
  local data = self.file:read(length) or ""
  return data .. string.rep("\0", length - #data)
end

-- qemu-img compare -f raw -F qcow2 model image: true when identical.
function Model:compare(image_path)
  self.file:flush()
  local ok, out = h.sh("qemu-img compare -f raw -F qcow2 " .. h.q(self.path)
                       .. " " .. h.q(image_path), true)
  return ok, out
end

-- The first offset in [offset, offset+length) where a and b differ.
local function first_difference(a, b, offset)
  for i = 1, math.max(#a, #b) do
    if a:byte(i) ~= b:byte(i) then return offset + i - 1 end
  end
end

-- Read `ranges` (default: the whole disk) through the library Image and
-- compare with the model. Returns true, or false and a message naming the
-- first differing offset.
function Model:verify(img, ranges)
  if not ranges then
    ranges = {}
    for at = 0, self.size - 1, CHUNK do
      ranges[#ranges + 1] = { at, math.min(CHUNK, self.size - at) }
    end
  end
  for _, r in ipairs(ranges) do
    local want = self:read(r[1], r[2])
    local got, err = img:read(r[1], r[2])
    if not got then
      return false, ("read of %d bytes at %d failed: %s"):format(r[2], r[1], err)
    end
    if got ~= want then
      return false, ("guest offset %d reads differently from the model"):format(
        first_difference(got, want, r[1]) or r[1])
    end
  end
  return true
end

-- Seeded data: slices of one pseudo-random pool (incompressible) or short
-- repeated patterns (compressible), so compressed writes really compress.
local POOL_SIZE = 1 << 20
local pool
local function random_pool()
  if not pool then
    local rng_state = 0x9E3779B9
    local words = {}
    for i = 1, POOL_SIZE // 8 do
      rng_state = (rng_state * 6364136223846793005 + 1442695040888963407)
      words[i] = string.pack("<i8", rng_state)
    end
    pool = table.concat(words)
  end
  return pool
end

-- `length` bytes for write number `n` (any integer): incompressible unless
-- `compressible`.
function M.data(length, n, compressible)
  if compressible then
    local unit = string.format("<%d:%08x>", n, (n * 2654435761) & 0xffffffff)
    return string.rep(unit, length // #unit + 1):sub(1, length)
  end
  local p = random_pool()
  local parts, left = {}, length
  local start = (n * 7919) % (POOL_SIZE - 1) + 1
  while left > 0 do
    local take = math.min(left, POOL_SIZE - start + 1)
    parts[#parts + 1] = p:sub(start, start + take - 1)
    left = left - take
    start = 1
  end
  return table.concat(parts)
end

-- A seeded generator independent of math.random (busted may reseed it):
-- rng(n) gives an integer in [1, n], rng() a float in [0, 1).
function M.rng(seed)
  local x = (seed * 2654435761 + 0x6A09E667) & 0x7fffffffffffffff
  if x == 0 then x = 0x9E3779B97F4A7C15 end
  return function(n)
    x = x ~ (x << 13); x = x ~ (x >> 7); x = x ~ (x << 17)
    local r = (x >> 11) & ((1 << 53) - 1)
    if n then return r % n + 1 end
    return r / (1 << 53)
  end
end

--[[ A seeded random workload for a disk of `size` bytes and clusters of
`cs` bytes: a list of operations

  {kind = "write", offset =, length =, n =, compressible =}
  {kind = "zero", offset =, length =, unmap =}
  {kind = "discard", offset =, length =}
  {kind = "compressed", offset =, length =, n =, compressible =}
  {kind = "flush"}, {kind = "reopen"}

with unaligned offsets and lengths, writes straddling clusters and L2
tables, and rewrites of ranges written before (in place, over compressed
clusters, over zeroes). opts: count (default 40), max_length (cap of one
request, default 512 KiB), reopen (default true), compressed (default
true), discard, zero (default true). ]]
function M.random_ops(seed, size, cs, opts)
  opts = opts or {}
  local rng = M.rng(seed)
  local count = opts.count or 40
  local cap = opts.max_length or (512 * 1024)
  local ops, written = {}, {}
  local full_clusters = size // cs
  -- Clusters any operation touched (here or in opts.avoid): QEMU writes
  -- compressed clusters only where no host cluster is mapped yet
  -- (qcow2_alloc_compressed_cluster_offset fails with EIO otherwise).
  local touched = {}
  local function touch(op)
    if op.offset and op.length > 0 then
      for c = op.offset // cs, (op.offset + op.length - 1) // cs do touched[c] = true end
    end
  end
  for _, op in ipairs(opts.avoid or {}) do touch(op) end
  local function untouched_cluster()
    for _ = 1, 16 do
      local c = rng(full_clusters) - 1
      if not touched[c] then return c end
    end
  end
  local function range(max_len)
    local offset = rng(size) - 1
    local length = math.min(rng(math.max(1, max_len)), size - offset, cap)
    return offset, length
  end
  local function some_length()
    if rng() < 0.7 then return (cs * 5) // 2 end
    return 300 * 1024
  end
  for i = 1, count do
    local roll = rng()
    local op
    local c = roll >= 0.72 and roll < 0.86 and opts.compressed ~= false
              and full_clusters > 0 and untouched_cluster()
    if roll < 0.38 or (roll >= 0.72 and roll < 0.86 and not c) then
      local offset, length = range(some_length())
      op = { kind = "write", offset = offset, length = length, n = seed * 1000 + i,
             compressible = rng() < 0.2 }
    elseif roll < 0.48 and #written > 0 then
      -- rewrite part of an earlier write (in place, COW of shared or
      -- compressed clusters, over zeroes)
      local w = written[rng(#written)]
      local offset = w.offset + rng(w.length) - 1
      local length = math.min(rng(w.length), size - offset, cap)
      op = { kind = "write", offset = offset, length = length, n = seed * 1000 + i }
    elseif roll < 0.62 and opts.zero ~= false then
      local offset, length = range(some_length())
      op = { kind = "zero", offset = offset, length = length, unmap = rng() < 0.5 }
    elseif roll < 0.72 and opts.discard ~= false then
      local offset, length = range(some_length() + cs)
      op = { kind = "discard", offset = offset, length = length }
    elseif c then
      op = { kind = "compressed", offset = c * cs, length = cs, n = seed * 1000 + i,
             compressible = rng() < 0.8 }
    elseif roll < 0.93 then
      op = { kind = "flush" }
    elseif opts.reopen ~= false then
      op = { kind = "reopen" }
    else
      op = { kind = "flush" }
    end
    if op.kind == "write" or op.kind == "compressed" then written[#written + 1] = op end
    touch(op)
    ops[#ops + 1] = op
  end
  return ops
end

function M.op_data(op)
  return M.data(op.length, op.n, op.compressible)
end

function M.describe(op)
  if op.kind == "flush" or op.kind == "reopen" then return op.kind end
  return ("%s %d+%d%s"):format(op.kind, op.offset, op.length,
                               op.unmap and " unmap" or "")
end

-- Apply op to the model.
function Model:apply(op)
  if op.kind == "write" or op.kind == "compressed" then
    self:write(op.offset, M.op_data(op))
  elseif op.kind == "zero" then
    self:zero(op.offset, op.length)
  elseif op.kind == "discard" then
    self:discard(op.offset, op.length)
  end
end

-- Apply op to a library Image (reopen needs `reopen`, a function giving
-- the new Image). Returns the Image to go on with and the call's results.
function M.apply_library(img, op, reopen)
  if op.kind == "write" then
    return img, img:write(op.offset, M.op_data(op))
  elseif op.kind == "compressed" then
    return img, img:write_compressed(op.offset, M.op_data(op))
  elseif op.kind == "zero" then
    return img, img:write_zeroes(op.offset, op.length, { unmap = op.unmap })
  elseif op.kind == "discard" then
    return img, img:discard(op.offset, op.length)
  elseif op.kind == "flush" then
    return img, img:flush()
  elseif op.kind == "reopen" then
    img:close()
    return reopen()
  end
end

-- Whether a failed op is QEMU's documented refusal rather than a bug:
-- discard on a v2 image with a backing file (no zero flag; QEMU's
-- qcow2_co_pdiscard answers ENOTSUP and its block layer drops the
-- request, so the model leaves the data as it was).
function M.refusal_allowed(op, code, version, has_backing)
  return op.kind == "discard" and code == "unsupported" and version < 3
    and has_backing == true
end

-- Assert that op number i succeeded (or was refused as QEMU refuses it).
function M.assert_op(i, op, ok, msg, code, version, has_backing)
  if ok or M.refusal_allowed(op, code, version, has_backing) then return end
  error(("op %d (%s): %s (%s)"):format(i, M.describe(op), tostring(msg),
                                      tostring(code)), 2)
end

-- The same operations as qemu-io commands (data through files in dir).
function M.qemu_io_commands(ops, dir)
  local cmds = {}
  for i, op in ipairs(ops) do
    if op.kind == "write" or op.kind == "compressed" then
      local src = ("%s/op%d.bin"):format(dir, i)
      h.write_file(src, M.op_data(op))
      cmds[#cmds + 1] = ("write %s-s %s %d %d"):format(
        op.kind == "compressed" and "-c " or "", src, op.offset, op.length)
    elseif op.kind == "zero" then
      cmds[#cmds + 1] = ("write -z %s%d %d"):format(op.unmap and "-u " or "",
                                                  op.offset, op.length)
    elseif op.kind == "discard" then
      cmds[#cmds + 1] = ("discard %d %d"):format(op.offset, op.length)
    elseif op.kind == "flush" then
      cmds[#cmds + 1] = "flush"
    end
  end
  return cmds
end

--[[ The crash workload of powercut_spec and faults_spec: allocating
writes, COW over a backing file, zero writes, compressed writes, a discard,
refcount-table growth and a resize, in phases that each end with a flush.
Phases write disjoint guest ranges, so the data of every phase whose flush
reached the disk must read back exactly, whatever happened later.

M.crash_setup(dir) builds base.qcow2 (64 KiB clusters, random data) and
fresh.qcow2 on it (512-byte clusters, 64-bit refcounts: a refcount block
covers 32 KiB and the first refcount table 2 MiB, so the workload's 2+ MiB
of allocations must grow the table), and returns
  { fresh =, base_raw =, size =, phases = {{name =, regions =, run =}...},
    model = function(path) -> Model after every phase,
    always = ranges never written (backing data) }
run(img) returns the results of each call made, as {ok, msg, code} lists. ]]
local K = 1024

function M.crash_setup(dir)
  local base = dir .. "/base.qcow2"
  local size = 2 * K * K
  h.create(base, size, "cluster_size=65536")
  h.write_file(dir .. "/base.bin", M.data(size, 77))
  h.qemu_io(base, { "write -s " .. dir .. "/base.bin 0 " .. size })
  local base_raw = dir .. "/base.raw"
  h.qemu_img("convert -O raw " .. h.q(base) .. " " .. h.q(base_raw))
  local fresh = dir .. "/fresh.qcow2"
  local qcow2 = require("qcow2")
  local img = assert(qcow2.create(fresh, { size = size, cluster_size = 512, refcount_bits = 64,
                                           backing_file = "base.qcow2", backing_format = "qcow2" }))
  img:close()

  local function calls(img_, list)
    local results = {}
    for _, c in ipairs(list) do
      local method = c[1]
      -- a write into the grown area only once the resize worked (after a
      -- failed resize it would be refused as "invalid", rightly)
      if not (c.after_resize and img_.size < c[2] + #c[3]) then
        results[#results + 1] = table.pack(img_[method](img_, table.unpack(c, 2)))
        results[#results].call = method
      end
    end
    return results
  end
  -- Each phase: the calls (method name, then arguments), the guest ranges
  -- they leave defined, and model steps.
  local phases = {
    { name = "COW over the backing file",
      calls = { { "write", 1000, M.data(700, 1) }, { "write", 40000, M.data(3000, 2) } },
      regions = { { 0, 4096 }, { 38912, 6144 } } },
    { name = "allocating write",
      calls = { { "write", 64 * K, M.data(640 * K, 3) } },
      regions = { { 64 * K, 640 * K } } },
    { name = "zero writes",
      calls = { { "write_zeroes", 720 * K, 20 * K }, { "write_zeroes", 745 * K, 10 * K, { unmap = true } },
                { "write_zeroes", 760 * K + 100, 300 } },
      regions = { { 720 * K, 50 * K } } },
    { name = "compressed writes",
      calls = (function()
        local list = {}
        for i = 0, 7 do list[#list + 1] = { "write_compressed", 780 * K + i * 512, M.data(512, 10 + i, true) } end
        return list
      end)(),
      regions = { { 780 * K, 4 * K } } },
    { name = "discard",
      calls = { { "discard", 800 * K, 16 * K } },
      regions = { { 800 * K, 16 * K } } },
    { name = "refcount table growth",
      calls = { { "write", 832 * K, M.data(1100 * K, 4) } },
      regions = { { 832 * K, 1100 * K } } },
    { name = "resize",
      calls = { { "resize", 3 * K * K }, { "write", 2500 * K, M.data(100 * K, 5), after_resize = true } },
      regions = { { 2500 * K, 100 * K }, { 2048 * K, 452 * K } }, grows_to = 3 * K * K },
    { name = "unflushed tail", no_flush = true,
      calls = { { "write", 2900 * K, M.data(50 * K, 6), after_resize = true },
                { "write_zeroes", 1990 * K, 10 * K } },
      regions = { { 2900 * K, 50 * K }, { 1990 * K, 10 * K } } },
  }
  for _, phase in ipairs(phases) do
    phase.run = function(img_) return calls(img_, phase.calls) end
  end

  local function model_after(path)
    local m = M.new(path, size, { base = base_raw, cluster_size = 512, version = 3 })
    for _, phase in ipairs(phases) do
      for _, c in ipairs(phase.calls) do
        if c[1] == "write" or c[1] == "write_compressed" then m:write(c[2], c[3])
        elseif c[1] == "write_zeroes" then m:zero(c[2], c[3])
        elseif c[1] == "discard" then m:discard(c[2], c[3])
        elseif c[1] == "resize" then m:resize(c[2]) end
      end
    end
    return m
  end

  return { fresh = fresh, base_raw = base_raw, size = size, phases = phases,
           model = model_after,
           always = { { 45056, 64 * K - 45056 }, { 816 * K, 16 * K }, { 1932 * K, 58 * K },
                      { 2000 * K, 48 * K } } }
end

-- The cut or fault indexes to try out of 0..n: all of them under
-- QCOW2_SWEEP=full, else the first few, the last few and about `samples`
-- spread evenly between.
function M.sample_indexes(n, samples)
  if os.getenv("QCOW2_SWEEP") == "full" then
    local all = {}
    for k = 0, n do all[#all + 1] = k end
    return all
  end
  local chosen, seen = {}, {}
  local function add(k)
    if k >= 0 and k <= n and not seen[k] then seen[k] = true; chosen[#chosen + 1] = k end
  end
  for k = 0, 3 do add(k) end
  local step = math.max(1, n // samples)
  for k = 4, n, step do add(k + (k * 7) % step) end
  for k = n - 2, n do add(k) end
  table.sort(chosen)
  return chosen
end

-- qemu-img check of a closed image: the decoded result and exit code;
-- `clean` is true when it reports no corruption, no leak and no error.
-- qemu-img runs in the image's folder: QEMU opens an external data file
-- by its stored name relative to the current directory.
function M.check(path)
  local dir, name = path:match("^(.*)/([^/]+)$")
  local ok, out, code = h.sh("cd " .. h.q(dir or ".") .. " && qemu-img check --output=json "
                             .. h.q(name or path))
  local okj, res = pcall(h.json.decode, out)
  res = okj and res or nil
  code = ok and 0 or code
  local clean = code == 0 and res ~= nil and (res.corruptions or 0) == 0
    and (res.leaks or 0) == 0 and (res["check-errors"] or 0) == 0
  return clean, res, code, out
end

return M
