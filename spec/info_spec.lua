-- Image:info, the Image fields, Image:header, qcow2.probe and the raw
-- table accessors, against qemu-img info and the bytes of the file.
local h = require("helpers")
local corpus = require("corpus")
local qcow2 = require("qcow2")

local KiB, MiB = corpus.KiB, corpus.MiB

-- The path a (possibly relative, possibly "a/../b") name resolves to.
local function realpath(p)
  return (h.must("realpath -m " .. h.q(p)):gsub("%s+$", ""))
end

-- Every key qemu-img prints must be in ours with the same value, except
-- actual-size, compared with the file's allocated blocks (st_blocks * 512,
-- as qemu-img computes it) at the time of the call. full-backing-filename:
-- qemu-img joins the folder of the path it was given and the stored name
-- without normalising ("/d/sub/../b.qcow2"); opened by the same path, ours
-- must be that string (and always name the same file).
local function agree(want, got, path, where)
  where = where or "info"
  assert.are.equal("table", type(got), where .. " is a table")
  for k, v in pairs(want) do
    local here = where .. "[" .. tostring(k) .. "]"
    if k == "actual-size" then
      assert.are.equal(corpus.allocated_size(path), got[k], here)
    elseif k == "full-backing-filename" then
      assert.are.equal("string", type(got[k]), here)
      assert.are.equal(realpath(v), realpath(got[k]), here)
      assert.are.equal(v, got[k], here)
    elseif type(v) == "table" then
      agree(v, got[k], path, here)
    else
      if type(v) == "number" then v = math.tointeger(v) or v end
      assert.are.equal(v, got[k], here)
    end
  end
end

local function check_info(path, opts, extra)
  local want = h.info_json(path, extra)
  local img = assert(qcow2.open(path, opts))
  agree(want, img:info(), path)
  img:close()
  return want
end

