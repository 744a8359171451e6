-- Image:check and CheckResult, against qemu-img check: counts, JSON and
-- text on clean images of many shapes, the verdict and the counts on
-- images corrupted by precise pokes (shapes of QEMU's iotests 060, 108 and
-- 138), and proof that a read-only check writes nothing.
local h = require("helpers")
local corpus = require("corpus")
local qcow2 = require("qcow2")

local KiB, MiB = corpus.KiB, corpus.MiB

local JSON_KEYS = {
  ["check-errors"] = "check_errors", ["image-end-offset"] = "image_end_offset",
  corruptions = "corruptions", leaks = "leaks",
  ["corruptions-fixed"] = "corruptions_fixed", ["leaks-fixed"] = "leaks_fixed",
  ["total-clusters"] = "total_clusters", ["allocated-clusters"] = "allocated_clusters",
  ["fragmented-clusters"] = "fragmented_clusters",
  ["compressed-clusters"] = "compressed_clusters",
}

-- qemu-img check's human output (stdout only) and exit code.
local function qemu_text(path)
  local p = assert(io.popen("qemu-img check " .. h.q(path) .. " 2>/dev/null"))
  local out = p:read("a")
  local _, _, code = p:close()
  return (out:gsub("\n$", "")), code
end

-- The exit code qemu-img gives a result: 1 errors, 2 corruptions, 3 leaks.
local function verdict(r)
  if r.check_errors > 0 then return 1 end
  if r.corruptions > 0 then return 2 end
  if r.leaks > 0 then return 3 end
  return 0
end

local function our_check(path, opts)
  local img = assert(qcow2.open(path, opts or { backing = false }))
  local r = assert(img:check())
  img:close()
  return r
end

-- Every count equals qemu-img's (absent keys are 0), the JSON decodes to
-- qemu-img's object, the text is qemu-img's, and the verdict matches its
-- exit code. Returns our result and qemu-img's JSON.
local function agree(path, what)
  local want, code, raw = h.check_json(path)
  assert(want, "qemu-img check gave no JSON for " .. path .. ": " .. tostring(raw))
  local before = h.sha256_file(path)
  local r = our_check(path)
  assert.are.equal(before, h.sha256_file(path), "the read-only check changed the file")
  for key, field in pairs(JSON_KEYS) do
    assert.are.equal(math.tointeger(want[key] or 0), r[field], (what or path) .. ": " .. key)
  end
  assert.are.same(want, h.json.decode(r:to_json()))
  assert.are.equal((raw:gsub("%s+$", "")), r:to_json())
  local text, text_code = qemu_text(path)
  assert.are.equal(text, tostring(r))
  assert.are.equal(code, text_code)
  assert.are.equal(code, verdict(r), "verdict")
  assert.are.equal(code == 0, r.ok)
  return r, want
end

