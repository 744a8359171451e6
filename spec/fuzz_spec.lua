-- A seeded random-byte fuzzer over the metadata of small qemu-img images:
-- the header cluster (header, extensions, backing name), the L1 table, the
-- L2 tables, the refcount table and first refcount block, the snapshot
-- table and snapshot L1 tables. Each mutated image is opened, read in full
-- (capped for huge virtual sizes), mapped, its snapshots listed and their
-- views read and mapped. The only acceptable outcomes are success or
-- nil, message, code with a one-line message and a code from the API's set:
-- never a crash, a hang, or a Lua error.
--
-- QCOW2_FUZZ_ITERATIONS  total iterations (default 200; `make fuzz` 2000)
-- QCOW2_FUZZ_SEED        seed (default 20261125); iteration i of a target is
--                        reproducible alone with math.randomseed(seed, i)
-- QCOW2_FUZZ_ONLY        "target:iteration" runs just that one
-- While an iteration runs, /tmp/lua-qcow2-fuzz-last.txt names it and its
-- image (left behind if the process dies); failing images are copied to
-- /tmp/lua-qcow2-fuzz-failures/.
local helpers = require("helpers")
local hostile = require("hostile")

local ITERATIONS = tonumber(os.getenv("QCOW2_FUZZ_ITERATIONS") or "") or 200
local SEED = tonumber(os.getenv("QCOW2_FUZZ_SEED") or "") or 20261125
local ONLY = os.getenv("QCOW2_FUZZ_ONLY")
local STATE = "/tmp/lua-qcow2-fuzz-last.txt"
local FAILDIR = "/tmp/lua-qcow2-fuzz-failures"
local READ_CAP = 8 * 1024 * 1024    -- read the whole disk up to this size
local CHUNK = 1024 * 1024
local ITER_BUDGET = 5                -- CPU seconds per iteration
local q = helpers.q

-- ---------------------------------------------------------------------------
-- Bases: small images with every kind of metadata the reader walks

local bases = {
  -- 4 KiB clusters: L1 of 2 entries, compressed, zero and partial clusters,
  -- a snapshot and a COW after it
  v3_4k = function(d)
    local p = d .. "/v3_4k.qcow2"
    helpers.create(p, "4M", "cluster_size=4096")
    helpers.qemu_io(p, { "write -P 0x11 0 8k", "write -c -P 0x22 16k 4k", "write -z 32k 4k",
                         "write -P 0x33 2M 4k", "write -P 0x44 3146240 1k" })
    helpers.qemu_img("snapshot -c s1 " .. q(p))
    helpers.qemu_io(p, { "write -P 0x55 4k 4k", "write -P 0x66 1M 4k" })
    return p
  end,
  -- 512-byte clusters: an L1 of 8 entries, multi-cluster tables
  small_512 = function(d)
    local p = d .. "/small.qcow2"
    helpers.create(p, "256K", "cluster_size=512")
    helpers.qemu_io(p, { "write -P 0x11 0 2k", "write -P 0x22 40k 1k", "write -c -P 0x33 100k 512",
                         "write -P 0x44 200k 3k" })
    helpers.qemu_img("snapshot -c a " .. q(p))
    helpers.qemu_io(p, { "write -P 0x55 512 512" })
    helpers.qemu_img("snapshot -c b " .. q(p))
    return p
  end,
  v2_64k = function(d)
    local p = d .. "/v2.qcow2"
    helpers.create(p, "2M", "compat=0.10")
    helpers.qemu_io(p, { "write -P 0x11 0 64k", "write -c -P 0x22 128k 64k", "write -P 0x33 1M 4k" })
    helpers.qemu_img("snapshot -c s1 " .. q(p))
    helpers.qemu_io(p, { "write -P 0x44 64k 64k" })
    return p
  end,
  extl2_32k = function(d)
    local p = d .. "/extl2.qcow2"
    helpers.create(p, "2M", "extended_l2=on,cluster_size=32768")
    helpers.qemu_io(p, { "write -P 0x11 0 32k", "write -P 0x22 40k 2k", "write -c -P 0x33 64k 32k",
                         "write -z 128k 4k", "write -P 0x44 1M 1k" })
    helpers.qemu_img("snapshot -c s1 " .. q(p))
    helpers.qemu_io(p, { "write -P 0x55 44k 2k" })
    return p
  end,
  zstd_64k = function(d)
    local p = d .. "/zstd.qcow2"
    helpers.create(p, "2M", "compression_type=zstd")
    helpers.qemu_io(p, { "write -c -P 0x11 0 64k", "write -c -P 0x22 64k 64k", "write -P 0x33 1M 64k" })
    return p
  end,
  backing = function(d)
    local b, p = d .. "/base.qcow2", d .. "/ov.qcow2"
    helpers.create(b, "2M")
    helpers.qemu_io(b, { "write -P 0x11 0 128k", "write -P 0x22 1M 4k" })
    helpers.create(p, "2M", "cluster_size=4096", "base.qcow2")
    helpers.qemu_io(p, { "write -P 0x33 64k 4k", "write -z 1M 4k" })
    return p
  end,
}

