-- Image:check reads metadata in few, large reads (issue 14): its pread64
-- count (strace -f -c) on qemu-img-made images with many scattered
-- clusters, against qemu-img check's on the same image and against a bound
-- computed from the image's tables; the results the same as qemu-img's.
-- And the findings, message by message and in qemu-img's order (its
-- stderr), on seeded mutations of images whose COPIED flags the walk
-- checks as it reads the active tables (check_copied.c), with the cases
-- that make it give up and check them in a pass of their own.
local h = require("helpers")
local hostile = require("hostile")

local q = h.q
local KiB = 1024
local COPIED = 1 << 63
local OFFSET_MASK = 0x00fffffffffffe00

-- pread64 calls of a shell command and its children on the file at path
-- (strace -y names each call's file: the interpreter's and a sanitizer's
-- own reads are not counted).
local function preads(dir, cmd, path)
  local out = dir .. "/strace.txt"
  h.must(("strace -f -y -e trace=pread64 -o %s sh -c %s > /dev/null 2>&1 || true")
    :format(q(out), q(cmd)))
  local n, mark = 0, "<" .. path .. ">"
  for line in h.read_file(out):gmatch("[^\n]+") do
    if line:find(mark, 1, true) then n = n + 1 end
  end
  return n
end

-- Our check in a child process: prints corruptions, leaks, check errors,
-- allocated clusters.
local CHILD = [[
local qcow2 = require("qcow2")
local img = assert(qcow2.open(arg[1], { backing = false }))
local r = assert(img:check())
io.write(r.corruptions, " ", r.leaks, " ", r.check_errors, " ", r.allocated_clusters, "\n")
img:close()
]]

