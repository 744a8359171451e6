-- qcow2.mutate: seeded, structure-aware, replayable.
local helpers = require("helpers")

describe("qcow2.mutate", function()
  local qcow2, dir, pristine
  setup(function()
    qcow2 = require("qcow2")
    dir = helpers.tmpdir()
    local p = dir .. "/base.qcow2"
    helpers.create(p, "4M", "cluster_size=16384")
    helpers.qemu_io(p, { "write -P 1 0 64k", "write -c -P 2 1M 16k", "write -z 2M 16k" })
    helpers.qemu_img("snapshot -c s1 " .. helpers.q(p))
    helpers.qemu_io(p, { "write -P 3 16k 16k" })
    pristine = helpers.read_file(p)
  end)
  teardown(helpers.cleanup)

  local function fresh(name)
    local p = dir .. "/" .. name
    helpers.write_file(p, pristine)
    return p
  end

  it("the same seed on the same image makes the same mutations and the same bytes", function()
    local a, b = fresh("a.qcow2"), fresh("b.qcow2")
    math.randomseed(1)
    local ma = assert(qcow2.mutate(a, { seed = 42, count = 12 }))
    math.randomseed(2)        -- the global generator plays no part
    local mb = assert(qcow2.mutate(b, { seed = 42, count = 12 }))
    assert.are.equal(12, #ma)
    assert.are.same(ma, mb)
    assert.are.equal(helpers.read_file(a), helpers.read_file(b))
    assert.are_not.equal(pristine, helpers.read_file(a))
  end)

  it("different seeds make different mutations", function()
    local seen = {}
    for seed = 1, 4 do
      local p = fresh("s" .. seed .. ".qcow2")
      local m = assert(qcow2.mutate(p, { seed = seed, count = 4 }))
      seen[helpers.read_file(p)] = true
      assert.are.equal(4, #m)
    end
    local n = 0
    for _ in pairs(seen) do n = n + 1 end
    assert.are.equal(4, n)
  end)

  it("records target, where, old and new, and every change is a real one", function()
    local m = {}
    for seed = 1, 20 do
      for _, r in ipairs(assert(qcow2.mutate(fresh("rec.qcow2"), { seed = seed, count = 2 }))) do
        m[#m + 1] = r
      end
    end
    local targets = {}
    for _, r in ipairs(m) do
      assert.is_string(r.target); assert.is_string(r.where)
      assert.is_not_nil(r.old); assert.is_not_nil(r.new)
      assert.are_not.same(r.old, r.new)
      targets[r.target] = true
    end
    for _, t in ipairs({ "header", "l1", "l2", "refcount", "snapshot" }) do
      assert.is_true(targets[t] or false, "no mutation of " .. t .. " in 40")
    end
  end)

  it("l1 and l2 targets change bytes only inside the L1 table and the L2 tables", function()
    local ed = assert(qcow2.edit(fresh("probe.qcow2")))
    local h = ed:header()
    local lo, hi = h.l1_table_offset, h.l1_table_offset + 8 * h.l1_size
    local _, l2e = ed:l2(0)
    local l2lo = l2e - l2e % 16384
    ed:close()
    for seed = 1, 10 do
      local p = fresh("t.qcow2")
      local m = assert(qcow2.mutate(p, { seed = seed, count = 1, targets = { "l1" } }))
      assert.are.equal("l1", m[1].target)
      local after = helpers.read_file(p)
      for i = 1, #after do
        if after:byte(i) ~= pristine:byte(i) then
          assert(i - 1 >= lo and i - 1 < hi, ("seed %d changed byte 0x%x outside the L1 table"):format(seed, i - 1))
        end
      end
      helpers.write_file(p, pristine)
      m = assert(qcow2.mutate(p, { seed = seed, count = 1, targets = { "l2" } }))
      assert.are.equal("l2", m[1].target)
      after = helpers.read_file(p)
      for i = 1, #after do
        if after:byte(i) ~= pristine:byte(i) then
          assert(i - 1 >= l2lo and i - 1 < l2lo + 16384, ("seed %d changed byte 0x%x outside the L2 table"):format(seed, i - 1))
        end
      end
    end
  end)

  it("chooses edge values: protocol backing names, refcounts 0/1/max, offsets past the end", function()
    local names, refs, past_eof = {}, {}, false
    local size = #pristine
    for seed = 1, 100 do
      local p = fresh("e.qcow2")
      for _, r in ipairs(assert(qcow2.mutate(p, { seed = seed, count = 3, targets = { "header", "refcount" } }))) do
        if r.where == "header.backing_file" then names[#names + 1] = r.new end
        if r.where:match("^refcount%[") then refs[r.new] = true end
        if r.where:match("^header%..*_offset$") and math.type(r.new) == "integer" and r.new >= size then
          past_eof = true
        end
      end
    end
    local proto = false
    for _, n in ipairs(names) do if n:match("^nbd://") or n:match("^json:") then proto = true end end
    assert.is_true(proto, "no backing name with a protocol")
    assert.is_true(refs[0] and refs[1] and refs[0xffff] or false, "refcounts 0, 1 and max not all chosen")
    assert.is_true(past_eof, "no header offset past the end of the file")
  end)

  it("raises on misuse, returns nil, msg, code for a missing file", function()
    local p = fresh("m.qcow2")
    assert.has_error(function() qcow2.mutate(p, { targets = { "nope" } }) end)
    assert.has_error(function() qcow2.mutate(p, { seed = 1.5 }) end)
    assert.has_error(function() qcow2.mutate(p, { bogus = 1 }) end)
    local v, _, code = qcow2.mutate(dir .. "/missing", { seed = 1 })
    assert.is_nil(v); assert.are.equal("notfound", code)
  end)
end)