local function align_up(v, a) return (v + a - 1) // a * a end

-- Byte ranges {offset, length} of each metadata area of a pristine image.
local function regions(path)
  local h = hostile.header(path)
  local cs = h.cluster_size
  local size = hostile.file_size(path)
  local r = {}
  -- header cluster: the fields, then the extensions and the backing name
  local area_end = h.header_length + 8
  for _, e in ipairs(hostile.extensions(path)) do
    area_end = math.max(area_end, e.offset + 8 + align_up(e.length, 8) + 8)
  end
  if h.backing_file_offset ~= 0 then
    area_end = math.max(area_end, h.backing_file_offset + h.backing_file_size)
  end
  r.header = { { 0, h.header_length }, { 0, h.header_length }, { 0, math.min(area_end, cs) } }
  r.l1 = { { h.l1_table_offset, 8 * h.l1_size } }
  r.l2 = {}
  for i = 0, h.l1_size - 1 do
    local l2 = hostile.get64(path, h.l1_table_offset + 8 * i) & 0x00fffffffffffe00
    if l2 ~= 0 then r.l2[#r.l2 + 1] = { l2, math.min(cs, size - l2) } end
  end
  r.refcount = { { h.refcount_table_offset, math.min(h.refcount_table_clusters * cs,
                                                     size - h.refcount_table_offset) } }
  local rb = hostile.get64(path, h.refcount_table_offset) & ~0x1ff
  if rb ~= 0 then r.refcount[2] = { rb, math.min(cs, size - rb) } end
  if h.nb_snapshots > 0 then
    r.snapshot = {}
    local last = 0
    for _, s in ipairs(hostile.snapshots(path)) do
      last = s.offset + s.length
      r.snapshot[#r.snapshot + 1] = { s.l1_table_offset, 8 * s.l1_size }
    end
    table.insert(r.snapshot, 1, { h.snapshots_offset, last - h.snapshots_offset })
    table.insert(r.snapshot, 1, { h.snapshots_offset, last - h.snapshots_offset })
  end
  for name, list in pairs(r) do
    for i = #list, 1, -1 do
      if list[i][2] <= 0 then table.remove(list, i) end
    end
    if #list == 0 then r[name] = nil end
  end
  return r
end

-- Values that sit on the edges of every check.
local INTERESTING = {
  0, 1, 0x7f, 0x80, 0xff, 0x100, 0x1ff, 0x200, 0x7fff, 0x8000, 0xffff, 0x10000,
  0x7fffffff, 0x80000000, 0xffffffff, 0x100000000, 0x7fffffffffffffff,
  math.mininteger, -1, 1 << 56, (1 << 56) - 512, 1 << 62, (1 << 63) | 0x10000,
  0x00fffffffffffe00,
}

-- A plausible table entry: a real host cluster (or a byte inside one) with
-- a random mix of the COPIED, COMPRESSED and ZERO flags and sector bits.
local function plausible_entry(cluster_size, file_len)
  local clusters = file_len // cluster_size + 2
  local off = math.random(0, clusters) * cluster_size
  local roll = math.random(4)
  if roll == 1 then off = off + math.random(0, cluster_size - 1) end
  local e = off
  if math.random(2) == 1 then e = e | (1 << 63) end
  if math.random(3) == 1 then e = (e | (1 << 62)) & ~(1 << 63) | (math.random(0, 3) << 54) end
  if math.random(4) == 1 then e = e | 1 end
  return e
end

-- One mutation inside one of the ranges; returns a description.
local function mutate(bytes, ranges, cluster_size)
  local r = ranges[math.random(#ranges)]
  local pos = r[1] + math.random(0, r[2] - 1)
  local kind = math.random(7)
  local new
  if kind <= 2 then
    local b = bytes:byte(pos + 1) ~ (1 << math.random(0, 7))
    new = string.char(b)
  elseif kind == 3 then
    new = string.char(math.random(0, 255))
  elseif kind == 4 then
    new = string.char(({ 0, 0xff, 0x80, 0x7f })[math.random(4)])
  elseif kind == 5 then
    pos = pos - pos % 4
    new = string.pack(">I4", INTERESTING[math.random(#INTERESTING)] & 0xffffffff)
  elseif kind == 7 then
    pos = pos - pos % 8
    new = string.pack(">i8", plausible_entry(cluster_size, #bytes))
  else
    pos = pos - pos % 8
    new = string.pack(">i8", INTERESTING[math.random(#INTERESTING)])
  end
  if pos + #new > #bytes then new = new:sub(1, #bytes - pos) end
  if #new == 0 then return bytes, "none" end
  local desc = ("0x%x:%s"):format(pos, (new:gsub(".", function(c) return ("%02x"):format(c:byte()) end)))
  return bytes:sub(1, pos) .. new .. bytes:sub(pos + #new + 1), desc
end

-- ---------------------------------------------------------------------------
-- The outcome contract

local function check_fail(what, msg, code)
  if type(msg) ~= "string" or #msg == 0 then
    error(("%s: message is %s, not a string"):format(what, tostring(msg)), 0)
  end
  if msg:find("[\r\n]") then error(("%s: message is not one line: %q"):format(what, msg), 0) end
  if type(code) ~= "string" or not hostile.CODES[code] then
    error(("%s: code %s is not an API code (msg %q)"):format(what, tostring(code), msg), 0)
  end
end

local EXTENT_TYPES = { data = true, zero = true, unallocated = true, compressed = true,
                       corrupt = true }

local function read_all(img, what)
  local size = img.size
  if math.type(size) ~= "integer" or size < 0 then
    error(("%s: size is %s"):format(what, tostring(size)), 0)
  end
  local spans = {}
  if size <= READ_CAP then
    for off = 0, size - 1, CHUNK do spans[#spans + 1] = { off, math.min(CHUNK, size - off) } end
  else
    spans = { { 0, CHUNK }, { CHUNK, CHUNK }, { size - CHUNK, CHUNK } }
  end
  for _, s in ipairs(spans) do
    local data, msg, code = img:read(s[1], s[2])
    if data == nil then
      check_fail(("%s read 0x%x+%d"):format(what, s[1], s[2]), msg, code)
    elseif type(data) ~= "string" or #data ~= s[2] then
      error(("%s read 0x%x+%d returned %s of %s bytes"):format(what, s[1], s[2], type(data),
        type(data) == "string" and #data or "?"), 0)
    end
  end
  local m, msg, code = img:map()
  if m == nil then
    check_fail(what .. " map", msg, code)
  else
    local n = #m
    for i = 1, math.min(n, 4096) do
      local e = m[i]
      if type(e) ~= "table" or not EXTENT_TYPES[e.type] then
        error(("%s map extent %d has type %s"):format(what, i, type(e) == "table" and tostring(e.type) or type(e)), 0)
      end
      -- a damaged range says why, in one line, as a failed read would
      if e.type == "corrupt" then check_fail(("%s map extent %d"):format(what, i), e.reason, "corrupt") end
    end
  end
end

local function exercise(qcow2, path)
  local img, msg, code = qcow2.open(path)
  if not img then
    check_fail("open", msg, code)
    return "refused"
  end
  local ok, err = pcall(function()
    read_all(img, "image")
    local snaps, smsg, scode = img:snapshots()
    if snaps == nil then return check_fail("snapshots()", smsg, scode) end
    for i = 1, math.min(#snaps, 4) do
      local s = snaps[i]
      local _ = tostring(s)
      local view, vmsg, vcode = s:open()
      if view == nil then
        check_fail("snapshot " .. i .. " open", vmsg, vcode)
      else
        local vok, verr = pcall(read_all, view, "snapshot " .. i)
        view:close()
        if not vok then error(verr, 0) end
      end
    end
  end)
  img:close()
  if not ok then error(err, 0) end
  return "opened"
end

-- ---------------------------------------------------------------------------

describe("fuzzing metadata of small images", function()
  local qcow2
  local work
  local pristine = {}   -- kind -> {dir =, name =, bytes =, regions =}
  setup(function()
    qcow2 = require("qcow2")
    work = helpers.tmpdir()
    os.execute("mkdir -p " .. q(FAILDIR))
  end)
  teardown(function()
    os.remove(STATE)
    helpers.cleanup()
  end)

  local function base(kind)
    if not pristine[kind] then
      local d = work .. "/pristine-" .. kind
      helpers.must("mkdir -p " .. q(d))
      local p = bases[kind](d)
      pristine[kind] = { dir = d, name = p:match("[^/]+$"), bytes = helpers.read_file(p),
                         regions = regions(p), cluster_size = hostile.header(p).cluster_size }
    end
    return pristine[kind]
  end

  -- target list: every base x every metadata area it has
  local TARGET_AREAS = {
    v3_4k = { "header", "l1", "l2", "refcount", "snapshot" },
    small_512 = { "header", "l1", "l2", "refcount", "snapshot" },
    v2_64k = { "header", "l1", "l2", "refcount", "snapshot" },
    extl2_32k = { "header", "l1", "l2", "refcount", "snapshot" },
    zstd_64k = { "header", "l1", "l2", "refcount" },
    backing = { "header", "l1", "l2", "refcount" },
  }
  local targets = {}
  local kinds = {}
  for k in pairs(TARGET_AREAS) do kinds[#kinds + 1] = k end
  table.sort(kinds)
  for _, k in ipairs(kinds) do
    for _, a in ipairs(TARGET_AREAS[k]) do targets[#targets + 1] = { kind = k, area = a } end
  end
  local per_target = math.max(1, ITERATIONS // #targets)

  local totals = { opened = 0, refused = 0 }

  it("every base opens and reads cleanly before fuzzing", function()
    for _, k in ipairs(kinds) do
      local b = base(k)
      for _, a in ipairs(TARGET_AREAS[k]) do
        assert(b.regions[a], ("base %s has no %s area"):format(k, a))
      end
      local img, msg, code = qcow2.open(b.dir .. "/" .. b.name)
      assert(img, ("%s: %s (%s)"):format(k, tostring(msg), tostring(code)))
      local ok, err = pcall(read_all, img, k)
      img:close()
      assert(ok, err)
    end
  end)

  for ti, t in ipairs(targets) do
    local label = t.kind .. ":" .. t.area
    local only_iter
    if ONLY then
      local ok_label, it_no = ONLY:match("^(.-):(%d+)$")
      if ok_label == nil then ok_label = ONLY end
      if ok_label == label then only_iter = tonumber(it_no) end
    end
    if not ONLY or only_iter or ONLY == label then
      it(("%s: %d mutated images give data or nil, msg, code"):format(label, only_iter and 1 or per_target), function()
        local b = base(t.kind)
        local ranges = b.regions[t.area]
        local dir = work .. "/run-" .. ti
        helpers.must("rm -rf " .. q(dir) .. " && cp -a " .. q(b.dir) .. " " .. q(dir))
        local path = dir .. "/" .. b.name
        local failures = {}
        local first, last = 1, per_target
        if only_iter then first, last = only_iter, only_iter end
        for i = first, last do
          math.randomseed(SEED + ti, i)
          local bytes, descs = b.bytes, {}
          for _ = 1, math.random(1, 4) do
            local d
            bytes, d = mutate(bytes, ranges, b.cluster_size)
            descs[#descs + 1] = d
          end
          helpers.write_file(path, bytes)
          local what = ("seed %d target %s iteration %d: %s"):format(SEED, label, i, table.concat(descs, " "))
          helpers.write_file(STATE, what .. "\nimage " .. path .. "\n")
          local t0 = os.clock()
          local ok, res = pcall(exercise, qcow2, path)
          local spent = os.clock() - t0
          if ok and spent > ITER_BUDGET then
            ok, res = false, ("took %.1f s of CPU"):format(spent)
          end
          if ok then
            totals[res] = totals[res] + 1
          else
            local keep = ("%s/%s-%d-%d.qcow2"):format(FAILDIR, label:gsub(":", "-"), SEED, i)
            helpers.copy(path, keep)
            failures[#failures + 1] = ("%s -> %s (image kept as %s; rerun with "
              .. "QCOW2_FUZZ_SEED=%d QCOW2_FUZZ_ONLY=%s:%d)"):format(what, tostring(res), keep, SEED, label, i)
          end
        end
        assert(#failures == 0, #failures .. " failure(s):\n" .. table.concat(failures, "\n"))
      end)
    end
  end

  it("exercised both refusals and successful opens", function()
    -- a fuzzer whose every image is refused (or accepted) tests little
    if ONLY then return end
    print(("# fuzz: seed %d, %d images opened, %d refused"):format(SEED, totals.opened, totals.refused))
    assert(totals.opened > 0, "no mutated image opened")
    assert(totals.refused > 0, "no mutated image was refused")
  end)
end)