describe("Image:info", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  for _, kind in ipairs(corpus.small_kinds) do
    it("agrees with qemu-img info on " .. kind.name, function()
      check_info(kind.build(dir))
    end)
  end

  it("reports the dirty flag of a lazy-refcount image left by a killed writer", function()
    local want = check_info(corpus.lazy_dirty(dir))
    assert.is_true(want["dirty-flag"])
    assert.is_true(want["format-specific"].data["lazy-refcounts"])
  end)

  it("reports the corrupt bit in format-specific data", function()
    local want = check_info(corpus.corrupt_bit(dir))
    assert.is_true(want["format-specific"].data.corrupt)
  end)

  it("agrees on every layer of a raw <- qcow2 <- qcow2 chain", function()
    local chain = corpus.chain(dir)
    local want = check_info(chain.top)
    assert.are.equal("chain-mid.qcow2", want["backing-filename"])
    assert.are.equal("qcow2", want["backing-filename-format"])
    want = check_info(chain.mid)
    assert.are.equal("raw", want["backing-filename-format"])
    -- the raw base, as the chain's own Image
    local top = assert(qcow2.open(chain.top))
    local base = top:backing():backing()
    agree(h.info_json(chain.base, "-f raw"), base:info(), chain.base, "base info")
    top:close()
  end)

  it("gives full-backing-filename as qemu-img does when opened by a relative path", function()
    local chain = corpus.chain(dir)
    local sub = dir .. "/sub"
    h.must("mkdir -p " .. h.q(sub))
    h.create(sub .. "/ov.qcow2", 4 * MiB, nil, "../chain-top.qcow2", "qcow2")
    local rel = (h.must("realpath -s --relative-to=. " .. h.q(sub .. "/ov.qcow2")):gsub("%s+$", ""))
    assert.are.equal(".", rel:sub(1, 1)) -- relative to the current folder
    local want = h.info_json(rel)
    assert.are.equal("../chain-top.qcow2", want["backing-filename"])
    local img = assert(qcow2.open(rel))
    agree(want, img:info(), rel)
    assert.are.equal(realpath(chain.top), realpath(img:info()["full-backing-filename"]))
    img:close()
  end)

  it("agrees on overlays on backing files shorter than themselves", function()
    local s = corpus.short_backing(dir)
    check_info(s.top)
    check_info(s.rtop)
  end)

  it("agrees with the raw backing file's info, whose size is not a multiple of 512", function()
    local s = corpus.short_backing(dir)
    local top = assert(qcow2.open(s.rtop))
    agree(h.info_json(s.rbase, "-f raw"), top:backing():info(), s.rbase, "raw base info")
    top:close()
  end)

  it("lists snapshots with qemu-img's fields", function()
    local path = corpus.snapshots(dir)
    local want = check_info(path)
    assert.are.equal(3, #want.snapshots)
  end)

  it("agrees on a 1 TiB image", function()
    check_info((corpus.huge(dir)))
  end)

  it("agrees on an extended-L2 overlay", function()
    check_info(corpus.extended_l2_overlay(dir).top)
  end)
end)

describe("Image fields", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  it("match qemu-img's size, cluster size and compat for v2 and v3 images", function()
    for _, c in ipairs({ { corpus.v2(dir), 2 }, { corpus.v3(dir, 512), 3 }, { corpus.v3(dir, 2 * MiB), 3 } }) do
      local path, version = c[1], c[2]
      local info = h.info_json(path)
      assert.are.equal(version == 2 and "0.10" or "1.1", info["format-specific"].data.compat)
      local img = assert(qcow2.open(path))
      assert.are.equal(math.tointeger(info["virtual-size"]), img.size)
      assert.are.equal(math.tointeger(info["cluster-size"]), img.cluster_size)
      assert.are.equal(version, img.version)
      assert.are.equal(path, img.path)
      assert.is_true(img.read_only)
      assert.is_nil(img.backing_file)
      img:close()
    end
  end)

  it("name the backing file as stored, and read_only is true in the default mode", function()
    local chain = corpus.chain(dir)
    local img = assert(qcow2.open(chain.top))
    assert.are.equal(h.info_json(chain.top)["backing-filename"], img.backing_file)
    assert.is_true(img.read_only)
    assert.are.equal(h.info_json(chain.mid)["backing-filename"], img:backing().backing_file)
    img:close()
  end)
end)

describe("qcow2.probe", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  it("names qcow2 files and their version, and raw files as raw", function()
    local fmt, version = qcow2.probe(corpus.v2(dir))
    assert.are.equal("qcow2", fmt)
    assert.are.equal(2, version)
    fmt, version = qcow2.probe(corpus.v3(dir, 4 * KiB))
    assert.are.equal("qcow2", fmt)
    assert.are.equal(3, version)
    local raw = corpus.random_file(dir .. "/r.raw", 8192)
    assert.are.equal(h.info_json(raw)["format"], (qcow2.probe(raw)))
  end)

  it("fails with notfound for a missing file", function()
    local fmt, msg, code = qcow2.probe(dir .. "/missing.qcow2")
    assert.is_nil(fmt)
    assert.are.equal("string", type(msg))
    assert.are.equal("notfound", code)
  end)
end)

describe("Image:header", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  local fields = {
    { "magic", 0, 4 }, { "version", 4, 4 }, { "backing_file_offset", 8, 8 },
    { "backing_file_size", 16, 4 }, { "cluster_bits", 20, 4 }, { "size", 24, 8 },
    { "crypt_method", 32, 4 }, { "l1_size", 36, 4 }, { "l1_table_offset", 40, 8 },
    { "refcount_table_offset", 48, 8 }, { "refcount_table_clusters", 56, 4 },
    { "nb_snapshots", 60, 4 }, { "snapshots_offset", 64, 8 },
  }
  local v3_fields = {
    { "incompatible_features", 72, 8 }, { "compatible_features", 80, 8 },
    { "autoclear_features", 88, 8 }, { "refcount_order", 96, 4 }, { "header_length", 100, 4 },
  }

  local function check(path, version)
    local img = assert(qcow2.open(path))
    local hd = img:header()
    local all = {}
    for _, f in ipairs(fields) do all[#all + 1] = f end
    if version == 3 then for _, f in ipairs(v3_fields) do all[#all + 1] = f end end
    for _, f in ipairs(all) do
      local name, off, len = f[1], f[2], f[3]
      local want = string.unpack(len == 8 and ">I8" or ">I4", h.peek(path, off, len))
      assert.are.equal(want, hd[name], path .. ": " .. name)
    end
    assert.are.equal("table", type(hd.extensions))
    img:close()
    return hd
  end

  it("gives every raw header field as stored in a v3 file", function()
    local hd = check(corpus.snapshots(dir), 3)
    assert.are.equal(3, hd.nb_snapshots)
  end)

  it("gives every raw header field as stored in a v2 file", function()
    check(corpus.v2(dir), 2)
  end)

  it("gives the incompatible and autoclear bits exactly as poked", function()
    local hd = check(corpus.corrupt_bit(dir), 3)
    assert.are.equal(2, hd.incompatible_features & 2)
    hd = check(corpus.unknown_autoclear(dir), 3)
    assert.are.equal(0x20, hd.autoclear_features)
  end)

  it("lists header extensions with their magic, length and data as in the file", function()
    local chain = corpus.chain(dir)
    local path = chain.top
    local img = assert(qcow2.open(path))
    local exts = img:header().extensions
    img:close()
    -- walk the extensions in the file: they follow the header (v3: header_length)
    local off = h.get_be32(path, 100)
    local want = {}
    while true do
      local magic, len = h.get_be32(path, off), h.get_be32(path, off + 4)
      if magic == 0 then break end
      want[#want + 1] = { magic = magic, length = len, data = h.peek(path, off + 8, len) }
      off = off + 8 + (len + 7) // 8 * 8
    end
    assert.is_true(#want >= 2) -- backing format and feature names
    assert.are.equal(#want, #exts)
    for i, e in ipairs(want) do
      assert.are.equal(e.magic, exts[i].magic)
      assert.are.equal(e.length, exts[i].length)
      assert.are.equal(e.data, exts[i].data)
    end
  end)
  it("gives the snapshot table's size and each entry's extra data as in the file", function()
    local path = corpus.snapshots(dir)
    local img = assert(qcow2.open(path))
    local hd = img:header()
    img:close()
    -- walk the table in the file (format doc: 40 fixed bytes, extra data,
    -- id, name, padding to 8)
    local off = h.get_be64(path, 64)
    local want, pos = {}, off
    for _ = 1, h.get_be32(path, 60) do
      pos = (pos + 7) // 8 * 8
      local id_size, name_size = string.unpack(">I2I2", h.peek(path, pos + 12, 4))
      local extra_size = h.get_be32(path, pos + 36)
      local extra = h.peek(path, pos + 40, extra_size)
      want[#want + 1] = {
        offset = pos, length = 40 + extra_size + id_size + name_size,
        extra_data_size = extra_size, extra_data = extra,
        id = h.peek(path, pos + 40 + extra_size, id_size),
        name = h.peek(path, pos + 40 + extra_size + id_size, name_size),
      }
      pos = pos + 40 + extra_size + id_size + name_size
    end
    assert.are.equal(3, #want)
    assert.are.equal(pos - off, hd.snapshot_table_size)
    assert.are.same(want, hd.snapshots)
    -- the extra data QEMU writes: vm_state_size, disk_size, icount
    for i, size in ipairs({ 4 * MiB, 4 * MiB, 6 * MiB }) do
      assert.is_true(hd.snapshots[i].extra_data_size >= 24)
      assert.are.equal(size, (string.unpack(">I8", hd.snapshots[i].extra_data, 9)))
    end
  end)

  it("gives an empty snapshot list and a zero table size without snapshots", function()
    local img = assert(qcow2.open(corpus.v3(dir, 64 * KiB)))
    local hd = img:header()
    img:close()
    assert.are.equal(0, hd.snapshot_table_size)
    assert.are.same({}, hd.snapshots)
  end)
end)

describe("Image:l1, Image:l2 and Image:refcount", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  it("give the raw table entries stored in the file", function()
    local path = corpus.v3(dir, 4 * KiB)
    local cs = 4 * KiB
    local l1_size, l1_off = h.get_be32(path, 36), h.get_be64(path, 40)
    local img = assert(qcow2.open(path))
    local l1 = img:l1()
    assert.are.equal(l1_size, #l1)
    local used = 0
    for i = 0, l1_size - 1 do
      local entry = h.get_be64(path, l1_off + 8 * i)
      assert.are.equal(entry, l1[i + 1], "L1[" .. i .. "]")
      local l2_off = entry & 0x00FFFFFFFFFFFE00
      if l2_off ~= 0 then
        used = used + 1
        local l2 = img:l2(i)
        assert.are.equal(cs // 8, #l2)
        for j = 0, cs // 8 - 1 do
          assert.are.equal(h.get_be64(path, l2_off + 8 * j), l2[j + 1], ("L2[%d][%d]"):format(i, j))
        end
      end
    end
    assert.is_true(used >= 2)
    -- refcounts (16 bits): walk the refcount table in the file
    local rt_off = h.get_be64(path, 48)
    local per_block = cs // 2
    local fsize = #h.read_file(path)
    for host_cluster = 0, fsize // cs - 1 do
      local block = h.get_be64(path, rt_off + 8 * (host_cluster // per_block))
      local want = 0
      if block ~= 0 then
        want = string.unpack(">I2", h.peek(path, block + 2 * (host_cluster % per_block), 2))
      end
      assert.are.equal(want, img:refcount(host_cluster), "refcount of host cluster " .. host_cluster)
    end
    img:close()
  end)

  it("index L2 tables by the format's L1 index: img:l2(i) is the table l1()[i + 1] points at", function()
    local path = dir .. "/second-l1.qcow2"
    local cs = 4 * KiB
    local span = cs * (cs // 8)      -- guest bytes one L2 table maps
    h.create(path, 4 * span, "cluster_size=4k")
    h.qemu_io(path, { "write -P 0x5e " .. (span + 3 * cs) .. " " .. cs })
    local img = assert(qcow2.open(path))
    local l1 = img:l1()
    assert.are.equal(0, l1[1])       -- format entry 0: empty
    local l2_off = l1[2] & 0x00FFFFFFFFFFFE00
    assert.are_not.equal(0, l2_off)  -- format entry 1: the table
    assert.are.same({}, img:l2(0))
    local l2 = img:l2(1)
    assert.are.equal(h.get_be64(path, l2_off + 8 * 3), l2[4])
    assert.are_not.equal(0, l2[4])
    local r, _, code = img:l2(#l1)   -- one past the last format index
    assert.is_nil(r)
    assert.are.equal("invalid", code)
    img:close()
  end)
end)
