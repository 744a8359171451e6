-- Backing chains: reads and maps through the chain, Image:backing, the
-- backing = false and resolve options of qcow2.open.
local h = require("helpers")
local corpus = require("corpus")
local qcow2 = require("qcow2")

local function realpath_of(p)
  return (h.must("realpath -m " .. h.q(p)):gsub("%s+$", ""))
end

describe("a backing chain (raw <- qcow2 <- qcow2)", function()
  local dir, chain
  setup(function()
    dir = h.tmpdir()
    chain = corpus.chain(dir)
  end)
  teardown(function() h.cleanup() end)

  it("reads every layer byte-identical to qemu-img's export of it", function()
    for _, p in ipairs({ chain.top, chain.mid }) do
      local want = h.raw_bytes(p)
      local img = assert(qcow2.open(p))
      corpus.assert_bytes(img:read(0, img.size), want, p)
      for _, r in ipairs(corpus.odd_ranges(4096, img.size)) do
        corpus.assert_bytes(img:read(r[1], r[2]), want:sub(r[1] + 1, r[1] + r[2]), p, r[1])
      end
      img:close()
    end
  end)

  it("maps each extent at the depth of the layer that holds it, as qemu-img map does", function()
    local want = corpus.qemu_map(chain.top)
    local depths = {}
    for _, r in ipairs(want) do depths[r.depth] = true end
    assert.is_true(depths[0] and depths[1] and depths[2]) -- the corpus reaches every layer
    local img = assert(qcow2.open(chain.top))
    assert.are.same(want, corpus.decode_map(img:map():to_json()))
    img:close()
  end)

  it("gives the backing Image through backing(), down to the raw base", function()
    local top = assert(qcow2.open(chain.top))
    local mid = top:backing()
    assert.are.equal("userdata", type(mid))
    assert.are.equal(h.info_json(chain.mid)["virtual-size"], mid.size)
    assert.are.equal(4096, mid.cluster_size)
    assert.are.equal("chain-base.raw", mid.backing_file)
    assert.is_true(mid.read_only)
    assert.are.equal(realpath_of(chain.mid), realpath_of(mid.path))
    local base = mid:backing()
    assert.are.equal("userdata", type(base))
    assert.are.equal(realpath_of(chain.base), realpath_of(base.path))
    assert.are.equal("raw", base:info().format)
    assert.is_nil(base:backing())
    -- each backing Image reads like qemu-img's export of that file
    corpus.assert_bytes(mid:read(0, mid.size), h.raw_bytes(chain.mid), "mid via backing()")
    corpus.assert_bytes(base:read(0, base.size), h.read_file(chain.base), "base via backing()")
    assert.are.equal(corpus.sha256(h.read_file(chain.base)), base:digest())
    top:close()
  end)

  it("keeps the backing Image usable after the top handle is dropped and collected", function()
    local mid
    do
      local top = assert(qcow2.open(chain.top))
      mid = top:backing()
    end
    collectgarbage()
    collectgarbage()
    corpus.assert_bytes(mid:read(0, mid.size), h.raw_bytes(chain.mid), "mid after GC")
  end)

  it("with backing = false reads unallocated clusters as zeroes", function()
    local want = corpus.raw_bytes_no_backing(chain.top)
    assert.are_not.equal(want, h.raw_bytes(chain.top)) -- the chain did show through
    local img = assert(qcow2.open(chain.top, { backing = false }))
    assert.is_nil(img:backing())
    corpus.assert_bytes(img:read(0, img.size), want, "backing=false")
    img:close()
  end)

  it("with backing = false maps unallocated clusters as unallocated at depth 0", function()
    local want = corpus.qemu_map_no_backing(chain.top)
    local img = assert(qcow2.open(chain.top, { backing = false }))
    assert.are.same(want, corpus.decode_map(img:map():to_json()))
    img:close()
  end)

  it("calls resolve with the stored name, its format and the depth of the image naming it", function()
    local calls = {}
    local img = assert(qcow2.open(chain.top, {
      backing = function(name, format, depth)
        calls[#calls + 1] = { name, format, depth }
        return dir .. "/" .. name
      end,
    }))
    assert.are.same({ { "chain-mid.qcow2", "qcow2", 0 }, { "chain-base.raw", "raw", 1 } }, calls)
    corpus.assert_bytes(img:read(0, img.size), h.raw_bytes(chain.top), "resolved chain")
    img:close()
  end)

  it("lets resolve redirect the chain to copies kept elsewhere", function()
    local want = h.raw_bytes(chain.top)
    local work = h.tmpdir()
    local evidence = h.tmpdir()
    h.copy(chain.top, work .. "/chain-top.qcow2")
    h.copy(chain.mid, evidence .. "/mid-copy.qcow2")
    h.copy(chain.base, evidence .. "/base-copy.raw")
    local where = { ["chain-mid.qcow2"] = evidence .. "/mid-copy.qcow2",
                    ["chain-base.raw"] = evidence .. "/base-copy.raw" }
    -- with no resolver the moved top cannot find its backing file
    local none, msg, code = qcow2.open(work .. "/chain-top.qcow2")
    assert.is_nil(none)
    assert.are.equal("string", type(msg))
    assert.are.equal("notfound", code)
    local img = assert(qcow2.open(work .. "/chain-top.qcow2", {
      backing = function(name) return where[name] end,
    }))
    corpus.assert_bytes(img:read(0, img.size), want, "redirected chain")
    assert.are.equal(realpath_of(where["chain-mid.qcow2"]), realpath_of(img:backing().path))
    img:close()
  end)

  it("fails to open with resolve's reason when resolve refuses", function()
    local img, msg, code = qcow2.open(chain.top, {
      backing = function(name, _, depth)
        if depth == 1 then return nil, "refused by policy: " .. name end
        return dir .. "/" .. name
      end,
    })
    assert.is_nil(img)
    assert.are.equal("string", type(msg))
    assert.is_truthy(msg:find("refused by policy: chain-base.raw", 1, true), msg)
    assert.are.equal("string", type(code))
  end)

  it("fails to open with notfound when a backing file is missing, and opens with backing = false", function()
    local work = h.tmpdir()
    h.copy(chain.top, work .. "/chain-top.qcow2")
    -- qemu-img refuses it too (info does not open backing files; convert does)
    assert.is_false((h.sh("qemu-img convert -O raw " .. h.q(work .. "/chain-top.qcow2") .. " "
      .. h.q(work .. "/x.raw"))))
    local img, msg, code = qcow2.open(work .. "/chain-top.qcow2")
    assert.is_nil(img)
    assert.is_truthy(msg:find("chain-mid.qcow2", 1, true), msg)
    assert.are.equal("notfound", code)
    img = assert(qcow2.open(work .. "/chain-top.qcow2", { backing = false }))
    corpus.assert_bytes(img:read(0, img.size), corpus.raw_bytes_no_backing(chain.top), "no backing")
    img:close()
  end)
end)

describe("a backing file shorter than its overlay", function()
  local dir, s
  setup(function()
    dir = h.tmpdir()
    s = corpus.short_backing(dir)
  end)
  teardown(function() h.cleanup() end)

  it("reads zeroes past the backing file's end, as qemu-img does", function()
    for _, p in ipairs({ s.top, s.rtop }) do
      local want = h.raw_bytes(p)
      local img = assert(qcow2.open(p))
      corpus.assert_bytes(img:read(0, img.size), want, p)
      local bsize = img:backing().size
      assert.is_true(bsize < img.size)
      assert.are.equal(("\0"):rep(img.size - 1100000 - 4096), img:read(1100000, img.size - 1100000 - 4096))
      img:close()
    end
  end)

  it("maps past the backing file's end as qemu-img map does", function()
    for _, p in ipairs({ s.top, s.rtop }) do
      local img = assert(qcow2.open(p))
      assert.are.same(corpus.qemu_map(p), corpus.decode_map(img:map():to_json()), p)
      img:close()
    end
  end)
end)

describe("an extended-L2 overlay", function()
  local dir, e
  setup(function()
    dir = h.tmpdir()
    e = corpus.extended_l2_overlay(dir)
  end)
  teardown(function() h.cleanup() end)

  it("reads unallocated subclusters of allocated clusters from the backing file", function()
    local want = h.raw_bytes(e.top)
    local img = assert(qcow2.open(e.top))
    corpus.assert_bytes(img:read(0, img.size), want, e.top)
    -- 2 KiB subclusters: the written one and its neighbours
    corpus.assert_bytes(img:read(4096 - 1, 2048 + 2), want:sub(4096, 4096 + 2049), e.top, 4095)
    assert.are.equal(("\xb0"):rep(2048), img:read(2048, 2048))
    img:close()
  end)

  it("maps subclusters at the depth qemu-img reports", function()
    local img = assert(qcow2.open(e.top))
    assert.are.same(corpus.qemu_map(e.top), corpus.decode_map(img:map():to_json()))
    img:close()
  end)
end)