-- A seeded list of n distinct guest offsets, aligned to `slot`, in [0, span).
local function scattered(n, span, slot, seed)
  local x, seen, list = seed, {}, {}
  while #list < n do
    x = (x * 6364136223846793005 + 1442695040888963407) & 0x7fffffffffffffff
    local s = (x >> 20) % (span // slot)
    if not seen[s] then seen[s] = true; list[#list + 1] = s * slot end
  end
  return list
end

local function qemu_io_script(path, list, fmt)
  local script = path .. ".qemu-io"
  local f = assert(io.open(script, "w"))
  for _, o in ipairs(list) do f:write(fmt:format(o), "\n") end
  f:close()
  h.must(("qemu-io -t unsafe -f qcow2 %s < %s > /dev/null"):format(q(path), q(script)))
end

-- Active L2 tables and refcount blocks of a pristine image.
local function table_counts(path)
  local hd = hostile.header(path)
  local l2 = 0
  for i = 0, hd.l1_size - 1 do
    if hostile.get64(path, hd.l1_table_offset + 8 * i) & OFFSET_MASK ~= 0 then l2 = l2 + 1 end
  end
  local blocks = 0
  for i = 0, hd.refcount_table_clusters * hd.cluster_size // 8 - 1 do
    if hostile.get64(path, hd.refcount_table_offset + 8 * i) ~= 0 then blocks = blocks + 1 end
  end
  return l2, blocks
end

describe("Image:check's reads", function()
  local dir, child
  setup(function()
    dir = h.tmpdir()
    child = dir .. "/check-child.lua"
    h.write_file(child, CHILD)
  end)
  teardown(function() h.cleanup() end)

  local function ours(path) return ("%s %s %s"):format(h.LUA, q(child), q(path)) end
  local function agree_counts(path)
    local want = h.check_json(path)
    local got = h.must(ours(path))
    assert.are.equal(("%d %d %d %d"):format(want.corruptions or 0, want.leaks or 0,
      want["check-errors"] or 0, want["allocated-clusters"] or 0), (got:gsub("%s+$", "")))
  end

  it("reads each table once on an image with scattered clusters and many refcount blocks", function()
    -- 4 KiB clusters: an L2 table per 2 MiB of guest, a refcount block per
    -- 8 MiB of file; 3,000 clusters written in random guest order lie in
    -- random host order, so the COPIED check looks up refcounts all over
    -- the refcount blocks (one pread per lookup before issue 14's fix)
    local p = dir .. "/scatter.qcow2"
    h.create(p, "4G", "cluster_size=4096")
    qemu_io_script(p, scattered(3000, 4 * 1024 * 1024 * KiB, 4 * KiB, 99), "write -P 0x5a %d 4k")
    local l2, blocks = table_counts(p)
    assert.is_true(l2 > 1000 and blocks > 2, ("%d L2 tables, %d refcount blocks"):format(l2, blocks))
    agree_counts(p)
    local theirs = preads(dir, "qemu-img check " .. q(p), p)
    local mine = preads(dir, ours(p), p)
    -- each table and block once, the header and the L1 table (read at
    -- open and by the check)
    print(("# scattered: %d preads, qemu-img %d; %d L2 tables, %d refcount blocks"):format(mine, theirs, l2, blocks))
    assert.is_true(mine <= l2 + blocks + 16, ("%d preads for %d tables and %d blocks"):format(mine, l2, blocks))
    assert.is_true(mine <= theirs, ("%d preads, qemu-img %d"):format(mine, theirs))
  end)

  it("reads adjacent tables in runs", function()
    -- a zero write over the whole disk allocates L2 tables only (v3 zero
    -- flags), one after the other
    local p = dir .. "/zeroed.qcow2"
    h.create(p, "8G")
    h.must(("qemu-io -f qcow2 -c %s %s > /dev/null"):format(q("write -z -n 0 8G"), q(p)))
    local l2, blocks = table_counts(p)
    assert.is_true(l2 >= 16, l2 .. " L2 tables")
    agree_counts(p)
    local theirs = preads(dir, "qemu-img check " .. q(p), p)
    local mine = preads(dir, ours(p), p)
    print(("# adjacent: %d preads, qemu-img %d; %d L2 tables"):format(mine, theirs, l2))
    -- 1 MiB runs: 16 tables of 64 KiB a read
    assert.is_true(mine <= l2 // 16 + blocks + 16, ("%d preads for %d tables"):format(mine, l2))
    assert.is_true(mine * 4 <= theirs, ("%d preads, qemu-img %d"):format(mine, theirs))
  end)
end)

-- ---------------------------------------------------------------------------
-- Findings in qemu-img's order

local ITERATIONS = tonumber(os.getenv("QCOW2_CHECK_ORDER_ITERATIONS") or "") or 200
local SEED = 20261201
-- a folder failing images are copied to
local KEEP = os.getenv("QCOW2_CHECK_ORDER_KEEP")

-- qemu-img check's messages (stderr, one a line) and exit code.
local function qemu_messages(path)
  -- (not under a sanitizer preloaded for the interpreter: see helpers.sh)
  local p = assert(io.popen(("unset LD_PRELOAD; qemu-img check %s 2>&1 >/dev/null"):format(q(path))))
  local lines = {}
  for line in p:lines() do
    -- the block layer's corruption event and qemu-img's verdict are not
    -- findings
    if not line:find("^qcow2: ") and not line:find("^qemu%-img: ") then lines[#lines + 1] = line end
  end
  local _, _, code = p:close()
  return lines, code
end

local REPORTED = { corruption = true, leak = true, check_error = true }

local function our_messages(qcow2, path)
  local img = qcow2.open(path, { backing = false })
  if not img then return nil end
  local r = img:check()
  img:close()
  if not r then return nil end
  local lines = {}
  for f in r:findings() do
    if REPORTED[f.kind] then lines[#lines + 1] = f.message end
  end
  return lines, r
end

local bases = {
  -- shared clusters: COPIED cleared by the snapshot, set again by a write
  v3_64k = function(p)
    h.create(p, "1M")
    h.qemu_io(p, { "write -P 0x11 0 64k", "write -P 0x22 64k 64k", "write -P 0x33 512k 4k" })
    h.qemu_img("snapshot -c s1 " .. q(p))
    h.qemu_io(p, { "write -P 0x44 0 64k" })
  end,
  -- many L2 tables, two refcount blocks, data in random host order
  v3_4k_scattered = function(p)
    h.create(p, "64M", "cluster_size=4096")
    qemu_io_script(p, scattered(2300, 64 * 1024 * KiB, 4 * KiB, 7), "write -P 0x66 %d 4k")
    h.qemu_img("snapshot -c s1 " .. q(p))
    qemu_io_script(p, scattered(40, 64 * 1024 * KiB, 4 * KiB, 8), "write -P 0x77 %d 4k")
  end,
}
local BASE_NAMES = { "v3_4k_scattered", "v3_64k" }

local function layout(path)
  local hd = hostile.header(path)
  local L = { hd = hd, cs = hd.cluster_size, l1 = {}, l2 = {}, refblocks = {} }
  L.clusters = (hostile.file_size(path) + L.cs - 1) // L.cs
  for i = 0, hd.l1_size - 1 do
    local at = hd.l1_table_offset + 8 * i
    L.l1[#L.l1 + 1] = at
    local t = hostile.get64(path, at) & OFFSET_MASK
    if t ~= 0 then L.l2[#L.l2 + 1] = t end
  end
  for i = 0, 7 do
    local b = hostile.get64(path, hd.refcount_table_offset + 8 * i)
    if b ~= 0 then L.refblocks[#L.refblocks + 1] = { index = i, offset = b } end
  end
  return L
end

local function rnd(a, b) return math.random(a, b) end
local function pick(t) return t[math.random(#t)] end
local function offset_value(L)
  local roll = rnd(1, 6)
  if roll <= 3 then return rnd(0, L.clusters - 1) * L.cs end
  if roll == 4 then return (L.clusters + rnd(0, 4)) * L.cs end
  if roll == 5 then return rnd(0, L.clusters) * L.cs + rnd(1, L.cs - 1) end
  return pick({ L.hd.l1_table_offset, L.hd.refcount_table_offset, L.refblocks[1].offset })
end

local mutators = {
  l1 = function(path, L)
    local at = pick(L.l1)
    local e = hostile.get64(path, at)
    local v = pick({ e ~ COPIED, e ~ COPIED, 0, offset_value(L) | (rnd(0, 1) << 63), e | (1 << rnd(1, 8)) })
    hostile.put64(path, at, v)
  end,
  l2 = function(path, L)
    local t = pick(L.l2)
    local at
    for _ = 1, 16 do   -- an entry in use, mostly
      at = t + 8 * rnd(0, L.cs // 8 - 1)
      if hostile.get64(path, at) ~= 0 then break end
    end
    local e = hostile.get64(path, at)
    local v = pick({ e ~ COPIED, e ~ COPIED, e ~ COPIED, 0, offset_value(L) | (rnd(0, 1) << 63),
                     e | (1 << rnd(1, 8)), e | 1 })
    hostile.put64(path, at, v)
  end,
  refblock = function(path, L)
    local b = pick(L.refblocks)
    local at = (b.offset & ~0x1ff) + 2 * rnd(0, math.min(L.clusters + 2, L.cs // 2 - 1))
    h.poke(path, at, h.be16(pick({ 0, 1, 2, 3, 0xffff })))
  end,
  reftable = function(path, L)
    local b = pick(L.refblocks)
    local v = pick({ 0, rnd(0, L.clusters + 2) * L.cs, L.hd.l1_table_offset, L.l2[1] })
    -- unaligned: QEMU fails the refcount reads of that block only
    if rnd(1, 2) == 1 then v = b.offset + pick({ 512, 4096, L.cs // 2 }) end
    hostile.put64(path, L.hd.refcount_table_offset + 8 * b.index, v)
  end,
}
local MUTATOR_NAMES = { "l1", "l2", "l2", "l2", "refblock", "refblock", "reftable", "reftable" }

describe("Image:check's findings", function()
  local qcow2, work
  setup(function()
    qcow2 = require("qcow2")
    work = h.tmpdir()
  end)
  teardown(function() h.cleanup() end)

  for bi, name in ipairs(BASE_NAMES) do
    it(("come in qemu-img's order on %d mutations of %s"):format(ITERATIONS // #BASE_NAMES, name), function()
      local pristine = work .. "/" .. name .. ".qcow2"
      bases[name](pristine)
      local L = layout(pristine)
      local bytes = h.read_file(pristine)
      local path = work .. "/mutated-" .. name .. ".qcow2"
      local compared, copied, unaligned, failures = 0, 0, 0, {}
      for i = 1, ITERATIONS // #BASE_NAMES do
        math.randomseed(SEED + bi, i)
        h.write_file(path, bytes)
        for _ = 1, rnd(1, 3) do mutators[pick(MUTATOR_NAMES)](path, L) end
        local theirs, code = qemu_messages(path)
        local mine, r = our_messages(qcow2, path)
        if mine and code ~= 1 or (r and r.check_errors > 0) then
          compared = compared + 1
          for _, m in ipairs(theirs) do
            if m:find("OFLAG_COPIED", 1, true) then copied = copied + 1; break end
          end
          for _, m in ipairs(theirs) do
            if m:find("is not cluster aligned; refcount table", 1, true) then unaligned = unaligned + 1; break end
          end
          -- ours keeps the first 10,000 findings and counts the rest
          -- (all kinds: the strict ones among them)
          local differ
          for k = 1, math.max(#theirs, #mine) do
            if theirs[k] ~= mine[k] and not (k > #mine and r.findings_dropped > 0) then
              differ = k
              break
            end
          end
          if differ then
            if KEEP then h.copy(path, ("%s/%s-%d.qcow2"):format(KEEP, name, i)) end
            failures[#failures + 1] = ("iteration %d, message %d of %d (qemu-img) / %d (ours):\n"
              .. "qemu-img: %s\nours:     %s"):format(i, differ, #theirs, #mine,
              tostring(theirs[differ]), tostring(mine[differ]))
          end
        end
      end
      assert(#failures == 0, #failures .. " differ(s):\n" .. table.concat(failures, "\n\n"))
      assert.is_true(compared > ITERATIONS // #BASE_NAMES // 2, compared .. " compared")
      assert.is_true(copied > 0, "no COPIED finding met")
      -- the walk's COPIED check given up (an unaligned refcount block)
      assert.is_true(#L.refblocks > 1 or unaligned > 0, "no unaligned refcount block met")
      print(("# %s: %d compared, %d with COPIED findings, %d with an unaligned refcount block")
        :format(name, compared, copied, unaligned))
    end)
  end
end)
