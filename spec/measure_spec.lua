-- qcow2.measure and `qcow2 measure` against qemu-img measure
-- --output=json (the oracle): create options across cluster sizes,
-- refcount widths, extended L2 and preallocation modes; existing images
-- as input (and their snapshots, and their bitmaps).
local h = require "helpers"
local corpus = require "corpus"
local qcow2 = require "qcow2"

local FULL = os.getenv("QCOW2_SWEEP") == "full"

-- qemu-img measure -O qcow2 --output=json with args, decoded.
local function oracle(args)
  return h.json.decode(h.qemu_img("measure --output=json -O qcow2 " .. args))
end

local function same(want, got)
  assert.equal(want.required, got.required)
  assert.equal(want["fully-allocated"], got.fully_allocated)
  assert.equal(want.bitmaps, got.bitmaps)
end

describe("qcow2.measure", function()
  local dir
  setup(function() dir = h.tmpdir() end)
  teardown(function() h.cleanup() end)

  local sizes = FULL and { 0, 1, 1000000, 1 << 30, 3 * (1 << 40) + 12345 } or { 1000000, 3 * (1 << 40) + 12345 }
  local clusters = FULL and { 512, 4096, 65536, 2 * 1024 * 1024 } or { 512, 65536, 2 * 1024 * 1024 }
  for _, cs in ipairs(clusters) do
    for _, pre in ipairs({ "off", "metadata", "falloc", "full" }) do
      it(("equals qemu-img measure: cluster_size=%d, preallocation=%s"):format(cs, pre), function()
        for _, size in ipairs(sizes) do
          for _, extra in ipairs({ {}, { refcount_bits = 1 }, { refcount_bits = 64 },
              cs >= 16384 and { extended_l2 = true } or nil }) do
            local o = ("cluster_size=%d,preallocation=%s"):format(cs, pre)
            for k, v in pairs(extra) do o = o .. "," .. k .. "=" .. (v == true and "on" or tostring(v)) end
            local ok, want = pcall(oracle, "-o " .. o .. " --size " .. size)
            local opts = { size = size, cluster_size = cs, preallocation = pre }
            for k, v in pairs(extra) do opts[k] = v end
            if ok then
              same(want, assert(qcow2.measure(opts)))
            else
              assert.is_nil((qcow2.measure(opts)))
            end
          end
        end
      end)
    end
  end

  it("refuses what qemu-img measure refuses", function()
    local r, msg, code = qcow2.measure { size = 1 << 20, cluster_size = 1000 }
    assert.is_nil(r)
    assert.equal("invalid", code)
    assert.matches("Cluster size", msg)
    r, _, code = qcow2.measure { size = 1 << 20, version = 2, refcount_bits = 8 }
    assert.is_nil(r)
    assert.equal("invalid", code)
    r, _, code = qcow2.measure { size = 1 << 62, cluster_size = 512 }
    assert.is_nil(r)
    assert.equal("invalid", code)
    assert.has_error(function() qcow2.measure { size = 1, sise = 2 } end)
    assert.has_error(function() qcow2.measure {} end)
    assert.has_error(function() qcow2.measure { size = 1, from = "x" } end)
  end)

  describe("from an existing image", function()
    local images = {}
    setup(function()
      local d = h.tmpdir()
      images.v3 = corpus.v3(d, 65536)
      images.v2 = corpus.v2(d)
      images.compressed = corpus.compressed(d, "zlib")
      images.l2 = corpus.extended_l2(d)
      images.chain = corpus.chain(d).top
      images.snap = corpus.snapshots(d)
      local raw = corpus.random_file(d .. "/r.raw", 3 * 1024 * 1024)
      h.must("truncate -s 8M " .. h.q(raw))
      images.raw = raw
      local bm = d .. "/bitmaps.qcow2"
      h.create(bm, "100M")
      h.qemu_io(bm, { "write -P 1 0 1M" })
      h.qemu_img("bitmap --add -g 65536 " .. h.q(bm) .. " first")
      h.qemu_img("bitmap --add -g 4096 " .. h.q(bm) .. " a-much-longer-bitmap-name")
      images.bitmaps = bm
    end)

    for _, name in ipairs({ "v3", "v2", "compressed", "l2", "chain", "snap", "raw", "bitmaps" }) do
      it("equals qemu-img measure of the " .. name .. " image", function()
        local p = images[name]
        for _, o in ipairs({ {}, { cluster_size = 4096 }, { cluster_size = 2 * 1024 * 1024, version = 2 },
            { preallocation = "full" }, { backing_file = "x.qcow2" } }) do
          local args = {}
          for k, v in pairs(o) do
            local key = k == "version" and "compat" or k
            local val = k == "version" and (v == 2 and "0.10" or "1.1") or tostring(v)
            args[#args + 1] = key .. "=" .. val
          end
          local want = oracle((#args > 0 and ("-o " .. table.concat(args, ",") .. " ") or "")
            .. (name == "raw" and "-f raw " or "") .. h.q(p))
          o.from = p
          same(want, assert(qcow2.measure(o)))
        end
      end)
    end

    it("equals qemu-img measure -l of each snapshot (by name, and of an open Image)", function()
      local img = assert(qcow2.open(images.snap))
      for _, s in ipairs(img:snapshots()) do
        local want = oracle("-l " .. h.q("snapshot.name=" .. s.name) .. " " .. h.q(images.snap))
        same(want, assert(qcow2.measure { from = images.snap, snapshot = s.name }))
        same(want, assert(qcow2.measure { from = img, snapshot = s.id }))
      end
      local r, _, code = qcow2.measure { from = img, snapshot = "none" }
      assert.is_nil(r)
      assert.equal("notfound", code)
      img:close()
    end)

    it("prints qemu-img's output in the tool (human and JSON)", function()
      for _, args in ipairs({ "-O qcow2 " .. h.q(images.bitmaps), "--output=json -O qcow2 " .. h.q(images.v3),
          "--size 1G -O qcow2 -o cluster_size=4k", "--size 1G", "--output=json " .. h.q(images.v3) }) do
        local want = h.qemu_img("measure " .. args)
        local ok, got = h.sh((os.getenv("LUA") or "lua5.4") .. " lua/qcow2-cli measure " .. args)
        assert.is_true(ok)
        assert.equal(want, got)
      end
    end)
  end)
end)