-- Findings with their cluster checked against the offset (cluster size cs).
local function findings_of(r, cs, kind)
  local list = {}
  for f in r:findings() do
    assert.are.equal("string", type(f.kind))
    assert.are.equal("string", type(f.message))
    assert.are.equal(f.offset // cs, f.cluster)
    if not kind or f.kind == kind then list[#list + 1] = f end
  end
  return list
end

local function has_message(r, cs, pattern)
  for _, f in ipairs(findings_of(r, cs)) do
    if f.message:find(pattern) then return true end
  end
  return false
end

-- Header fields of a file.
local function l1_offset(p) return h.get_be64(p, 40) end
local function reftable_offset(p) return h.get_be64(p, 48) end
local MASK = 0x00fffffffffffe00

describe("Image:check on clean and crashed images", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  for _, kind in ipairs(corpus.small_kinds) do
    it("agrees with qemu-img check on " .. kind.name, function()
      agree(kind.build(dir), kind.name)
    end)
  end

  it("agrees on an image with internal snapshots and a resize", function()
    agree((corpus.snapshots(dir)))
  end)

  it("agrees on every layer of a backing chain", function()
    local c = corpus.chain(dir)
    agree(c.top)
    agree(c.mid)
    local e = corpus.extended_l2_overlay(dir)
    agree(e.top)
  end)

  it("agrees on a 1 TiB image written across L2 tables", function()
    agree((corpus.huge(dir)))
  end)

  it("counts fragmentation per L2 table, as qemu-img does", function()
    local p = dir .. "/frag.qcow2"
    h.create(p, "1G")
    h.qemu_io(p, { "write 0 64k", "write 1M 64k", "write 512M 64k", "write 511M 64k" })
    local r = agree(p)
    assert.are.equal(1, r.fragmented_clusters)
  end)

  it("agrees on an image with persistent bitmaps", function()
    local p = dir .. "/bitmaps.qcow2"
    h.create(p, "64M")
    h.qemu_io(p, { "write 0 64k", "write 10M 1M" })
    h.qemu_img("bitmap --add " .. h.q(p) .. " bm0")
    h.qemu_img("bitmap --add -g 1M " .. h.q(p) .. " other")
    h.qemu_io(p, { "write 20M 64k" })
    local r = agree(p)
    assert.is_true(r.ok)
  end)

  it("agrees on a LUKS-encrypted image (its header region is refcounted)", function()
    local p = dir .. "/luks.qcow2"
    h.create_luks(p, "4M", "pw")
    -- QEMU needs the key to open it (so its JSON names the options)
    local opts = "driver=qcow2,file.filename=" .. p .. ",encrypt.key-secret=s0"
    h.qemu_io(opts, { "write -P 0x11 0 64k" }, "--object secret,id=s0,data=pw --image-opts")
    local want = h.json.decode(h.qemu_img("check --output=json --object secret,id=s0,data=pw "
      .. "--image-opts " .. h.q(opts)))
    local r = our_check(p, { key = "pw" })
    for key, field in pairs(JSON_KEYS) do
      assert.are.equal(math.tointeger(want[key] or 0), r[field], key)
    end
    assert.is_true(r.ok)
    assert.is_true(r.image_end_offset > 2 * MiB)
  end)

  it("agrees on an image with an external data file", function()
    local p = dir .. "/ext.qcow2"
    -- absolute: QEMU resolves a relative data file name against its working
    -- directory, the library against the image's folder
    h.must("qemu-img create -q -f qcow2 -o " .. h.q("data_file=" .. dir .. "/ext.raw") .. " " .. h.q(p) .. " 4M")
    h.qemu_io(p, { "write -P 0x11 0 128k", "write -z 1M 64k" })
    agree(p)
  end)

  it("gives a result that outlives the image and refuses other types", function()
    local p = corpus.v3(dir)
    local img = assert(qcow2.open(p))
    local r = assert(img:check())
    img:close()
    assert.is_true(r.ok)
    assert.are.equal("qcow2", r.format)
    assert.are.equal(p, r.filename)
    assert.matches("^No errors were found on the image%.", tostring(r))
    assert.has_error(function() r.findings(img) end)
    assert.has_error(function() img:check() end)
  end)
end)

describe("Image:check on corrupted images", function()
  local dir, n = nil, 0
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  -- A 64 MiB v3 image with 64 KiB clusters: header 0, reftable 1,
  -- refblock 2, L1 3, L2 4, data 5 (guest 0) and 6 (guest 64k).
  local function base(opts)
    n = n + 1
    local p = ("%s/c%d.qcow2"):format(dir, n)
    h.create(p, "64M", opts)
    h.qemu_io(p, { "write -P 0x11 0 64k", "write -P 0x22 64k 64k" })
    assert.are.equal(3 * 64 * KiB, l1_offset(p))
    return p
  end
  local function refblock(p) return h.get_be64(p, reftable_offset(p)) & ~0x1ff end
  local function set_refcount(p, cluster, v) h.poke(p, refblock(p) + 2 * cluster, h.be16(v)) end
  local function l2(p) return h.get_be64(p, l1_offset(p)) & MASK end

  -- Verdict and counts against qemu-img; `same` lists the counts that must
  -- be equal (qemu-img and this check look at the same thing there).
  local function judge(p, same)
    local want, code = h.check_json(p)
    local before = h.sha256_file(p)
    local r = our_check(p)
    assert.are.equal(before, h.sha256_file(p), "the read-only check changed the file")
    assert.are.equal(code, verdict(r), "verdict (qemu-img exit code)")
    for _, key in ipairs(same or { "corruptions", "leaks", "check-errors" }) do
      assert.are.equal(math.tointeger(want and want[key] or 0), r[JSON_KEYS[key]], key)
    end
    assert.is_false(r.ok)
    return r, want
  end

  it("reports a zeroed refcount of a data cluster as corruption", function()
    local p = base()
    set_refcount(p, 5, 0)
    local r = judge(p)
    assert.is_true(has_message(r, 64 * KiB, "^ERROR cluster 5 refcount=0 reference=1$"))
    assert.is_true(has_message(r, 64 * KiB, "^ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=0$"))
  end)

  it("reports a raised refcount as a leak only", function()
    local p = base()
    h.qemu_io(p, { "write 128k 64k", "discard 128k 64k" })
    set_refcount(p, 7, 1)
    local r = judge(p)
    assert.are.equal(1, r.leaks)
    assert.are.equal(0, r.corruptions)
    local leaks = findings_of(r, 64 * KiB, "leak")
    assert.are.equal(7, leaks[1].cluster)
    assert.are.equal("Leaked cluster 7 refcount=1 reference=0", leaks[1].message)
    local text = qemu_text(p)
    assert.are.equal(text, tostring(r))
  end)

  it("reports a refcount of 2 on a COPIED cluster as leak and corruption", function()
    local p = base()
    set_refcount(p, 6, 2)
    judge(p)
  end)

  it("reports COPIED cleared in an L2 and in the L1 table", function()
    local p = base()
    local e = h.get_be64(p, l2(p))
    h.poke(p, l2(p), h.be64(e & ~(1 << 63)))
    local l1e = h.get_be64(p, l1_offset(p))
    h.poke(p, l1_offset(p), h.be64(l1e & ~(1 << 63)))
    local r = judge(p)
    assert.are.equal(2, r.corruptions)
    assert.is_true(has_message(r, 64 * KiB, "OFLAG_COPIED L2 cluster: l1_index=0"))
  end)

  it("reports COPIED left on a cluster shared with a snapshot", function()
    local p = base()
    h.qemu_img("snapshot -c s1 " .. h.q(p))
    local e = h.get_be64(p, l2(p) + 8)
    h.poke(p, l2(p) + 8, h.be64(e | (1 << 63)))
    local r = judge(p)
    assert.is_true(has_message(r, 64 * KiB, "refcount=2$"))
  end)

  it("reports an L2 entry pointing at the L1 table (metadata overlap)", function()
    local p = base()
    h.poke(p, l2(p) + 8, h.be64((1 << 63) | l1_offset(p)))
    local r = judge(p)
    assert.is_true(has_message(r, 64 * KiB, "^ERROR cluster 3 refcount=1 reference=2$"))
  end)

  it("reports reserved bits in L1 and L2 entries", function()
    local p = base()
    local e = h.get_be64(p, l2(p))
    h.poke(p, l2(p), h.be64(e | (1 << 56)))
    local r = judge(p)
    assert.is_true(has_message(r, 64 * KiB, "^ERROR found l2 entry with reserved bits set: 8100000000050000$"))
    local q = base()
    local l1e = h.get_be64(q, l1_offset(q))
    h.poke(q, l1_offset(q), h.be64(l1e | (1 << 60)))
    r = judge(q)
    assert.is_true(has_message(r, 64 * KiB, "^ERROR found L1 entry with reserved bits set"))
  end)

  it("reports an unaligned data cluster and an unaligned L2 table", function()
    local p = base()
    local e = h.get_be64(p, l2(p))
    h.poke(p, l2(p), h.be64(e + 0x200))
    local r = judge(p)
    assert.is_true(has_message(r, 64 * KiB, "Data cluster is not properly aligned"))
    local q = base()
    local l1e = h.get_be64(q, l1_offset(q))
    h.poke(q, l1_offset(q), h.be64(l1e + 0x200))
    r = judge(q)
    assert.is_true(has_message(r, 64 * KiB, "Table is not cluster aligned; L1 entry corrupted"))
  end)

  it("reports COPIED on a compressed entry", function()
    local p = base()
    h.qemu_io(p, { "write -c -P 0x33 128k 64k" })
    local e = h.get_be64(p, l2(p) + 16)
    assert.are.equal(1, (e >> 62) & 3)
    h.poke(p, l2(p) + 16, h.be64(e | (1 << 63)))
    local r = judge(p)
    assert.is_true(has_message(r, 64 * KiB, "copied flag must never be set for compressed clusters"))
  end)

  it("reports a data cluster far past the end of the file", function()
    local p = base()
    h.poke(p, l2(p) + 8, h.be64((1 << 63) | (256 * MiB)))
    local r = judge(p)
    assert.is_true(has_message(r, 64 * KiB, "exceeding the end of the file by one cluster or more"))
  end)

  it("handles refcount table entries zeroed, with reserved bits, unaligned", function()
    local p = base()
    h.poke(p, reftable_offset(p), h.be64(0))
    judge(p)
    local q = base()
    h.poke(q, reftable_offset(q), h.be64(refblock(q) | 1))
    local r = judge(q)
    assert.is_true(has_message(r, 64 * KiB, "^ERROR refcount table entry 0 has reserved bits set$"))
    local u = base()
    h.poke(u, reftable_offset(u), h.be64(refblock(u) + 0x200))
    r = judge(u)   -- qemu-img: check errors, exit 1
    assert.are.equal(1, verdict(r))
  end)

  it("reports a refcount block past the end of the file", function()
    local p = base()
    h.poke(p, reftable_offset(p), h.be64(32 * MiB))
    local r = judge(p)
    assert.is_true(has_message(r, 64 * KiB, "^ERROR refcount block 0 is outside image$"))
  end)

  it("reports what qemu-img does not see, marked as stricter", function()
    local p = base()
    set_refcount(p, 100, 1)   -- far past the end of the file
    local want, code = h.check_json(p)
    assert.are.equal(0, code)
    local r = our_check(p)
    assert.is_true(r.ok)
    assert.are.equal(math.tointeger(want["image-end-offset"]), r.image_end_offset)
    local strict = findings_of(r, 64 * KiB, "strict")
    assert.are.equal(1, #strict)
    assert.are.equal(100, strict[1].cluster)
    assert.matches("stricter than qemu%-img", strict[1].message)
  end)

  it("reports a snapshot whose L1 table is unaligned or oversized, as qemu-img does", function()
    for _, poke in ipairs({
      function(p, snap) h.poke(p, snap, h.be64(h.get_be64(p, snap) + 0x200)) end,
      function(p, snap) h.poke(p, snap + 8, h.be32(0x7fffffff)) end,
    }) do
      local p = base()
      h.qemu_img("snapshot -c s1 " .. h.q(p))
      poke(p, h.get_be64(p, 64))
      -- the image opens as in QEMU; the counts agree; only the view fails
      local r = judge(p)
      assert.is_true(has_message(r, 64 * KiB, "snapshot"))
      local img = assert(qcow2.open(p))
      local view, msg, code = img:snapshot("s1"):open()
      assert.is_nil(view)
      assert.are.equal("corrupt", code)
      assert.matches("[Ss]napshot", msg)
      img:close()
    end
  end)
end)

describe("Image:check with repair", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  local function leaky()
    local p = dir .. "/leaky.qcow2"
    h.create(p, "64M")
    h.qemu_io(p, { "write 0 64k", "write 64k 64k", "discard 64k 64k" })
    local rb = h.get_be64(p, h.get_be64(p, 48))
    h.poke(p, rb + 2 * 6, h.be16(1))
    return p
  end

  it("refuses to repair through a read-only handle", function()
    local p = leaky()
    local before = h.sha256_file(p)
    local img = assert(qcow2.open(p))
    local r, msg, code = img:check({ repair = "leaks" })
    img:close()
    assert.is_nil(r)
    assert.are.equal("readonly", code)
    assert.matches("read%-only", msg)
    assert.are.equal(before, h.sha256_file(p))
  end)

  it("frees leaked clusters with repair = \"leaks\" as qemu-img check -r leaks", function()
    local p = leaky()
    local oracle = dir .. "/oracle.qcow2"
    h.copy(p, oracle)
    h.sh("qemu-img check -q -r leaks " .. h.q(oracle))
    local want = h.check_json(oracle)
    local img = assert(qcow2.open(p, { mode = "rw" }))
    local r = assert(img:check({ repair = "leaks" }))
    img:close()
    assert.are.equal(1, r.leaks_fixed)
    assert.are.equal(0, r.leaks)
    assert.is_true(r.ok)
    assert.matches("^The following inconsistencies were found and repaired", tostring(r))
    local after, code = h.check_json(p)
    assert.are.equal(0, code)
    assert.are.same(want["image-end-offset"], after["image-end-offset"])
  end)

  it("repairs leaks with repair = \"all\" too (corruptions: repair_spec)", function()
    local p = leaky()
    local img = assert(qcow2.open(p, { mode = "rw" }))
    local r = assert(img:check({ repair = "all" }))
    img:close()
    assert.is_true(r.ok)
    assert.is_true(r.leaks_fixed > 0)
    assert.are.equal(0, select(2, h.check_json(p)))
    assert.has_error(function()
      local i = assert(qcow2.open(p))
      i:check({ repair = "everything" })
    end)
  end)
end)
